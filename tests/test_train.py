"""The training loop: schedule, batch splitting, FLOPs, loss going down, DDP == accumulation, failures."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_smoke_labels
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cocomix_core.concepts.labels import LabelCache, load_teacher
from cocomix_core.model.build import job_for_branch, teacher_job
from cocomix_core.plumbing.tracking import MemoryTracker
from cocomix_core.training.trainer import (
    NonFiniteLossError,
    final_checkpoint,
    flops_per_token,
    list_checkpoints,
    lr_at,
    micro_batch_size,
    train,
)
from settings import load_settings, training_branches

REPO_ROOT = Path(__file__).resolve().parent.parent
# Loss-falls runs: enough steps at a high learning rate for a clear drop on the tiny models.
SHORT_RUN = ["train.steps=20", "train.lr=1e-2", "train.warmup_steps=2", "train.log_every=4",
             "train.eval_every=10", "train.checkpoint_every=10"]


@pytest.fixture(scope="module")
def label_cache(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> LabelCache:
    """Real concept labels from a random smoke-sized teacher and SAE, for the samples of a SHORT_RUN."""
    return LabelCache(build_smoke_labels(smoke_data, 80, tmp_path_factory.mktemp("labels")))


def branch_job(name: str, overrides: list[str] = ()):
    settings = load_settings("smoke", overrides)
    branch = next(b for b in training_branches(settings) if b.name == name)
    return job_for_branch(settings, branch)


def first_and_last(tracker: MemoryTracker, name: str) -> tuple[float, float]:
    history = tracker.history(name)
    return history[0][1], history[-1][1]


# ----- pure pieces ---------------------------------------------------------------------------
def test_lr_schedule_at_chosen_steps():
    train_settings = load_settings("smoke", ["train.steps=101", "train.warmup_steps=10", "train.lr=1e-3",
                                             "train.min_lr=1e-4", "train.checkpoint_every=100"]).train
    assert lr_at(0, train_settings) == pytest.approx(1e-4)  # first warmup step: lr/10
    assert lr_at(4, train_settings) == pytest.approx(5e-4)
    assert lr_at(9, train_settings) == pytest.approx(1e-3)  # warmup reaches the peak
    assert lr_at(10, train_settings) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(55, train_settings) == pytest.approx(5.5e-4)  # halfway: the mean of lr and min_lr
    assert lr_at(100, train_settings) == pytest.approx(1e-4)  # the last step uses min_lr
    quarter = 1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4
    assert lr_at(32, train_settings) == pytest.approx(quarter, rel=1e-2)  # ~a quarter of the way


def test_micro_batch_must_divide_the_batch():
    train_settings = load_settings("smoke", ["train.batch_size=4", "train.grad_accum_steps=2"]).train
    assert micro_batch_size(train_settings, world_size=2) == 1
    with pytest.raises(ValueError, match=r"train.batch_size=4 .*train.grad_accum_steps=2 × 3 processes"):
        micro_batch_size(train_settings, world_size=3)


@pytest.mark.parametrize("name", ["ntp", "cocomix"])
def test_flops_formula_counts_the_real_block_parameters(name):
    model = branch_job(name).build_model()
    config, block_size = model.config, 32
    d, layers = config.n_embd, config.n_layer
    block_params = sum(p.numel() for p in model.transformer.h.parameters())
    assert block_params == layers * (12 * d * d + 13 * d)
    if name == "ntp":
        expected = 6 * (block_params + config.vocab_size * d) + 12 * layers * block_size * d
    else:  # one block below the insert layer, one above it on the doubled sequence
        per_block = block_params // layers
        concept = config.concept_dim * d + config.concept_num * d
        expected = 6 * (3 * per_block + config.vocab_size * d + concept) + 12 * block_size * d * (1 + 4)
    assert flops_per_token(config, block_size) == expected


# ----- training runs -------------------------------------------------------------------------
def test_teacher_loss_falls_and_its_checkpoint_is_a_regular_hf_model(smoke_data, tmp_path):
    job = teacher_job(load_settings("smoke", [f"teacher.{o}" for o in SHORT_RUN]))
    tracker = MemoryTracker()
    result = train(job, smoke_data, tmp_path, tracker=tracker, num_threads=1)

    first, last = first_and_last(tracker, "train/loss")
    assert last < first - 0.5
    assert result.final_step == 20 and result.tokens_seen == 20 * 4 * 32
    assert [p.name for p in result.checkpoints] == ["step_000010", "step_000020"] == [p.name for p in list_checkpoints(tmp_path)]
    assert result.final_checkpoint == final_checkpoint(tmp_path)
    assert math.isclose(result.final_val_ppl, math.exp(tracker.history("val/loss")[-1][1]))
    assert {"mfu_peak_flops", "mfu_peak_source"} <= set(tracker.tags)
    logged = {name for _, name, _ in tracker.metrics}
    assert logged == {"train/loss", "train/ntp_loss", "train/lr", "train/grad_norm", "train/tokens_seen",
                      "train/tokens_per_s", "train/mfu", "val/loss", "val/ppl"}

    teacher = load_teacher(result.final_checkpoint)
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_checkpoint)
    ids = torch.randint(0, 50257, (1, 8))
    assert torch.equal(teacher(ids).logits, reloaded(ids).logits)


def test_ntp_loss_falls(smoke_data, tmp_path):
    tracker = MemoryTracker()
    train(branch_job("ntp", SHORT_RUN), smoke_data, tmp_path, tracker=tracker, num_threads=1)
    first, last = first_and_last(tracker, "train/loss")
    assert last < first - 0.5


def test_cocomix_losses_fall_with_cached_labels(smoke_data, label_cache, tmp_path):
    tracker = MemoryTracker()
    job = branch_job("cocomix", SHORT_RUN)
    train(job, smoke_data, tmp_path, tracker=tracker, labels=label_cache, num_threads=1)

    # Labels of a random teacher are learnable but noisy: the concept loss falls more slowly.
    for name, drop in (("train/loss", 0.3), ("train/ntp_loss", 0.3), ("train/concept_loss", 0.1)):
        first, last = first_and_last(tracker, name)
        assert last < first - drop, name
    ntp, concept, total = (tracker.history(n)[-1][1] for n in ("train/ntp_loss", "train/concept_loss", "train/loss"))
    assert total == pytest.approx(ntp + job.lam_concept * concept)
    assert AutoModelForCausalLM.from_pretrained(final_checkpoint(tmp_path)).config.model_type == "cocomix"


def test_cocomix_needs_labels_that_match_its_windows(smoke_data, label_cache, tmp_path):
    with pytest.raises(ValueError, match="pass labels"):
        train(branch_job("cocomix"), smoke_data, tmp_path)
    with pytest.raises(ValueError, match="windows_seed"):
        train(branch_job("cocomix", ["data.window_seed=7"]), smoke_data, tmp_path, labels=label_cache)


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(smoke_data, tmp_path):
    job = branch_job("ntp", ["train.lr=1e30", "train.checkpoint_every=1", "train.warmup_steps=0"])
    with pytest.raises(NonFiniteLossError, match=r"at optimizer step (\d+)") as caught:
        train(job, smoke_data, tmp_path, num_threads=1)
    assert caught.value.step >= 2
    saved = list_checkpoints(tmp_path)
    assert saved[-1].name == f"step_{caught.value.step - 1:06d}"
    AutoModelForCausalLM.from_pretrained(saved[-1])


def test_two_processes_equal_one_process_with_two_accumulation_steps(smoke_data, tmp_path):
    overrides = ["train.steps=4", "train.eval_every=4", "train.checkpoint_every=4"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "cocomix_core.training.trainer", "--settings", "smoke", "--arm", "ntp", "--data", str(smoke_data),
               "--out", str(tmp_path / "ddp"), "--threads", "1"]
    for override in overrides:
        command += ["--set", override]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=300)

    job = branch_job("ntp", overrides + ["train.grad_accum_steps=2"])
    train(job, smoke_data, tmp_path / "accum", num_threads=1)
    ddp = load_file(final_checkpoint(tmp_path / "ddp") / "model.safetensors")
    accumulated = load_file(final_checkpoint(tmp_path / "accum") / "model.safetensors")
    assert ddp.keys() == accumulated.keys()
    for name in ddp:
        torch.testing.assert_close(ddp[name], accumulated[name], rtol=1e-5, atol=1e-6)


FAULT_PROBE = """
import resource, torch
from cocomix_core.training.trainer import keep_freed_memory

def faults():
    for _ in range(10):  # warm-up: the heap settles into its working size within a few reallocations
        torch.ones(64 << 18)  # 64 MiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(64 << 18)  # allocated, filled and freed: a training step's logits in miniature
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()  # glibc as it starts; then, in the same process (one interpreter and import to pay):
assert keep_freed_memory()
print(default, faults())
"""


def test_keep_freed_memory_stops_page_faults_on_reallocation():
    probe = subprocess.run([sys.executable, "-c", FAULT_PROBE], capture_output=True, text=True, check=True)
    faults = dict(zip(("default", "keep"), map(int, probe.stdout.split())))
    pages_per_tensor = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults["default"] >= 10 * pages_per_tensor // 2  # glibc unmaps each 64 MiB tensor: fresh pages
    assert faults["keep"] < pages_per_tensor  # the heap hands the same pages back
