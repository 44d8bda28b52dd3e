"""The `evaluate` stage: one published checkpoint's validation perplexity and lm-eval tasks (SPEC §6).

    metrics, replicates = evaluate_checkpoint_job(settings, storage, data, checkpoint, parallel_tasks=1)
    log_evaluation(metrics, checkpoint, branch.name, branch_tracker, evaluation_tracker)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cocomix_core.data.stage import TASKS_DIR, PreparedData
from cocomix_core.plumbing.launch import threads_for
from cocomix_core.plumbing.storage import Storage
from cocomix_core.training.stage import Checkpoint
from settings import ExperimentSettings

if TYPE_CHECKING:  # mlflow loads inside the steps that log
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
    from cocomix_core.training.checkpoints import verify_checkpoint
    from cocomix_core.training.trainer import set_threads

    set_threads(threads_for(settings, "evaluate", parallel_tasks))
    folder = storage.materialize(checkpoint.key)
    verify_checkpoint(folder)  # a checkpoint altered since it was written is refused, naming the file
    data_dir = data.folder(storage)
    results = evaluate.evaluate_checkpoint(folder, data_dir, data_dir / TASKS_DIR, settings.eval, settings.data.block_size)
    return evaluate.tracker_metrics(results), evaluate.tracker_replicates(results)


def log_evaluation(
    metrics: dict[str, float], checkpoint: Checkpoint, branch_name: str, branch_tracker: MlflowTracker,
    evaluation_tracker: MlflowTracker,
) -> None:
    """Log a checkpoint's metrics at its step: in the branch's run (MLflow's compare view charts the arms on one
    axis) and, prefixed by the branch, in the evaluation run that groups them all."""
    branch_tracker.log_metrics(metrics, step=checkpoint.step)
    evaluation_tracker.log_metrics({f"{branch_name}/{name}": value for name, value in metrics.items()},
                                   step=checkpoint.step)
    branch_tracker.flush()
    evaluation_tracker.flush()
