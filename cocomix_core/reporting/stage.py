"""The `report` stage: every branch's checkpoint evaluations -> curves per training token, verdicts, plots;
and the concepts a person can look at (cards, concept prediction, steering).

    files = write_report(evaluations, out_dir, tracker, data.unigram_ppl)
    concepts = write_concepts_report(settings, storage, data, labels, evaluations, concepts_dir, tracker)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from cocomix_core.data.stage import PreparedData
from cocomix_core.plumbing.storage import Storage
from cocomix_core.training.stage import Checkpoint
from settings import Branch, ExperimentSettings

if TYPE_CHECKING:  # matplotlib and mlflow load inside the stage
    from cocomix_core.concepts.stage import Labels
    from cocomix_core.plumbing.tracking import MlflowTracker
    from cocomix_core.reporting.concepts_report import ConceptsFiles
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


def write_concepts_report(
    settings: ExperimentSettings, storage: Storage, data: PreparedData, labels: Labels,
    evaluations: Iterable[tuple[Branch, Checkpoint, dict[str, float], Any]], out_dir: Path, tracker: MlflowTracker,
) -> ConceptsFiles:
    """Concept cards, the CoCoMix branches' concept-prediction curves beside the frequency floor, and steering of
    the final checkpoint of the first CoCoMix branch that mixes concepts (SPEC §11); logged under `concepts/`."""
    from cocomix_core.concepts.labels import ConceptFiles
    from cocomix_core.data import corpus
    from cocomix_core.evaluation.concept_quality import FREQUENCY_METRIC, OVERLAP_METRIC
    from cocomix_core.evaluation.evaluator import load_checkpoint
    from cocomix_core.reporting import concepts_report

    cocomix = [(branch, checkpoint) for branch, checkpoint, *_ in evaluations if branch.kind == "cocomix"]
    overlap: dict[str, list[tuple[int, float]]] = {}
    for branch, checkpoint, metrics, _ in sorted(evaluations, key=lambda item: item[1].step):
        if OVERLAP_METRIC in metrics:
            overlap.setdefault(branch.name, []).append((checkpoint.tokens_seen, metrics[OVERLAP_METRIC]))
    mixing = [item for item in cocomix if settings.arms[item[0].arm].mix in ("insert", "add")]
    shown = _final_of_first_branch(mixing or cocomix)
    model, steered = None, ""
    if mixing:
        model = load_checkpoint(storage.materialize(shown[1].key))
        steered = f"{shown[0].name} {shown[1].name}"
    key = labels.concept_keys.get(settings.arms[shown[0].arm].label_selection) if shown else None
    data_dir = data.folder(storage)
    content = concepts_report.gather_concepts(
        ConceptFiles(storage.materialize(key)) if key else None, corpus.data_tokenizer(data_dir).hf(),
        settings.concepts, overlap, model, corpus.load_split(data_dir, "val"), steered,
    )
    files = concepts_report.write_concepts(content, out_dir)
    tracker.log_artifact(out_dir, "concepts")
    if content.floor is not None:
        tracker.log_metrics({FREQUENCY_METRIC: content.floor}, step=0)
    tracker.flush()
    return files


def _final_of_first_branch(items: list[tuple[Branch, Checkpoint]]) -> tuple[Branch, Checkpoint] | None:
    """The first branch's checkpoint of the highest step among (branch, checkpoint) pairs; None when there are none."""
    if not items:
        return None
    first = items[0][0].name
    return max((item for item in items if item[0].name == first), key=lambda item: item[1].step)
