"""The baselines and ablations of SPEC §9 beyond the model's own forward (test_modeling covers add, none,
pause against float64 references): KD's loss and teacher caches, activation-selected labels, the trainer
on each arm, and every arm's checkpoint under from_pretrained and the stock lm_eval "hf" model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from cocomix_core.concepts.labels import ActivationConceptExtractor, ConceptExtractor
from cocomix_core.concepts.sae import TopKSAE
from cocomix_core.data.tokenizer import VOCAB_SIZE
from cocomix_core.data.windows import TrainWindows
from cocomix_core.model.build import TrainJob
from cocomix_core.training.checkpoints import save_checkpoint
from cocomix_core.training.distill import (
    OnlineTeacher,
    TeacherLogitCache,
    build_teacher_logit_cache,
    distillation_kl,
    top_k_targets,
)
from cocomix_core.training.trainer import train
from settings import load_settings
from settings.schema import ModelShape, TrainSettings, training_branches


# ----- KD loss ------------------------------------------------------------------------------------
def reference_kd(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """mean over positions t < T-1 of Σ_v p_v log(p_v / q_v) at temperature τ, float64 numpy."""
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p = softmax(teacher[:, :-1] / temperature)
    q = softmax(student[:, :-1] / temperature)[..., : teacher.shape[-1]]  # padded student rows keep their mass
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_kl_matches_a_float64_reference(temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 7, 40, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2, 7, 37, generator=g, dtype=torch.float64) * 3  # the student has 3 padded rows
    value = distillation_kl(student, teacher, temperature)
    assert value.item() == pytest.approx(reference_kd(student.numpy(), teacher.numpy(), temperature), rel=1e-12)
    # float32 inputs are computed in float32 and agree to its precision
    assert distillation_kl(student.float(), teacher.float(), temperature).item() == pytest.approx(value.item(), rel=1e-5)


def test_kd_kl_gradient_is_the_softmax_difference():
    """d KL / d s_t = (q_t - p_t) / τ per position, divided by the number of positions (independent formula)."""
    g = torch.Generator().manual_seed(1)
    temperature = 2.0
    student = (torch.randn(2, 5, 30, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(2, 5, 30, generator=g, dtype=torch.float64) * 2
    distillation_kl(student, teacher, temperature).backward()
    p, q = torch.softmax(teacher / temperature, -1), torch.softmax(student.detach() / temperature, -1)
    expected = (q - p) / temperature / (2 * 4)
    expected[:, -1] = 0  # the last position has no next token
    torch.testing.assert_close(student.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [3, 10, 30])
def test_top_k_kd_is_within_the_documented_bounds(k):
    """Value: never above the exact KL, equal when k covers the vocabulary. Gradient: L1 error per position <= 2 r_t / τ."""
    g = torch.Generator().manual_seed(2)
    temperature = 1.5
    student = (torch.randn(3, 6, 30, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(3, 6, 30, generator=g, dtype=torch.float64) * 4

    exact = distillation_kl(student, teacher, temperature)
    (exact_grad,) = torch.autograd.grad(exact, student)
    targets = top_k_targets(teacher, k, temperature)
    cached = distillation_kl(student, targets, temperature)
    (cached_grad,) = torch.autograd.grad(cached, student)

    tail = targets.tail_log_prob.exp()[:, :-1]
    p = torch.softmax(teacher / temperature, -1)
    assert torch.allclose(tail, 1 - p.topk(k, -1).values.sum(-1)[:, :-1], atol=1e-12)
    if k == 30:
        assert cached.item() == pytest.approx(exact.item(), rel=1e-12)
    else:
        assert cached.item() <= exact.item() + 1e-12 and tail.max() > 1e-3
    positions = 3 * 5  # the gradient of a mean: per-position errors are scaled by 1/positions
    l1_error = (cached_grad - exact_grad)[:, :-1].abs().sum(-1) * positions * temperature
    assert (l1_error <= 2 * tail + 1e-12).all()


# ----- teacher-logit cache and the trainer --------------------------------------------------------
def tiny_gpt2(seed: int, vocab_size: int = VOCAB_SIZE, width: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=width, n_layer=2, n_head=2, n_positions=32, vocab_size=vocab_size,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def test_teacher_cache_rows_are_the_online_targets_and_reuse_is_checked(tmp_path):
    windows = TrainWindows(np.random.default_rng(0).integers(0, 300, 4000).astype(np.uint16), 16, seed=3)
    teacher = tiny_gpt2(0, vocab_size=300)
    folder = build_teacher_logit_cache(teacher, windows, num_samples=10, batch_size=4, top_k=20, temperature=2.0,
                                       out_dir=tmp_path / "kd", provenance={"teacher": "tiny"})
    cache = TeacherLogitCache(folder)
    ids = torch.from_numpy(windows.batch(5, 3))
    expected = top_k_targets(OnlineTeacher(teacher).targets(5, ids), 20, 2.0)
    got = cache.targets(5, ids)
    torch.testing.assert_close(got.log_probs, expected.log_probs)
    assert torch.equal(got.token_ids.long(), expected.token_ids)
    torch.testing.assert_close(got.tail_log_prob, expected.tail_log_prob)
    assert 0 < cache.manifest["tail_mass"]["mean"] <= cache.manifest["tail_mass"]["max"] < 1
    with pytest.raises(ValueError, match=r"temperature: cache has 2.0, expected 1.0"):
        cache.check({"temperature": 1.0})
    with pytest.raises(IndexError, match="holds samples 0..9"):
        cache.targets(8, ids)


def kd_job(steps: int = 2) -> TrainJob:
    shape = ModelShape(width=32, depth=2, heads=2)
    settings = TrainSettings(steps=steps, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1, eval_every=steps,
                             eval_windows=2, checkpoint_every=steps, log_every=1, cpu_threads=1)
    return TrainJob(name="kd", kind="kd", shape=shape, train=settings, block_size=32, window_seed=0, seed=0,
                    lam_kd=1.0, kd_temperature=2.0, kd_top_k=VOCAB_SIZE)


def test_kd_training_with_a_full_cache_equals_online_teacher_logits(tmp_path, smoke_data):
    """With k = the vocabulary the cache is exact: two steps give the same weights as the online teacher (fp32 rounding)."""
    from cocomix_core.data.corpus import load_split

    job = kd_job()
    teacher = tiny_gpt2(7)
    windows = TrainWindows(load_split(smoke_data, "train", block_size=job.block_size), job.block_size, job.window_seed)
    cache = TeacherLogitCache(build_teacher_logit_cache(
        teacher, windows, num_samples=4, batch_size=2, top_k=VOCAB_SIZE, temperature=2.0,
        out_dir=tmp_path / "cache", provenance={}))
    online = train(job, smoke_data, tmp_path / "online", teacher=OnlineTeacher(teacher))
    cached = train(job, smoke_data, tmp_path / "cached", teacher=cache)
    plain = train(TrainJob(**{**job.__dict__, "lam_kd": 0.0}), smoke_data, tmp_path / "plain", teacher=cache)
    weights = [AutoModelForCausalLM.from_pretrained(run.final_checkpoint).state_dict() for run in (online, cached, plain)]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert cached.final_val_loss == pytest.approx(online.final_val_loss, rel=1e-6)
    assert not torch.allclose(weights[2]["transformer.h.0.attn.c_attn.weight"], weights[0]["transformer.h.0.attn.c_attn.weight"])


def test_kd_job_without_a_teacher_is_refused(tmp_path, smoke_data):
    with pytest.raises(ValueError, match="is a KD job: pass teacher"):
        train(kd_job(), smoke_data, tmp_path)


# ----- activation-selected labels -----------------------------------------------------------------
def test_activation_labels_are_the_largest_sae_latents():
    """Independent float64 path: residual via output_hidden_states, Bessel LN, encoder, TopK, ReLU, then top K."""
    teacher = tiny_gpt2(3, vocab_size=97).double()
    torch.manual_seed(4)
    sae = TopKSAE(num_latents=64, width=32, k=12).double()
    with torch.no_grad():
        for param in (sae.pre_bias, sae.latent_bias):
            param.normal_(0, 0.1)
    extractor = ActivationConceptExtractor(teacher, sae, layer_index=0)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    labels = extractor.concept_labels(ids, 4)

    x = teacher(ids, output_hidden_states=True).hidden_states[1].detach()
    mu, sigma = x.mean(-1, keepdim=True), x.std(-1, keepdim=True, unbiased=True)
    pre = ((x - mu) / (sigma + 1e-5) - sae.pre_bias) @ sae.encoder.weight.T + sae.latent_bias
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, pre.topk(12, -1).indices, True)
    latents = torch.where(keep, pre.relu(), torch.zeros_like(pre))
    assert (latents.topk(5, -1).values[..., 4] < latents.topk(4, -1).values[..., 3]).all()  # no ties at the cut
    assert torch.equal(labels.sort(-1).values, latents.topk(4, -1).indices.sort(-1).values)
    attribution_labels = ConceptExtractor.select_labels(extractor, extractor.sparse_attribution(ids), 4)
    assert not torch.equal(labels.sort(-1).values, attribution_labels.sort(-1).values)  # a different selection


# ----- settings ------------------------------------------------------------------------------------
def test_cpu_study_preset_has_every_arm_at_three_seeds():
    settings = load_settings("cpu_study")
    kinds = sorted({(branch.kind, branch.seed) for branch in training_branches(settings)})
    assert kinds == [(kind, seed) for kind in ("cocomix", "kd", "ntp", "pause") for seed in (0, 1, 2)]


def test_an_option_of_another_kind_of_arm_is_refused_by_name():
    from settings.loader import SettingsError, validate_settings

    raw = load_settings("smoke").model_dump(mode="json")
    raw["arms"]["ntp"]["kd_temperature"] = 2.0
    with pytest.raises(SettingsError, match=r"arms.ntp.*kd_temperature do\(es\) not apply to a 'ntp' arm"):
        validate_settings(raw)


# ----- checkpoints under from_pretrained and the stock lm_eval "hf" model ---------------------------
@pytest.mark.parametrize("arm", ["kd", "pause", "add", "none"])
def test_every_arm_checkpoint_loads_and_runs_under_stock_lm_eval(arm, tmp_path, tasks_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from cocomix_core.data.tokenizer import hf_gpt2_tokenizer
    from cocomix_core.evaluation.evaluator import run_lm_eval
    from cocomix_core.model.build import build_model

    kind = arm if arm in ("kd", "pause") else "cocomix"
    mix = arm if arm in ("add", "none") else "insert"
    model = build_model(kind, ModelShape(width=32, depth=2, heads=2), 64, concept_dim=64, concept_num=4,
                        insert_layer_index=1, mix=mix, seed=0).eval()
    folder = save_checkpoint(model, tmp_path, {"step": 1, "tokens_seen": 64, "kind": kind})
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.randint(0, VOCAB_SIZE, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={folder},trust_remote_code=True,device=cpu",
        tasks=["cocomix_choice"], task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        limit=3, batch_size=2, bootstrap_iters=0,
    )
    ours = run_lm_eval(model, hf_gpt2_tokenizer(), ["cocomix_choice"], tasks_dir, limit=3, batch_size=2)
    for name in ("acc", "acc_norm"):
        assert output["results"]["cocomix_choice"][f"{name},none"] == pytest.approx(ours["tasks"]["cocomix_choice"][name])


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    from cocomix_core.data.corpus import prepare_corpus
    from cocomix_core.evaluation.offline_tasks import build_offline_tasks

    data = tmp_path_factory.mktemp("data")
    prepare_corpus(load_settings("smoke").data, data)
    return build_offline_tasks(data, tmp_path_factory.mktemp("tasks") / "tasks", items=6, seed=0)


# ----- the trainer's command line with a KD teacher -------------------------------------------------
def kd_settings_file(tmp_path) -> str:
    """The smoke preset plus a KD arm (a plain LM the size of the smoke NTP baseline)."""
    path = tmp_path / "kd.yaml"
    path.write_text("extends: smoke\ntrain: {steps: 4, eval_every: 4, checkpoint_every: 4, log_every: 2}\narms:\n"
                    "  kd: {kind: kd, model: {width: 36, depth: 2, heads: 2}, kd_temperature: 2.0, lam_kd: 1.0, "
                    "kd_top_k: 16}\n")
    return str(path)


@pytest.mark.slow  # four trainer processes
def test_the_trainer_cli_trains_a_kd_arm_from_a_teacher_logit_cache(tmp_path, smoke_data):
    import subprocess
    import sys
    from pathlib import Path

    from cocomix_core.data.corpus import load_split
    from cocomix_core.model.build import build_model
    from cocomix_core.training.distill import build_teacher_logit_cache

    settings_file = kd_settings_file(tmp_path)
    settings = load_settings(settings_file)
    teacher = build_model("ntp", settings.teacher.model, settings.data.block_size, seed=0)
    windows = TrainWindows(load_split(smoke_data, "train"), settings.data.block_size, settings.data.window_seed)
    cache = build_teacher_logit_cache(teacher, windows, 4 * settings.train.batch_size, 4, 16, 2.0,
                                      tmp_path / "logits", provenance={"teacher": "random smoke"})
    command = [sys.executable, "-m", "cocomix_core.training.trainer", "--settings", settings_file,
               "--arm", "kd", "--data", str(smoke_data), "--threads", "1"]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))

    done = subprocess.run([*command, "--out", str(tmp_path / "run"), "--teacher-logits", str(cache)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kd_losses = [float(line.split("train/kd_loss=")[1].split()[0]) for line in done.stdout.splitlines()
                 if "train/kd_loss=" in line]
    assert kd_losses and all(loss > 0 for loss in kd_losses)  # a random student is far from the teacher
    assert (tmp_path / "run" / "checkpoints" / "step_000004" / "model.safetensors").is_file()

    # The same checks as --labels: a missing teacher, a folder that is no cache, a cache too short for the run.
    refused = {
        (): "is a KD branch: give --teacher-logits, or --teacher",
        ("--teacher-logits", str(tmp_path)): f"--teacher-logits {tmp_path}: not a teacher-logit cache",
        ("--teacher-logits", str(cache), "--set", "train.batch_size=8"): "this run consumes",
    }
    for extra, message in refused.items():
        failed = subprocess.run([*command, "--out", str(tmp_path / "refused"), *extra], cwd=root, env=env,
                                capture_output=True, text=True, timeout=300)
        assert failed.returncode == 1 and message in failed.stderr, failed.stderr[-2000:]
