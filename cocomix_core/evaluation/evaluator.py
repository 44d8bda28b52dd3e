"""Checkpoint evaluation (SPEC §6): validation perplexity and lm-eval tasks, for NTP and CoCoMix alike.

    validation_perplexity  exp of the mean next-token loss over unshifted validation windows
    run_lm_eval            lm-evaluation-harness on an in-memory model (its HFLM wrapper)
    evaluate_checkpoint    both, for one checkpoint folder; cached in <checkpoint>/eval_results.json
    sweep_checkpoints      every complete checkpoint of every arm (resumable)

Tasks: our offline tasks (cocomix_lastword, cocomix_choice, cocomix_rolling; see offline_tasks.py)
and the paper's hub tasks (lambada_openai, wikitext, hellaswag, piqa, social_iqa, arc_easy,
winogrande). A hub task whose dataset is neither cached nor downloadable is skipped with a
reason in `results["skipped"]`; the other tasks still run.

Every task also reports `nll`: the mean over items of -log p(correct answer | context), summed
over the answer's tokens (the true choice for multiple choice, the target word for last-word
tasks, the whole passage for rolling tasks). It is computed from lm-eval's per-sample outputs,
so it works for the hub tasks too.

Uncertainty (SPEC §10): every metric carries a 95% percentile-bootstrap interval (eval.bootstrap_samples
resamples, seed eval.bootstrap_seed): validation loss and perplexity over validation windows (every
window predicts the same number of tokens, so the mean over windows is the mean over tokens), lm-eval
metrics over items, each resample aggregated with the task's own aggregation (mean, perplexity,
weighted_perplexity, bits_per_byte, ...) on lm-eval's logged per-item values.

Metric names (tracker, step = the checkpoint's training step):
    eval/val_loss, eval/val_ppl      validation loss (nats/token) and its exp
    eval/tokens_seen                 training tokens behind the checkpoint (the x-axis of curves)
    eval/<task>/<metric>             e.g. eval/cocomix_lastword/acc, eval/cocomix_lastword/perplexity,
                                     eval/cocomix_choice/acc_norm, eval/cocomix_rolling/bits_per_byte,
                                     eval/<task>/nll
    <any of the above>_lo, _hi       its 95% interval, e.g. eval/val_ppl_lo, eval/cocomix_choice/acc_hi
    eval/<task>/chance               multiple-choice tasks: the accuracy of guessing (mean of 1/choices)
    eval/n_params, eval/flops_per_token   the model's parameters and training FLOPs per token
A checkpoint is evaluated again only when its weights, the task set or data, the eval settings
or the block size change (`evaluation_key`); skipped hub tasks stay skipped until then.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cocomix_core.data.windows import validation_windows
from cocomix_core.evaluation.intervals import (
    bootstrap_interval,
    bootstrap_replicates,
    percentile_interval,
)
from cocomix_core.evaluation.offline_tasks import (
    TASK_NAMES,
    EvaluationError,
    build_offline_tasks,
    tasks_digest,
)
from cocomix_core.model.build import flops_per_token
from cocomix_core.model.folders import ModelFolderError, check_model_folder
from cocomix_core.plumbing.files import sha256_file, write_json_atomic
from cocomix_core.plumbing.progress import quiet_third_party
from cocomix_core.plumbing.tracking import Tracker
from cocomix_core.training.checkpoints import (
    CHECKPOINT_META,
    checkpoint_info,
    list_checkpoints,
    verify_checkpoint,
)
from settings.schema import EvalSettings

RESULTS_FILE = "eval_results.json"
RESULTS_FORMAT = 3  # bump when the results' content for the same key changes
HUB_TIMEOUT_S = 3.0

# The paper's tasks and the hub datasets they read (dataset_path of lm_eval 0.4.13's task YAMLs).
PAPER_TASK_DATASETS = {
    "lambada_openai": "EleutherAI/lambada_openai",
    "wikitext": "EleutherAI/wikitext_document_level",
    "hellaswag": "Rowan/hellaswag",
    "piqa": "baber/piqa",
    "social_iqa": "lighteval/siqa",
    "arc_easy": "allenai/ai2_arc",
    "winogrande": "allenai/winogrande",
}
KNOWN_TASKS = (*TASK_NAMES, *PAPER_TASK_DATASETS)

__all__ = [
    "EvaluationError", "KNOWN_TASKS", "PAPER_TASK_DATASETS", "check_tasks", "evaluate_checkpoint",
    "load_checkpoint", "run_lm_eval", "sweep_checkpoints", "tracker_metrics", "tracker_replicates",
    "validation_perplexity", "bootstrap_interval",
]
@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate without dropout, then give the caller (e.g. a training loop) its mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ----- validation perplexity -----------------------------------------------------------------
@torch.inference_mode()
def validation_perplexity(
    model: PreTrainedModel, val_tokens: np.ndarray, block_size: int, max_windows: int | None,
    batch_size: int, device: str | torch.device = "cpu", bootstrap_samples: int = 1000, bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """Mean next-token loss over the first `max_windows` unshifted windows, its exp, and their 95% intervals.

    `device` is where the model lives. Every window predicts block_size - 1 tokens (HF shift), and
    the mean is over all of them: {"loss": nats/token, "ppl": exp(loss), "tokens": predicted tokens,
    "loss_lo"/"loss_hi", "ppl_lo"/"ppl_hi": bootstrap over windows, "window_losses": each window's mean,
    "loss_replicates": the mean loss of each bootstrap resample of the windows (for paired comparisons)}.
    """
    if len(val_tokens) < block_size:
        raise EvaluationError(
            f"the validation split has {len(val_tokens)} tokens, fewer than one window of block_size={block_size}"
        )
    windows = torch.from_numpy(validation_windows(val_tokens, block_size, max_windows))
    window_nll: list[float] = []
    with _eval_mode(model):
        for first in range(0, len(windows), batch_size):
            batch = windows[first : first + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none")
            window_nll += nll.view(targets.shape).double().sum(-1).tolist()  # float64 sums: the mean stays exact
    predicted_per_window = block_size - 1
    window_losses = [nll / predicted_per_window for nll in window_nll]
    loss = math.fsum(window_nll) / (predicted_per_window * len(window_nll))
    replicates = bootstrap_replicates(window_losses, samples=bootstrap_samples, seed=bootstrap_seed)
    loss_lo, loss_hi = percentile_interval(replicates)
    return {
        "loss": loss, "ppl": math.exp(loss), "tokens": predicted_per_window * len(window_nll),
        "loss_lo": loss_lo, "loss_hi": loss_hi, "ppl_lo": math.exp(loss_lo), "ppl_hi": math.exp(loss_hi),
        "window_losses": window_losses, "loss_replicates": replicates.tolist(),
    }


# ----- lm-eval ---------------------------------------------------------------------------------
def check_tasks(tasks: Sequence[str], tasks_dir: str | Path | None) -> None:
    """Raise EvaluationError for unknown task names (listing the known ones) or our tasks without a task folder."""
    unknown = [task for task in tasks if task not in KNOWN_TASKS]
    if unknown:
        raise EvaluationError(
            f"unknown task(s) {', '.join(unknown)}; known: ours {', '.join(TASK_NAMES)}; "
            f"the paper's {', '.join(PAPER_TASK_DATASETS)}"
        )
    ours = [task for task in tasks if task in TASK_NAMES]
    if ours and tasks_dir is None:
        raise EvaluationError(f"tasks {', '.join(ours)} need a task folder: build one with build_offline_tasks")


def _hub_reachable() -> bool:
    """True when the Hugging Face hub answers a TCP connect within HUB_TIMEOUT_S and offline mode is off."""
    if any(os.environ.get(flag, "").upper() in ("1", "TRUE", "YES", "ON") for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    import huggingface_hub.constants

    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def _dataset_cached(dataset: str) -> bool:
    """True when `dataset` has a copy in the hub download cache or the datasets cache."""
    import datasets.config
    import huggingface_hub.constants

    organisation, name = dataset.split("/")
    return (Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{organisation}--{name}").is_dir() or (
        Path(datasets.config.HF_DATASETS_CACHE) / f"{organisation}___{name}"
    ).is_dir()


def unavailable_paper_tasks(tasks: Sequence[str]) -> dict[str, str]:
    """{task: reason} for the requested hub tasks that cannot run here (dataset not cached, hub unreachable)."""
    uncached = {task: PAPER_TASK_DATASETS[task] for task in tasks if task in PAPER_TASK_DATASETS}
    uncached = {task: dataset for task, dataset in uncached.items() if not _dataset_cached(dataset)}
    if not uncached or _hub_reachable():
        return {}
    return {
        task: f"{task}: dataset {dataset} is not cached and the Hugging Face hub is unreachable"
        for task, dataset in uncached.items()
    }


def _answer_nll(sample: dict[str, Any], output_type: str) -> float | None:
    """-log p(correct answer) of one lm-eval sample (its filtered responses), None for generation tasks."""
    responses = sample["filtered_resps"]
    if output_type == "multiple_choice":
        return -responses[int(sample["target"])][0]
    if output_type == "loglikelihood":
        return -responses[0][0]
    if output_type == "loglikelihood_rolling":
        return -responses[0]
    return None


def _aggregation(metric: str, config: dict[str, Any]) -> Callable[[list[Any]], float]:
    """The task's aggregation of `metric` (its metric_list, else lm-eval's default for the metric, else the mean)."""
    from lm_eval.api.registry import get_aggregation, get_metric_aggregation

    for entry in config.get("metric_list") or []:
        if entry.get("metric") == metric and entry.get("aggregation"):
            aggregation = entry["aggregation"]
            return aggregation if callable(aggregation) else get_aggregation(aggregation)
    return get_metric_aggregation(metric) or (lambda values: float(np.mean(values)))


def _task_metrics(results: dict[str, Any], samples: list[dict[str, Any]], config: dict[str, Any],
                  bootstrap_samples: int, bootstrap_seed: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """lm-eval's metric values of one task (filter suffix and stderr dropped), `nll`, 95% intervals over items
    (`<metric>_lo`, `<metric>_hi`) and, for multiple choice, `chance`; and each metric's bootstrap replicates
    (its value on every resample of the items, for paired comparisons)."""
    output_type = config["output_type"]
    metrics = {
        key.split(",")[0]: float(value) for key, value in results.items()
        if "," in key and "_stderr" not in key and isinstance(value, (int, float))
    }
    per_item = {name: [sample[name] for sample in samples] for name in list(metrics) if all(name in s for s in samples)}
    nlls = [nll for sample in samples if (nll := _answer_nll(sample, output_type)) is not None]
    if nlls:
        metrics["nll"] = float(np.mean(nlls))
        per_item["nll"] = nlls
    replicates = {}
    for name, items in per_item.items():
        statistic = None if name == "nll" else _aggregation(name, config)
        replicates[name] = bootstrap_replicates(items, statistic, bootstrap_samples, bootstrap_seed)
        metrics[f"{name}_lo"], metrics[f"{name}_hi"] = percentile_interval(replicates[name])
    if output_type == "multiple_choice" and samples:
        metrics["chance"] = float(np.mean([1 / len(sample["filtered_resps"]) for sample in samples]))
    return metrics, {name: values.tolist() for name, values in replicates.items()}


@quiet_third_party()  # lm-eval's request bars, its warnings about model objects; truncations summarised
def run_lm_eval(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str],
    tasks_dir: str | Path | None, limit: int | None, batch_size: int, bootstrap_samples: int = 1000,
    bootstrap_seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval tasks on an in-memory model: {"tasks": {task: {metric: value}}, "skipped": {task: reason},
    "replicates": {task: {metric: [value on each bootstrap resample of the items]}}, "items": {task: items}}.

    Our tasks come from `tasks_dir` (a folder written by `build_offline_tasks`); lm-eval's own
    task index (seconds to load) is read only when a hub task is requested and can run.
    """
    check_tasks(tasks, tasks_dir)
    skipped = unavailable_paper_tasks(tasks)
    runnable = [task for task in tasks if task not in skipped]
    if not runnable:
        return {"tasks": {}, "skipped": skipped, "replicates": {}, "items": {}}
    ours = [task for task in runnable if task in TASK_NAMES]

    import lm_eval  # heavy import (~10 s), paid only when tasks run
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir) if ours else None, include_defaults=len(ours) < len(runnable))
    with _eval_mode(model):
        output = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
            tasks=list(runnable), task_manager=manager, limit=limit, log_samples=True,
            bootstrap_iters=0,  # no stderr: it would cost more than the evaluation of small tasks
            random_seed=None, numpy_random_seed=None, torch_random_seed=None,  # leave the caller's RNGs alone
        )
    metrics = {
        task: _task_metrics(output["results"][task], output["samples"][task], output["configs"][task],
                            bootstrap_samples, bootstrap_seed)
        for task in runnable
    }
    return {"tasks": {task: values for task, (values, _) in metrics.items()}, "skipped": skipped,
            "replicates": {task: replicates for task, (_, replicates) in metrics.items()},
            "items": {task: len(output["samples"][task]) for task in runnable}}


# ----- checkpoints -----------------------------------------------------------------------------
def _weight_files(checkpoint_dir: Path) -> list[Path]:
    return sorted(checkpoint_dir.glob("*.safetensors"))


def check_checkpoint_folder(checkpoint_dir: str | Path) -> None:
    """Raise EvaluationError naming what is missing when `checkpoint_dir` is not a complete checkpoint, and
    CheckpointError naming the file when one differs from the digest recorded when it was written (every path
    that loads a checkpoint for evaluation, the flow's and the command line's, comes through here)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise EvaluationError(f"{folder} is not a folder")
    missing = [name for name in ("config.json", CHECKPOINT_META) if not (folder / name).is_file()]
    if not _weight_files(folder):
        missing.append("model.safetensors")
    if missing:
        raise EvaluationError(
            f"{folder} is not a checkpoint folder: missing {', '.join(missing)} "
            "(expected a folder written by cocomix_core.training.checkpoints.save_checkpoint)"
        )
    try:  # header-only: an invalid config.json or a truncated weight file is named here, not deep in transformers
        check_model_folder(folder)
    except ModelFolderError as error:
        raise EvaluationError(str(error)) from None
    verify_checkpoint(folder)  # what headers cannot show: weights altered in place, same size


def load_checkpoint(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """The model of a checkpoint folder (NTP or CoCoMix) on `device`, after checking its vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import cocomix_core.model.modeling_cocomix  # noqa: F401  registers CoCoMix with the Auto classes

    check_checkpoint_folder(checkpoint_dir)
    config = AutoConfig.from_pretrained(checkpoint_dir)
    tokenizer_ids = len(checkpoint_tokenizer(checkpoint_dir))
    if config.vocab_size < tokenizer_ids:
        raise EvaluationError(
            f"{checkpoint_dir}: config.vocab_size={config.vocab_size} is smaller than its tokenizer's "
            f"{tokenizer_ids} ids; this checkpoint cannot score that tokenizer's tokens"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)
    except (OSError, RuntimeError, ValueError) as error:  # e.g. a config.json that does not describe the weights
        raise EvaluationError(f"{checkpoint_dir}: cannot load the model ({str(error).strip().splitlines()[0]})") from None
    return model.to(device)


def checkpoint_tokenizer(checkpoint_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved inside a checkpoint folder (the data's: GPT-2's or the teacher's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint_dir))


def evaluation_key(checkpoint_dir: Path, tasks_dir: Path | None, eval_settings: EvalSettings, block_size: int) -> dict[str, Any]:
    """Everything evaluation results depend on: weights, task data, eval settings, block size."""
    uses_our_tasks = any(task in TASK_NAMES for task in eval_settings.tasks)
    return {
        "format": RESULTS_FORMAT,
        "weights_sha256": {path.name: sha256_file(path) for path in _weight_files(checkpoint_dir)},
        "tasks_digest": tasks_digest(tasks_dir) if uses_our_tasks else None,
        "eval": eval_settings.model_dump(),
        "block_size": block_size,
    }


def _stored_results(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return stored if stored.get("key") == key else None


def tracker_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The flat eval/... metrics of one checkpoint's results (names in the module docstring)."""
    val = results["val"]
    metrics = {f"eval/val_{name}": val[name] for name in ("loss", "loss_lo", "loss_hi", "ppl", "ppl_lo", "ppl_hi")}
    metrics["eval/tokens_seen"] = float(results["tokens_seen"])
    metrics.update({f"eval/{name}": float(value) for name, value in results["model"].items()})
    for task, values in results["tasks"].items():
        metrics.update({f"eval/{task}/{name}": value for name, value in values.items()})
    return metrics


def tracker_replicates(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each metric's bootstrap replicates under its tracker name: {name: {"items": n, "replicates": [...]}}.

    Two checkpoints evaluated with the same items, bootstrap samples and seed resample the same item
    indices in the same order, so their replicates pair up (a paired bootstrap, SPEC §10).
    """
    val = results["val"]
    windows = len(val["window_losses"])
    replicates = {
        "eval/val_loss": {"items": windows, "replicates": val["loss_replicates"]},
        "eval/val_ppl": {"items": windows, "replicates": [math.exp(loss) for loss in val["loss_replicates"]]},
    }
    for task, by_metric in results["replicates"].items():
        replicates.update({f"eval/{task}/{name}": {"items": results["items"][task], "replicates": values}
                           for name, values in by_metric.items()})
    return replicates


@quiet_third_party()  # transformers' "Loading weights" bar, and one truncation summary per checkpoint
def evaluate_checkpoint(
    checkpoint_dir: str | Path, data_dir: str | Path, tasks_dir: str | Path | None, eval_settings: EvalSettings,
    block_size: int, tracker: Tracker | None = None, device: str | None = None, force: bool = False,
) -> dict[str, Any]:
    """Evaluate one checkpoint; results go to <checkpoint>/eval_results.json and to `tracker` at its step.

    Results already stored under the same `evaluation_key` are returned as they are (and not logged
    again) unless `force`.
    """
    from cocomix_core.data.corpus import load_split

    checkpoint_dir = Path(checkpoint_dir)
    check_checkpoint_folder(checkpoint_dir)
    check_tasks(eval_settings.tasks, tasks_dir)
    tasks_dir = Path(tasks_dir) if tasks_dir is not None else None
    key = evaluation_key(checkpoint_dir, tasks_dir, eval_settings, block_size)
    results_path = checkpoint_dir / RESULTS_FILE
    if not force and (stored := _stored_results(results_path, key)) is not None:
        return stored

    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = checkpoint_info(checkpoint_dir)
    model = load_checkpoint(checkpoint_dir, device)
    if block_size > model.config.n_positions:
        raise EvaluationError(f"block_size={block_size} exceeds the checkpoint's n_positions={model.config.n_positions}")
    bootstrap = {"bootstrap_samples": eval_settings.bootstrap_samples, "bootstrap_seed": eval_settings.bootstrap_seed}
    val = validation_perplexity(
        model, load_split(data_dir, "val"), block_size, eval_settings.val_windows, eval_settings.batch_size, device,
        **bootstrap,
    )
    lm_eval_results = run_lm_eval(
        model, checkpoint_tokenizer(checkpoint_dir), eval_settings.tasks, tasks_dir, eval_settings.limit,
        eval_settings.batch_size, **bootstrap,
    )
    results = {
        "checkpoint": str(checkpoint_dir.resolve()),
        "step": info["step"],
        "tokens_seen": info.get("tokens_seen", 0),
        "kind": info.get("kind", model.config.model_type),
        "key": key,
        "val": val,
        "model": {"n_params": model.num_parameters(), "flops_per_token": flops_per_token(model.config, block_size)},
        **lm_eval_results,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(results_path, results)
    if tracker is not None:
        tracker.log_metrics(tracker_metrics(results), step=info["step"])
    return results


def sweep_checkpoints(
    arm_dirs: Mapping[str, str | Path], data_dir: str | Path, tasks_dir: str | Path | None,
    eval_settings: EvalSettings, block_size: int, trackers: Mapping[str, Tracker] | None = None,
    device: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Evaluate every complete checkpoint of every arm ({arm name: arm folder}), in step order.

    Resumable: checkpoints whose stored results still match are not evaluated again. Each arm logs to
    its own tracker (trackers[arm name]), so both arms' curves share the eval/... names.
    """
    trackers = trackers or {}
    return {
        arm: [
            evaluate_checkpoint(checkpoint, data_dir, tasks_dir, eval_settings, block_size, trackers.get(arm), device)
            for checkpoint in list_checkpoints(arm_dir)
        ]
        for arm, arm_dir in arm_dirs.items()
    }


# ----- command line ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """`python -m cocomix_core.evaluation.evaluator CHECKPOINT_DIR --data DIR`: evaluate one checkpoint, print JSON."""
    from cocomix_core.plumbing.errors import CocomixError
    from settings.cli import add_settings_arguments, settings_from_args

    parser = argparse.ArgumentParser(description="Evaluate a checkpoint: validation perplexity and lm-eval tasks.")
    parser.add_argument("checkpoint", help="checkpoint folder (…/checkpoints/step_000050)")
    parser.add_argument("--data", required=True, help="prepared data folder (val.bin, val_documents.jsonl)")
    parser.add_argument("--tasks-dir", help="offline task folder; default: built from --data into a temporary folder")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        with tempfile.TemporaryDirectory(prefix="cocomix-tasks-") as scratch:
            tasks_dir = args.tasks_dir
            if tasks_dir is None and any(task in TASK_NAMES for task in settings.eval.tasks):
                tasks_dir = build_offline_tasks(
                    args.data, Path(scratch) / "tasks", settings.data.offline_task_items, settings.data.split_seed
                )
            results = evaluate_checkpoint(args.checkpoint, args.data, tasks_dir, settings.eval, settings.data.block_size)
    except CocomixError as error:  # settings, data, checkpoint or tasks: one line naming it, no traceback
        sys.exit(f"error: {error}")
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
