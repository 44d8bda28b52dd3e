"""The `report` stage: every branch's checkpoint evaluations -> curves per training token, verdicts, plots.

    files = write_report(evaluations, out_dir, tracker, data.unigram_ppl)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from cocomix_core.training.stage import Checkpoint
from settings import Branch

if TYPE_CHECKING:  # matplotlib and mlflow load inside the stage
    from cocomix_core.plumbing.tracking import MlflowTracker
    from cocomix_core.reporting.report import ReportFiles


def report_arm(branch: Branch) -> str:
    """What the report aggregates a branch's seeds under: its arm, and its λ when a λ sweep names it
    (`cocomix-s1-lam0.1` -> `cocomix-lam0.1`: seeds of one λ are one estimate, different λ are not)."""
    lam = f"-lam{branch.lam_concept:g}"
    return branch.arm + lam if branch.name.endswith(lam) else branch.arm


def write_report(
    evaluations: Iterable[tuple[Branch, Checkpoint, dict[str, float], dict[str, dict[str, Any]]]], out_dir: Path,
    tracker: MlflowTracker, unigram_ppl: float | None,
) -> ReportFiles:
    """Curves per training token, verdicts, tokens-to-match, tables and plots into `out_dir`, logged under `report/`;
    each branch's headline curves (val ppl, task metrics) also go into the tracker's run at step = training tokens.

    An evaluation is (branch, checkpoint, metrics, bootstrap replicates) as `evaluate_checkpoint_job` returns them;
    `unigram_ppl` is the prepared data's unigram floor (`PreparedData.unigram_ppl`)."""
    from cocomix_core.plumbing.tracking import log_branch_curves
    from cocomix_core.reporting import report

    jobs = ((dict(branch=branch.model_dump() | {"arm": report_arm(branch)}, step=checkpoint.step,
                  tokens_seen=checkpoint.tokens_seen), metrics, replicates)
            for branch, checkpoint, metrics, replicates in evaluations)
    curves = report.curves_from_results(jobs)
    written = report.write_report(curves, out_dir, unigram_ppl)
    headline = [report.VAL_PPL, *report.task_metrics(curves)]
    log_branch_curves(tracker.run_id, {
        curve.name: [(point.tokens_seen, {name: point.metrics[name] for name in headline if name in point.metrics})
                     for point in curve.points]
        for curve in curves
    }, tracker.client.tracking_uri)
    tracker.log_artifact(out_dir, "report")
    tracker.log_metrics({f"report/{name}": value for name, value in written.summary.items()}, step=0)
    tracker.flush()
    return written
