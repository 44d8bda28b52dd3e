"""Tests for cocomix_core.evaluation.evaluator: perplexity, lm-eval on in-memory models, checkpoint sweeps, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cocomix_core.data.corpus import prepare_corpus
from cocomix_core.data.tokenizer import VOCAB_SIZE, hf_gpt2_tokenizer
from cocomix_core.evaluation import evaluator as evaluate
from cocomix_core.evaluation.evaluator import (
    RESULTS_FILE,
    EvaluationError,
    check_tasks,
    evaluate_checkpoint,
    load_checkpoint,
    run_lm_eval,
    sweep_checkpoints,
    unavailable_paper_tasks,
    validation_perplexity,
)
from cocomix_core.evaluation.intervals import percentile_interval
from cocomix_core.evaluation.offline_tasks import TASK_NAMES, build_offline_tasks
from cocomix_core.model.modeling_cocomix import CoCoMixConfig, CoCoMixForCausalLM
from cocomix_core.plumbing.tracking import MemoryTracker
from cocomix_core.training.checkpoints import save_checkpoint
from settings.loader import load_settings
from settings.schema import EvalSettings

BLOCK = 64
POINT_METRICS = {
    "cocomix_lastword": {"acc", "perplexity", "nll"},
    "cocomix_choice": {"acc", "acc_norm", "nll"},
    "cocomix_rolling": {"word_perplexity", "byte_perplexity", "bits_per_byte", "nll"},
}
EXPECTED_METRICS = {  # every metric with its 95% interval; multiple choice also with its chance level
    task: names | {f"{name}_{end}" for name in names for end in ("lo", "hi")} | ({"chance"} if task == "cocomix_choice" else set())
    for task, names in POINT_METRICS.items()
}


def tiny_model(kind: str, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> torch.nn.Module:
    """Width 32, 2 layers: NTP (GPT2LMHeadModel) or CoCoMix."""
    fields = dict(n_embd=32, n_layer=2, n_head=2, n_positions=BLOCK, vocab_size=vocab_size,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    if kind == "ntp":
        return GPT2LMHeadModel(GPT2Config(**fields)).eval()
    return CoCoMixForCausalLM(CoCoMixConfig(**fields, concept_dim=64, concept_num=4, insert_layer_index=1)).eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The smoke preset's prepared corpus (a second of work): val.bin, val_documents.jsonl, manifest."""
    folder = tmp_path_factory.mktemp("data")
    prepare_corpus(load_settings("smoke").data, folder)
    return folder


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, data_dir) -> Path:
    return build_offline_tasks(data_dir, tmp_path_factory.mktemp("tasks") / "tasks", items=8, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return hf_gpt2_tokenizer()


@pytest.fixture(scope="module")
def cocomix_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tiny_model("cocomix"), tmp_path_factory.mktemp("arm"), {"step": 10, "tokens_seen": 640, "kind": "cocomix"})


# ----- validation perplexity -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ntp", "cocomix"])
def test_perplexity_is_exp_of_the_mean_token_loss(kind):
    model = tiny_model(kind).train()
    tokens = np.random.default_rng(0).integers(0, VOCAB_SIZE, size=5 * 16 + 3).astype(np.uint16)
    result = validation_perplexity(model, tokens, block_size=16, max_windows=4, batch_size=3)

    losses = []
    with torch.no_grad():
        for window in torch.from_numpy(tokens[: 4 * 16].astype(np.int64)).view(4, 16):
            log_probs = torch.log_softmax(model.eval()(window[None]).logits[0].double(), dim=-1)
            losses += [-log_probs[t, window[t + 1]].item() for t in range(15)]
    assert result["tokens"] == len(losses) == 4 * 15
    assert result["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    window_means = [np.mean(losses[15 * w : 15 * (w + 1)]) for w in range(4)]
    assert result["window_losses"] == pytest.approx(window_means, rel=1e-5)
    assert min(window_means) <= result["loss_lo"] <= result["loss"] <= result["loss_hi"] <= max(window_means)
    assert (result["ppl_lo"], result["ppl_hi"]) == (math.exp(result["loss_lo"]), math.exp(result["loss_hi"]))


def test_bootstrap_of_a_mean_agrees_with_scipy():
    """Independent implementation: scipy's percentile bootstrap with its own resampling; both converge."""
    from scipy.stats import bootstrap

    items = np.random.default_rng(1).binomial(1, 0.3, size=200).astype(float)
    ours = evaluate.bootstrap_interval(items, samples=20000, seed=0)
    theirs = bootstrap((items,), np.mean, n_resamples=20000, method="percentile", random_state=5).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.006)
    assert evaluate.bootstrap_interval(items, samples=500, seed=3) == evaluate.bootstrap_interval(items, samples=500, seed=3)


def test_bootstrap_of_a_ratio_statistic_agrees_with_scipy():
    """Items as lm-eval logs them for weighted perplexity: (log-likelihood, words) pairs, resampled together."""
    from lm_eval.api.metrics import weighted_perplexity
    from scipy.stats import bootstrap

    rng = np.random.default_rng(2)
    words = rng.integers(5, 50, size=120)
    lls = -words * rng.uniform(2, 6, size=120)
    ours = evaluate.bootstrap_interval(list(zip(lls, words)), weighted_perplexity, samples=4000, seed=0)
    theirs = bootstrap((lls, words), lambda ll, n, axis=-1: np.exp(-ll.sum(axis) / n.sum(axis)), paired=True,
                       vectorized=True, n_resamples=20000, method="percentile", random_state=5).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), rel=0.02)


def test_perplexity_restores_training_mode():
    model = tiny_model("ntp").train()
    validation_perplexity(model, np.arange(40, dtype=np.uint16), block_size=16, max_windows=None, batch_size=2)
    assert model.training


@pytest.mark.parametrize("length", [0, 15])
def test_perplexity_needs_one_full_window(length):
    with pytest.raises(EvaluationError, match=f"{length} tokens, fewer than one window of block_size=16"):
        validation_perplexity(tiny_model("ntp"), np.zeros(length, np.uint16), 16, None, 2)


# ----- lm-eval ---------------------------------------------------------------------------------
def lastword_by_hand(model, tokenizer, item: dict, max_length: int) -> tuple[float, bool]:
    """log p(" target" | context) and greedy match, tokenised and truncated the way lm-eval does."""
    context_ids = tokenizer.encode(item["context"])
    continuation_ids = tokenizer.encode(item["context"] + " " + item["target"])[len(context_ids):]
    ids = (context_ids + continuation_ids)[-(max_length + 1):]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), dim=-1)
    scored = log_probs[-len(continuation_ids):]
    targets = torch.tensor(continuation_ids)
    return scored.gather(1, targets[:, None]).sum().item(), bool((scored.argmax(-1) == targets).all())


@pytest.mark.parametrize("kind", ["ntp", "cocomix"])
def test_lm_eval_offline_tasks_match_a_hand_computation(kind, tasks_dir, tokenizer):
    model = tiny_model(kind)
    output = run_lm_eval(model, tokenizer, list(TASK_NAMES), tasks_dir, limit=3, batch_size=4)
    assert output["skipped"] == {}
    assert {task: set(metrics) for task, metrics in output["tasks"].items()} == EXPECTED_METRICS
    assert all(math.isfinite(value) for metrics in output["tasks"].values() for value in metrics.values())

    items = [json.loads(line) for line in (tasks_dir / "cocomix_lastword.jsonl").read_text().splitlines()[:3]]
    by_hand = [lastword_by_hand(model, tokenizer, item, BLOCK) for item in items]
    lastword = output["tasks"]["cocomix_lastword"]
    assert lastword["nll"] == pytest.approx(-np.mean([ll for ll, _ in by_hand]), rel=1e-4)
    assert lastword["perplexity"] == pytest.approx(math.exp(lastword["nll"]), rel=1e-4)
    assert lastword["acc"] == np.mean([greedy for _, greedy in by_hand])
    for metrics in output["tasks"].values():
        for name in set(metrics) - {"chance"} - {n for n in metrics if n.endswith(("_lo", "_hi"))}:
            assert metrics[f"{name}_lo"] <= metrics[name] + 1e-9 and metrics[name] <= metrics[f"{name}_hi"] + 1e-9, name
    # per-item lastword log-likelihoods, resampled with the task's `perplexity` aggregation (exp of -mean)
    lls = [ll for ll, _ in by_hand]
    assert (lastword["perplexity_lo"], lastword["perplexity_hi"]) == pytest.approx(
        [math.exp(-v) for v in reversed(evaluate.bootstrap_interval(lls))], rel=1e-4)
    assert output["tasks"]["cocomix_choice"]["chance"] == pytest.approx(
        np.mean([1 / len(json.loads(line)["choices"])
                 for line in (tasks_dir / "cocomix_choice.jsonl").read_text().splitlines()[:3]]))


def test_unknown_task_lists_the_known_ones(tasks_dir):
    with pytest.raises(EvaluationError) as error:
        check_tasks(["cocomix_lastword", "hellaswagg"], tasks_dir)
    message = str(error.value)
    assert "hellaswagg" in message and "cocomix_rolling" in message and "winogrande" in message


def test_our_tasks_need_a_task_folder():
    check_tasks(["hellaswag"], None)
    with pytest.raises(EvaluationError, match="cocomix_choice need a task folder"):
        check_tasks(["hellaswag", "cocomix_choice"], None)


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    """Empty dataset caches, so whether a hub task runs depends only on reaching the hub."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def test_hub_task_without_dataset_fails_fast_by_name(no_hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    started = time.perf_counter()
    reasons = unavailable_paper_tasks(["hellaswag", "cocomix_choice", "piqa"])
    assert time.perf_counter() - started < evaluate.HUB_TIMEOUT_S + 1
    assert reasons == {
        "hellaswag": "hellaswag: dataset Rowan/hellaswag is not cached and the Hugging Face hub is unreachable",
        "piqa": "piqa: dataset baber/piqa is not cached and the Hugging Face hub is unreachable",
    }


def test_skipped_hub_task_leaves_the_others_running(no_hub_cache, monkeypatch, tasks_dir, tokenizer):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    output = run_lm_eval(tiny_model("ntp"), tokenizer, ["hellaswag", "cocomix_lastword"], tasks_dir, limit=2, batch_size=2)
    assert "Rowan/hellaswag" in output["skipped"]["hellaswag"]
    assert set(output["tasks"]) == {"cocomix_lastword"}


def test_paper_task_datasets_match_lm_eval_task_files():
    import lm_eval
    import yaml

    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    files = {"lambada_openai": "lambada/lambada_openai.yaml", "wikitext": "wikitext/wikitext.yaml",
             "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml", "social_iqa": "siqa/siqa.yaml",
             "arc_easy": "arc/arc_easy.yaml", "winogrande": "winogrande/default.yaml"}
    for task, dataset in evaluate.PAPER_TASK_DATASETS.items():
        text = (tasks_root / files[task]).read_text()
        config = yaml.safe_load(text.replace("!function", ""))
        assert (config["task"], config["dataset_path"]) == (task, dataset)


# ----- checkpoints -----------------------------------------------------------------------------
def test_folder_without_checkpoint_files_says_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EvaluationError, match="missing checkpoint.json, model.safetensors"):
        load_checkpoint(tmp_path)


def test_checkpoint_with_a_small_vocabulary_is_refused(tmp_path):
    folder = save_checkpoint(tiny_model("ntp", vocab_size=1000), tmp_path, {"step": 1})
    with pytest.raises(EvaluationError, match="vocab_size=1000 is smaller than its tokenizer's 50257"):
        load_checkpoint(folder)


def test_unknown_task_fails_before_any_work(tmp_path, data_dir, cocomix_checkpoint):
    with pytest.raises(EvaluationError, match="unknown task"):
        evaluate_checkpoint(cocomix_checkpoint, data_dir, None, EvalSettings(tasks=["nope"]), BLOCK)


def test_sweep_evaluates_every_checkpoint_once(tmp_path, data_dir, tasks_dir, monkeypatch):
    arms = {}
    for kind in ("ntp", "cocomix"):
        arms[kind] = tmp_path / kind
        for step in (5, 10):
            save_checkpoint(tiny_model(kind, seed=step), arms[kind], {"step": step, "tokens_seen": step * 64, "kind": kind})
    (arms["ntp"] / "checkpoints" / "step_000015.partial-1234").mkdir()  # an interrupted save: ignored
    settings = EvalSettings(tasks=["cocomix_lastword"], limit=2, batch_size=4, val_windows=2)
    evaluations = []
    real_run_lm_eval = evaluate.run_lm_eval
    monkeypatch.setattr(evaluate, "run_lm_eval", lambda *a, **k: evaluations.append(a) or real_run_lm_eval(*a, **k))

    trackers = {kind: MemoryTracker() for kind in arms}
    results = sweep_checkpoints(arms, data_dir, tasks_dir, settings, BLOCK, trackers)
    assert len(evaluations) == 4
    for kind, tracker in trackers.items():
        assert [r["step"] for r in results[kind]] == [5, 10]
        assert [step for step, _ in tracker.history("eval/val_ppl")] == [5, 10]
        assert tracker.history("eval/tokens_seen") == [(5, 320.0), (10, 640.0)]
        point_metrics = {"eval/val_loss", "eval/val_ppl", "eval/cocomix_lastword/acc",
                         "eval/cocomix_lastword/perplexity", "eval/cocomix_lastword/nll"}
        assert {name for _, name, _ in tracker.metrics} == {
            "eval/tokens_seen", "eval/n_params", "eval/flops_per_token",
            *point_metrics, *{f"{name}_{end}" for name in point_metrics for end in ("lo", "hi")},
        }
        stored = json.loads((arms[kind] / "checkpoints" / "step_000010" / RESULTS_FILE).read_text())
        assert stored["val"] == results[kind][1]["val"]
        # every interval metric carries its bootstrap replicates (for paired comparisons): the logged interval is
        # their 2.5th and 97.5th percentiles, and both arms resample the same 2 windows / 2 items the same way
        replicates = evaluate.tracker_replicates(stored)
        assert set(replicates) == point_metrics
        for name, entry in replicates.items():
            assert entry["items"] == 2 and len(entry["replicates"]) == settings.bootstrap_samples
            metrics = evaluate.tracker_metrics(stored)
            assert percentile_interval(entry["replicates"]) == pytest.approx(
                (metrics[f"{name}_lo"], metrics[f"{name}_hi"])), name

    again = sweep_checkpoints(arms, data_dir, tasks_dir, settings, BLOCK, trackers)
    assert len(evaluations) == 4 and again == results
    assert len(trackers["ntp"].history("eval/val_ppl")) == 2  # nothing logged twice

    save_checkpoint(tiny_model("ntp", seed=99), arms["ntp"], {"step": 10, "tokens_seen": 640, "kind": "ntp"})
    third = sweep_checkpoints(arms, data_dir, tasks_dir, settings, BLOCK, trackers)
    assert len(evaluations) == 5  # only the checkpoint whose weights changed
    assert third["ntp"][1]["val"]["loss"] != results["ntp"][1]["val"]["loss"]
    assert trackers["ntp"].history("eval/val_ppl")[-1][0] == 10


def test_command_line_prints_results(capsys, data_dir, cocomix_checkpoint, tasks_dir):
    evaluate.main([
        str(cocomix_checkpoint), "--data", str(data_dir), "--tasks-dir", str(tasks_dir), "--settings", "smoke",
        "--set", "eval.tasks=[cocomix_choice]", "--set", "eval.limit=2", "--set", "eval.val_windows=2",
    ])
    printed = json.loads(capsys.readouterr().out)
    assert printed["step"] == 10 and set(printed["tasks"]["cocomix_choice"]) == EXPECTED_METRICS["cocomix_choice"]
    assert printed == json.loads((cocomix_checkpoint / RESULTS_FILE).read_text())


def test_command_line_reports_a_bad_folder_without_a_traceback(tmp_path, data_dir):
    with pytest.raises(SystemExit, match="error: .* is not a checkpoint folder: missing config.json"):
        evaluate.main([str(tmp_path), "--data", str(data_dir), "--settings", "smoke"])


# Slow: a fresh lm_eval process (~half a minute). The quick loop still loads checkpoints of every arm under stock
# lm-eval in process (test_arms) and through the Auto classes in a fresh process (test_modeling).
@pytest.mark.slow
def test_stock_lm_eval_cli_matches_the_in_process_numbers(tmp_path, cocomix_checkpoint, tasks_dir, tokenizer):
    """lm_eval loads the checkpoint with its own modeling file, from another working directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={cocomix_checkpoint},trust_remote_code=True",
        "--include_path", str(tasks_dir), "--tasks", ",".join(TASK_NAMES), "--device", "cpu",
        "--batch_size", "4", "--limit", "3", "--output_path", str(tmp_path / "out"),
    ]
    finished = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    stock = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]

    ours = run_lm_eval(load_checkpoint(cocomix_checkpoint), tokenizer, list(TASK_NAMES), tasks_dir, limit=3, batch_size=4)
    for task, metrics in ours["tasks"].items():
        for name, value in metrics.items():
            if name in POINT_METRICS[task] - {"nll"}:  # nll, intervals and chance are ours only: from per-sample outputs
                assert stock[task][f"{name},none"] == pytest.approx(value, rel=1e-5), (task, name)
