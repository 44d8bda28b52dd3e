"""The `evaluate` stage: one published checkpoint's validation perplexity and lm-eval tasks (SPEC §6).

    metrics, replicates = evaluate_checkpoint_job(settings, storage, data, checkpoint, parallel_tasks=1)
    metrics |= concept_prediction_job(settings, storage, data, labels, branch, checkpoint)
    model_id = checkpoint_model_id(settings, branch, checkpoint, experiment_id, branch_run_id, parent_run_id, uri)
    log_evaluation(metrics, checkpoint, branch.name, branch_tracker, evaluation_tracker, model_id=model_id)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cocomix_core.data.stage import TASKS_DIR, PreparedData
from cocomix_core.plumbing.launch import threads_for
from cocomix_core.plumbing.storage import Storage
from cocomix_core.training.stage import Checkpoint
from settings import Branch, ExperimentSettings

if TYPE_CHECKING:  # mlflow loads inside the steps that log
    from cocomix_core.concepts.stage import Labels
    from cocomix_core.plumbing.tracking import MlflowTracker


def evaluate_checkpoint_job(
    settings: ExperimentSettings, storage: Storage, data: PreparedData, checkpoint: Checkpoint, parallel_tasks: int
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Validation perplexity and the lm-eval tasks of one checkpoint, as tracker metrics (`eval/...`), and each
    metric's bootstrap replicates over the validation windows / task items (`evaluator.tracker_replicates`),
    which the report pairs with the other arms' for one-seed verdicts.

    `parallel_tasks` evaluations share this machine's cores.
    """
    from cocomix_core.evaluation import evaluator as evaluate
    from cocomix_core.training.trainer import set_threads

    set_threads(threads_for(settings, "evaluate", parallel_tasks))
    folder = storage.materialize(checkpoint.key)
    data_dir = data.folder(storage)
    results = evaluate.evaluate_checkpoint(folder, data_dir, data_dir / TASKS_DIR, settings.eval, settings.data.block_size)
    return evaluate.tracker_metrics(results), evaluate.tracker_replicates(results)


def checkpoint_model_id(
    settings: ExperimentSettings, branch: Branch, checkpoint: Checkpoint, experiment_id: str, branch_run_id: str,
    parent_run_id: str, tracking_uri: str,
) -> str:
    """The checkpoint as an MLflow LoggedModel (created once): the branch's run its source, the arm's settings its
    params, and tags to find and compare it by (branch, kind, seed, λ, step, tokens seen, the flow's MLflow run)."""
    from cocomix_core.plumbing.keys import branch_params
    from cocomix_core.plumbing.tracking import checkpoint_model

    tags = {"branch": branch.name, "arm": branch.arm, "kind": branch.kind, "seed": branch.seed,
            "lambda": branch.lam_concept, "step": checkpoint.step, "tokens_seen": checkpoint.tokens_seen,
            "experiment_run": parent_run_id}
    return checkpoint_model(experiment_id, branch_run_id, checkpoint.uri, tags, branch_params(settings, branch),
                            name=f"{branch.name}-{checkpoint.name}", tracking_uri=tracking_uri)


def log_evaluation(
    metrics: dict[str, float], checkpoint: Checkpoint, branch_name: str, branch_tracker: MlflowTracker,
    evaluation_tracker: MlflowTracker, model_id: str | None = None,
) -> None:
    """Log a checkpoint's metrics at its step in the branch's run (as the metrics of its LoggedModel `model_id`),
    again as `by_tokens/...` at its training tokens (the MLflow chart view then draws every branch on one token
    axis), and, prefixed by the branch, in the evaluation run that groups them all."""
    branch_tracker.log_metrics(metrics, step=checkpoint.step, model_id=model_id)
    branch_tracker.log_metrics({f"by_tokens/{name}": value for name, value in metrics.items()},
                               step=checkpoint.tokens_seen)
    evaluation_tracker.log_metrics({f"{branch_name}/{name}": value for name, value in metrics.items()},
                                   step=checkpoint.step)
    branch_tracker.flush()
    evaluation_tracker.flush()


def concept_prediction_job(
    settings: ExperimentSettings, storage: Storage, data: PreparedData, labels: Labels, branch: Branch,
    checkpoint: Checkpoint,
) -> dict[str, float]:
    """`eval/concept_topk_overlap` of a CoCoMix checkpoint on the validation windows evaluation scores (SPEC §11);
    {} for other branches, or when the label cache holds no validation labels (labels extracted online)."""
    from cocomix_core.concepts.labels import ConceptFiles
    from cocomix_core.data.corpus import load_split
    from cocomix_core.data.windows import validation_windows
    from cocomix_core.evaluation.concept_quality import (
        OVERLAP_METRIC,
        checkpoint_overlap,
    )
    from cocomix_core.evaluation.evaluator import load_checkpoint

    key = labels.concept_keys.get(settings.arms[branch.arm].label_selection) if branch.kind == "cocomix" else None
    val_labels = ConceptFiles(storage.materialize(key)).val_labels() if key else None
    if val_labels is None:
        return {}
    windows = validation_windows(load_split(data.folder(storage), "val"), settings.data.block_size, len(val_labels))
    model = load_checkpoint(storage.materialize(checkpoint.key))
    return {OVERLAP_METRIC: checkpoint_overlap(model, windows, val_labels, settings.eval.batch_size)}
