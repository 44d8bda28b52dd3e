"""The experiment's report: per-token curves of every branch, verdicts, tokens-to-match, a table and plots.

Input is one `BranchCurve` per training branch: its checkpoint evaluations ordered by training
tokens, with metrics named as in `tracking` (`eval/val_ppl`, `eval/<task>/<metric>`) and, per metric,
its bootstrap replicates over the validation windows / task items (`evaluator.tracker_replicates`).

Pairing rule (seeds and λ sweeps): every non-NTP branch (CoCoMix, KD, pause) is compared with the
NTP branch of the same seed. When no NTP branch has that seed but exactly one NTP branch exists,
that one is the reference; otherwise the branch is left unpaired (listed in the table, not matched).

Claims (SPEC §10), at the final checkpoints, per arm (its seeds together) against its reference arm:
- the paired difference (arm − reference) alone decides: with ≥ 2 seeds the t-interval of the
  per-seed differences, with 1 seed the paired bootstrap (the same resamples of the shared validation
  windows / task items for both arms). "better"/"worse" iff its 95% interval excludes 0, otherwise
  "no detectable difference", printed with the interval and the smallest difference the study could
  have detected (intervals.min_detectable_difference); "no interval" when nothing can be paired;
- "degenerate" whatever the difference when both arms are at the level of a model that learned
  nothing: validation perplexity above 0.8 × the unigram floor (data/unigram.py), or an accuracy at
  or below chance (the logged `eval/<task>/chance`, else 0);
- each arm's own value and interval (t-interval across seeds; the logged bootstrap `<metric>_lo/_hi`
  for one seed) are printed for reading, never for deciding;
- tokens-to-match savings are stated only for better/worse arms, with their t-interval across seeds.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from matplotlib.figure import Figure  # the object API: Agg, no pyplot, no display

from cocomix_core.evaluation.intervals import (
    Interval,
    PairedDifference,
    paired_difference_from_replicates,
    paired_t_difference,
    t_interval,
)
from cocomix_core.plumbing.files import atomic_path, write_json_atomic

VAL_PPL = "eval/val_ppl"
EVAL_PREFIX = "eval/"
TRAINING_VAL_PPL_PLOT = "training_val_ppl.png"
# Metric names whose value falls as the model improves; every other metric (acc, ...) rises.
_LOWER_IS_BETTER_WORDS = ("ppl", "perplexity", "loss", "nll", "bits_per_byte")
INTERVAL_SUFFIXES = ("_lo", "_hi")
CHANCE_METRIC = "chance"
Claim = Literal["better", "worse", "no detectable difference", "degenerate", "no interval"]
ArmKind = Literal["ntp", "cocomix", "kd", "pause"]


@dataclass(frozen=True)
class EvalPoint:
    """The evaluation of one checkpoint; `replicates` pair it with other arms' (not written to report.json)."""

    step: int
    tokens_seen: int
    metrics: dict[str, float]
    replicates: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class BranchCurve:
    """One training branch's checkpoint evaluations (sorted by tokens), plus its optional
    validation perplexity during training as (tokens, ppl) pairs."""

    name: str
    kind: ArmKind
    points: list[EvalPoint]
    seed: int | None = None
    lam_concept: float | None = None
    training_val_ppl: list[tuple[int, float]] = field(default_factory=list)
    arm: str = ""  # the settings arm this branch runs (seeds of one arm are aggregated); default: the name

    def __post_init__(self) -> None:
        self.points = sorted(self.points, key=lambda point: point.tokens_seen)
        self.arm = self.arm or self.name

    def values(self, metric: str) -> list[tuple[int, float]]:
        """(tokens, value) of every checkpoint that measured `metric`."""
        return [(point.tokens_seen, point.metrics[metric]) for point in self.points if metric in point.metrics]

    def to_dict(self) -> dict[str, Any]:
        """The curve for report.json, without the bootstrap replicates (thousands of numbers per checkpoint)."""
        data = dataclasses.asdict(self)
        for point in data["points"]:
            del point["replicates"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BranchCurve":
        fields = dict(data, points=[EvalPoint(**point) for point in data["points"]])
        fields["training_val_ppl"] = [tuple(pair) for pair in data.get("training_val_ppl", [])]
        return cls(**fields)


@dataclass(frozen=True)
class TokensToMatch:
    """Training tokens the candidate needs to reach the reference's final value of `metric`."""

    reference: str
    candidate: str
    metric: str
    lower_is_better: bool
    target_value: float
    reference_tokens: int
    candidate_tokens: float | None  # None: not reached within the candidate's evaluated tokens
    candidate_tokens_evaluated: int
    saving_fraction: float | None  # 1 - candidate_tokens / reference_tokens (the paper's "21.5% fewer")
    claim: Claim = "no interval"  # at the final checkpoints; the saving is stated only for better/worse


@dataclass(frozen=True)
class ReportFiles:
    """What `write_report` wrote, and the headline numbers for MLflow (`report/<name>`)."""

    json_path: Path
    markdown_path: Path
    html_path: Path
    plots: list[Path]
    summary: dict[str, float]


def curves_from_results(
    results: Iterable[tuple[dict[str, Any], dict[str, float], dict[str, dict[str, Any]]]],
) -> list[BranchCurve]:
    """Group (evaluation job, metrics, replicates) triples into one curve per branch.

    A job is `{"branch": {"name", "kind", "seed", "lam_concept", ...}, "step", "tokens_seen", ...}`;
    metric names get the `eval/` prefix when they lack it.
    """
    branches: dict[str, dict[str, Any]] = {}
    points: dict[str, list[EvalPoint]] = defaultdict(list)

    def prefixed(values: dict[str, Any]) -> dict[str, Any]:
        return {name if name.startswith(EVAL_PREFIX) else EVAL_PREFIX + name: value for name, value in values.items()}

    for job, metrics, replicates in results:
        branch = branches.setdefault(job["branch"]["name"], job["branch"])
        points[branch["name"]].append(
            EvalPoint(int(job["step"]), int(job["tokens_seen"]), prefixed(metrics), prefixed(replicates)))
    return [
        BranchCurve(
            name=name, kind=branch["kind"], points=points[name], seed=branch.get("seed"),
            # NTP branches carry their arm's unused λ; it means nothing there
            lam_concept=branch.get("lam_concept") if branch["kind"] == "cocomix" else None,
            arm=branch.get("arm", name),
        )
        for name, branch in branches.items()
    ]


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of `metric` mean a better model (perplexities, losses, NLLs)."""
    last = metric.rsplit("/", 1)[-1]
    return any(word in last for word in _LOWER_IS_BETTER_WORDS)


def task_metrics(curves: Iterable[BranchCurve]) -> list[str]:
    """The `eval/<task>/<metric>` names any curve measured, sorted (standard errors left out)."""
    names = {
        name for curve in curves for point in curve.points for name in point.metrics
        if name.startswith(EVAL_PREFIX) and name.count("/") >= 2 and not name.endswith(("_stderr", *INTERVAL_SUFFIXES))
        and name.rsplit("/", 1)[-1] != CHANCE_METRIC
    }
    return sorted(names)


def tokens_to_match(
    reference: BranchCurve, candidate: BranchCurve, metric: str = VAL_PPL, lower_is_better: bool = True,
    claim: Claim | None = None,
) -> TokensToMatch:
    """Tokens the candidate needs to reach the reference's value at its final checkpoint.

    Interpolation rule: walk the candidate's checkpoints in token order and find the first one
    whose value reaches the target (<= when lower is better, >= otherwise). If it is the first
    checkpoint, its tokens are the answer (nothing is assumed before it). Otherwise the answer is
    the linear interpolation of tokens between it and the previous checkpoint on the
    (tokens, metric) line: t = t0 + (target - v0) * (t1 - t0) / (v1 - v0). A target never reached
    gives None: the curve is not extrapolated. `claim`: the arms' SPEC §10 claim; None: the two branches'.
    """
    reference_values = reference.values(metric)
    if not reference_values:
        raise ValueError(f"reference branch {reference.name!r} has no {metric!r}")
    reference_tokens, target = reference_values[-1]
    candidate_values = candidate.values(metric)
    crossing = _first_crossing(candidate_values, target, lower_is_better)
    if claim is None:
        claim = compare([reference], [candidate], metric).claim if candidate_values else "no interval"
    return TokensToMatch(
        reference=reference.name, candidate=candidate.name, metric=metric, lower_is_better=lower_is_better,
        target_value=target, reference_tokens=reference_tokens, candidate_tokens=crossing,
        candidate_tokens_evaluated=candidate_values[-1][0] if candidate_values else 0,
        saving_fraction=None if crossing is None else 1.0 - crossing / reference_tokens, claim=claim,
    )


def _first_crossing(values: list[tuple[int, float]], target: float, lower_is_better: bool) -> float | None:
    def reached(value: float) -> bool:
        return value <= target if lower_is_better else value >= target

    for index, (tokens, value) in enumerate(values):
        if reached(value):
            if index == 0:
                return float(tokens)
            previous_tokens, previous_value = values[index - 1]
            return previous_tokens + (target - previous_value) * (tokens - previous_tokens) / (value - previous_value)
    return None


def pair_branches(curves: list[BranchCurve]) -> list[tuple[BranchCurve, BranchCurve]]:
    """(NTP reference, candidate) pairs for every non-NTP branch, by the pairing rule in the module docstring."""
    references = [curve for curve in curves if curve.kind == "ntp"]
    pairs = []
    for candidate in (curve for curve in curves if curve.kind != "ntp"):
        same_seed = [reference for reference in references if reference.seed == candidate.seed]
        if same_seed:
            pairs.append((same_seed[0], candidate))
        elif len(references) == 1:
            pairs.append((references[0], candidate))
    return pairs


def match_all(curves: list[BranchCurve], unigram_ppl: float | None = None) -> list[TokensToMatch]:
    """Tokens-to-match of every pair, for validation perplexity and every task metric both measured; each carries
    its two arms' claim (all seeds together), so a saving is stated only where the arms' verdict allows."""
    arms = _by_arm(curves)
    claims: dict[tuple[str, str, str], Claim] = {}
    matches = []
    for reference, candidate in pair_branches(curves):
        shared = [metric for metric in task_metrics([reference]) if candidate.values(metric)]
        for metric in [VAL_PPL, *shared]:
            if reference.values(metric):
                key = (reference.arm, candidate.arm, metric)
                if key not in claims:
                    claims[key] = compare(arms[reference.arm], arms[candidate.arm], metric, unigram_ppl).claim
                matches.append(tokens_to_match(reference, candidate, metric, lower_is_better(metric), claims[key]))
    return matches


# ----- claims (SPEC §10) ----------------------------------------------------------------------
DEGENERATE_SHARE = 0.8  # a perplexity above 0.8 × the unigram floor is "near the unigram level"
NEXT_STEP = ("both arms are still near the unigram level, so this run cannot tell them apart: for a verdict, run "
             "the study whose students learn: python flows/cocomix_flow.py run --settings cpu_study")


@dataclass(frozen=True)
class Comparison:
    """Candidate vs reference arm on one metric at their final checkpoints: each arm's own interval (for reading),
    the paired difference candidate − reference (for deciding; None when it has no interval) and the claim."""

    metric: str
    reference: Interval
    candidate: Interval
    difference: PairedDifference | None
    claim: Claim


def _final_point(curve: BranchCurve, metric: str) -> EvalPoint | None:
    measured = [point for point in curve.points if metric in point.metrics]
    return measured[-1] if measured else None


def estimate(curves: list[BranchCurve], metric: str) -> Interval | None:
    """An arm's final value of `metric` with its own 95% interval (module docstring); None when unmeasured."""
    finals = [point.metrics for curve in curves if (point := _final_point(curve, metric)) is not None]
    if not finals:
        return None
    if len(finals) > 1:
        return t_interval([final[metric] for final in finals])
    final = finals[0]
    return Interval(final[metric], final.get(metric + "_lo"), final.get(metric + "_hi"))


def seed_pairs(references: list[BranchCurve], candidates: list[BranchCurve]) -> list[tuple[BranchCurve, BranchCurve]]:
    """(reference, candidate) branches of the same seed; two arms of one branch each pair whatever their seeds."""
    by_seed = {curve.seed: curve for curve in references}
    pairs = [(by_seed[curve.seed], curve) for curve in candidates if curve.seed in by_seed]
    if not pairs and len(references) == len(candidates) == 1:
        pairs = [(references[0], candidates[0])]
    return pairs


def paired_difference(references: list[BranchCurve], candidates: list[BranchCurve], metric: str) -> PairedDifference | None:
    """candidate − reference at the final checkpoints: the t-interval of the per-seed differences with ≥ 2 seeds, the
    paired bootstrap of one seed's replicates (same windows/items, same resamples) otherwise; None without either."""
    finals = [(reference_point, candidate_point) for reference, candidate in seed_pairs(references, candidates)
              if (reference_point := _final_point(reference, metric)) is not None
              and (candidate_point := _final_point(candidate, metric)) is not None]
    if len(finals) > 1:
        return paired_t_difference([ref.metrics[metric] for ref, _ in finals], [cand.metrics[metric] for _, cand in finals])
    if not finals:
        return None
    ((reference, candidate),) = finals
    ours, theirs = candidate.replicates.get(metric), reference.replicates.get(metric)
    if ours is None or theirs is None or ours["items"] != theirs["items"] or len(ours["replicates"]) != len(theirs["replicates"]):
        return None  # not evaluated on the same windows/items with the same resamples: nothing to pair
    return paired_difference_from_replicates(candidate.metrics[metric] - reference.metrics[metric],
                                             theirs["replicates"], ours["replicates"], ours["items"])


def _chance(curves: list[BranchCurve], metric: str) -> float:
    task_prefix = metric.rsplit("/", 1)[0]
    finals = [point.metrics for curve in curves if (point := _final_point(curve, metric)) is not None]
    return max((final.get(f"{task_prefix}/{CHANCE_METRIC}", 0.0) for final in finals), default=0.0)


def degenerate(metric: str, reference: float, candidate: float, chance: float, unigram_ppl: float | None) -> bool:
    """Whether both arms are at the level of a model that learned nothing: validation perplexity above
    DEGENERATE_SHARE × the unigram floor, or an accuracy-like metric at or below chance."""
    if metric == VAL_PPL:
        return unigram_ppl is not None and min(reference, candidate) > DEGENERATE_SHARE * unigram_ppl
    return not lower_is_better(metric) and max(reference, candidate) <= chance


def compare(references: list[BranchCurve], candidates: list[BranchCurve], metric: str,
            unigram_ppl: float | None = None) -> Comparison:
    """The SPEC §10 claim for candidate vs reference arm (each a list of seed branches) on `metric`: better/worse
    iff the paired difference's 95% interval excludes 0, unless both arms are degenerate."""
    reference, candidate = estimate(references, metric), estimate(candidates, metric)
    if reference is None or candidate is None:
        raise ValueError(f"{metric!r} is not measured by both arms")
    difference = paired_difference(references, candidates, metric)
    claim: Claim
    if degenerate(metric, reference.value, candidate.value, _chance(references + candidates, metric), unigram_ppl):
        claim = "degenerate"
    elif difference is None:
        claim = "no interval"
    elif difference.excludes_zero:
        claim = "better" if (difference.value < 0) == lower_is_better(metric) else "worse"
    else:
        claim = "no detectable difference"
    return Comparison(metric, reference, candidate, difference, claim)


def _by_arm(curves: list[BranchCurve]) -> dict[str, list[BranchCurve]]:
    arms: dict[str, list[BranchCurve]] = defaultdict(list)
    for curve in curves:
        arms[curve.arm].append(curve)
    return dict(arms)


def arm_pairs(curves: list[BranchCurve]) -> list[tuple[str, str]]:
    """(reference arm, candidate arm): every arm against the NTP arm, and CoCoMix-kind arms after the first CoCoMix
    arm (the ablations) also against that one."""
    kinds = {curve.arm: curve.kind for curve in curves}
    ntp = next((name for name, kind in kinds.items() if kind == "ntp"), None)
    cocomix = next((name for name, kind in kinds.items() if kind == "cocomix"), None)
    pairs = [(ntp, name) for name in kinds if ntp is not None and name != ntp]
    return pairs + [(cocomix, name) for name, kind in kinds.items() if cocomix and kind == "cocomix" and name != cocomix]


def tokens_to_match_across_seeds(references: list[BranchCurve], candidates: list[BranchCurve],
                                 metric: str) -> dict[str, Any]:
    """The candidate's saving (1 − tokens to reach the reference's final value / the reference's tokens), seed by
    seed, with its t-interval across seeds when every seed (≥ 2) reached the target."""
    matches = [tokens_to_match(reference, candidate, metric, lower_is_better(metric), claim="no interval")
               for reference, candidate in seed_pairs(references, candidates) if reference.values(metric)]
    savings = [match.saving_fraction for match in matches if match.saving_fraction is not None]
    saving = None
    if savings and len(savings) == len(matches):
        saving = dataclasses.asdict(t_interval(savings) if len(savings) > 1 else Interval(savings[0], None, None))
    return {"seeds": len(matches), "seeds_reached": len(savings), "saving": saving}


def verdict_rows(curves: list[BranchCurve], metric: str = VAL_PPL, unigram_ppl: float | None = None) -> list[dict[str, Any]]:
    """One structured row per (arm, reference) of `arm_pairs`: both arms' values and own intervals, the paired
    difference with its interval and minimal detectable difference, the claim, tokens-to-match (better/worse
    only), and both arms' parameters and training FLOPs per token."""
    arms = _by_arm(curves)
    rows = []
    for reference, candidate in arm_pairs(curves):
        if estimate(arms[reference], metric) is None or estimate(arms[candidate], metric) is None:
            continue
        comparison = compare(arms[reference], arms[candidate], metric, unigram_ppl)
        difference = comparison.difference
        rows.append({
            "arm": candidate, "kind": arms[candidate][0].kind, "reference": reference, "metric": metric,
            "seeds": comparison.candidate.n, "arm_estimate": dataclasses.asdict(comparison.candidate),
            "reference_estimate": dataclasses.asdict(comparison.reference),
            "difference": dataclasses.asdict(difference) if difference else None,
            "min_detectable_difference": difference.min_detectable if difference else None,
            "claim": comparison.claim, "unigram_ppl": unigram_ppl if metric == VAL_PPL else None,
            "tokens_to_match": tokens_to_match_across_seeds(arms[reference], arms[candidate], metric)
            if comparison.claim in ("better", "worse") else None,
            **{f"{side}_{quantity}": _final_point(arms[name][0], metric).metrics.get(f"{EVAL_PREFIX}{quantity}")
               for side, name in (("arm", candidate), ("reference", reference))
               for quantity in ("n_params", "flops_per_token")},
        })
    return rows


def _interval_text(fields: dict[str, Any] | None) -> str:
    if fields is None:
        return "[no interval]"
    value, lo, hi = fields["value"], fields["lo"], fields["hi"]
    return f"{value:.4g}" + (f" [{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else " [no interval]")


def _size_text(params: float | None, flops: float | None) -> str:
    return f"{params:,.0f} parameters, {flops:.3g} training FLOPs/token" if params and flops else "size not logged"


def _claim_text(row: dict[str, Any]) -> str:
    claim, detectable = row["claim"], row["min_detectable_difference"]
    if claim in ("better", "worse"):
        return f"{claim} (the paired difference's 95% interval excludes 0)"
    if claim == "no detectable difference":
        return f"no detectable difference (smallest detectable difference {detectable:.4g}, 80% power)"
    if claim == "degenerate" and row["unigram_ppl"] is not None:
        floor = row["unigram_ppl"]
        return (f"degenerate: both arms near the unigram level (above {DEGENERATE_SHARE:g} × unigram ppl {floor:.4g} "
                f"= {DEGENERATE_SHARE * floor:.4g}), no comparison")
    if claim == "degenerate":
        return "degenerate: both arms at or below chance, no comparison"
    return "no paired interval: no claim"


def _tokens_text(row: dict[str, Any]) -> str:
    match = row["tokens_to_match"]
    if match is None:
        return ""
    if match["saving"] is None:
        return f" Reached {row['reference']}'s final value in {match['seeds_reached']} of {match['seeds']} seeds."
    saving = match["saving"]
    interval = (f" [{saving['lo']:.1%}, {saving['hi']:.1%}] across {saving['n']} seeds" if saving["lo"] is not None
                else " (1 seed)")
    return f" Reaches {row['reference']}'s final value with {saving['value']:.1%} fewer tokens{interval}."


def verdict_text(rows: list[dict[str, Any]]) -> list[str]:
    """The verdict as plain-language lines, one per row of `verdict_rows` (and NEXT_STEP when a perplexity
    comparison is degenerate)."""
    lines = []
    for row in rows:
        seeds = f"{row['seeds']} seeds: mean, t-interval" if row["seeds"] > 1 else "1 seed: bootstrap interval"
        method = f" ({row['difference']['method']})" if row["difference"] else ""
        detectable = (f"; smallest detectable difference {row['min_detectable_difference']:.4g}"
                      if row["claim"] in ("better", "worse") else "")
        lines.append(
            f"{row['arm']} vs {row['reference']}: {row['metric'].removeprefix(EVAL_PREFIX)} "
            f"{_interval_text(row['arm_estimate'])} vs {_interval_text(row['reference_estimate'])} ({seeds}); "
            f"paired difference {_interval_text(row['difference'])}{method}: {_claim_text(row)}{detectable}."
            f"{_tokens_text(row)} {row['arm']}: {_size_text(row['arm_n_params'], row['arm_flops_per_token'])}; "
            f"{row['reference']}: {_size_text(row['reference_n_params'], row['reference_flops_per_token'])}."
        )
    if any(row["claim"] == "degenerate" and row["metric"] == VAL_PPL for row in rows):
        lines.append(NEXT_STEP[0].upper() + NEXT_STEP[1:] + ".")
    return lines


def comparison_table(curves: list[BranchCurve]) -> list[dict[str, Any]]:
    """One row per branch: final tokens and val ppl, best val ppl, and each task metric at the final checkpoint."""
    tasks = task_metrics(curves)
    rows = []
    for curve in curves:
        final = curve.points[-1] if curve.points else EvalPoint(0, 0, {})
        val_ppl = [value for _, value in curve.values(VAL_PPL)]
        row = {
            "branch": curve.name, "kind": curve.kind, "seed": curve.seed, "lam_concept": curve.lam_concept,
            "final_step": final.step, "final_tokens": final.tokens_seen,
            "final_val_ppl": final.metrics.get(VAL_PPL), "best_val_ppl": min(val_ppl, default=None),
        }
        row.update({metric.removeprefix(EVAL_PREFIX): final.metrics.get(metric) for metric in tasks})
        rows.append(row)
    return rows


# ----- rendering ------------------------------------------------------------------------------
def _format_cell(column: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and "tokens" in column:
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _table_cells(table: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = list(dict.fromkeys(column for row in table for column in row))
    return headers, [[_format_cell(column, row.get(column)) for column in headers] for row in table]


def _match_cells(matches: list[TokensToMatch]) -> tuple[list[str], list[list[str]]]:
    headers = ["reference", "candidate", "metric", "target (reference final)", "reference tokens",
               "candidate tokens", "fewer tokens", "claim (SPEC §10)"]
    rows = []
    for match in matches:
        reached = match.candidate_tokens is not None
        stated = reached and match.claim in ("better", "worse")
        rows.append([
            match.reference, match.candidate, match.metric, _format_cell("", match.target_value),
            _format_cell("tokens", match.reference_tokens),
            _format_cell("tokens", match.candidate_tokens) if reached
            else f"not reached within {match.candidate_tokens_evaluated:,} (not extrapolated)",
            f"{match.saving_fraction:.1%}" if stated else "–",
            match.claim,
        ])
    return headers, rows


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def floor_text(unigram_ppl: float | None) -> str:
    """The unigram floor in words, for the report, the card and the end-of-run text."""
    if unigram_ppl is None:
        return "Unigram floor: not measured."
    return (f"Unigram floor: validation perplexity {unigram_ppl:.4g} from the training split's token frequencies "
            f"(add-one smoothed); a model that learned only frequencies scores this. Perplexities above "
            f"{DEGENERATE_SHARE:g} × floor = {DEGENERATE_SHARE * unigram_ppl:.4g} are near the unigram level.")


def to_markdown(table: list[dict[str, Any]], tokens_to_match: list[TokensToMatch], verdict: list[str] = (),
                unigram_ppl: float | None = None) -> str:
    """The report as Markdown: the verdict per arm and the unigram floor first, then tokens-to-match, then the
    per-branch table."""
    parts = ["# CoCoMix vs NTP", "", "## Verdict", ""]
    parts += [f"- {line}" for line in verdict] or ["No arm to compare with the NTP baseline."]
    parts += ["", floor_text(unigram_ppl)]
    parts += ["", "## Tokens to match the NTP baseline's final value", ""]
    parts.append(_markdown_table(*_match_cells(tokens_to_match)) if tokens_to_match else "No CoCoMix/NTP pair to compare.")
    parts += ["", "## Final checkpoints", "", _markdown_table(*_table_cells(table)), ""]
    return "\n".join(parts)


def plot_lines(series: dict[str, list[tuple[float, float]]], styles: dict[str, dict], ylabel: str, path: Path,
               floor: tuple[float, str] | None = None, title: str | None = None) -> Path:
    """One line per series against training tokens, written atomically; `floor`: (value, label) drawn as a
    horizontal dotted line (the unigram perplexity, or a frequency predictor's score)."""
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    for name, points in series.items():
        axes.plot([tokens for tokens, _ in points], [value for _, value in points], label=name, **styles.get(name, {}))
    if floor is not None:
        axes.axhline(floor[0], color="0.4", linestyle=":", label=floor[1])
    axes.set(xlabel="training tokens", ylabel=ylabel, title=title or ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png")
    return path


def _unigram_floor(unigram_ppl: float | None) -> tuple[float, str] | None:
    """The unigram perplexity as a plot's floor line."""
    return None if unigram_ppl is None else (unigram_ppl, f"unigram floor {unigram_ppl:.4g}")


def plot_curves(curves: list[BranchCurve], out_dir: str | Path, unigram_ppl: float | None = None) -> list[Path]:
    """One PNG per metric (val ppl, each task metric, training val ppl when given), one line per branch; the
    validation perplexity plots also draw the unigram floor (task perplexities are on other scales)."""
    out_dir = Path(out_dir)
    colors = [f"C{index % 10}" for index in range(len(curves))]
    styles = {
        curve.name: {"color": color, "marker": "o", "linestyle": "--" if curve.kind == "ntp" else "-"}
        for curve, color in zip(curves, colors)
    }
    paths = []
    for metric in [VAL_PPL, *task_metrics(curves)]:
        series = {curve.name: curve.values(metric) for curve in curves if curve.values(metric)}
        if series:
            file_name = metric.removeprefix(EVAL_PREFIX).replace("/", "__") + ".png"
            floor = _unigram_floor(unigram_ppl) if metric == VAL_PPL else None
            paths.append(plot_lines(series, styles, metric, out_dir / file_name, floor))
    training = {curve.name: curve.training_val_ppl for curve in curves if curve.training_val_ppl}
    if training:
        line_only = {name: dict(style, marker=None) for name, style in styles.items()}
        paths.append(plot_lines(training, line_only, "val/ppl during training", out_dir / TRAINING_VAL_PPL_PLOT,
                                _unigram_floor(unigram_ppl)))
    return paths


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(header)}</th>" for header in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_html(report: ReportFiles) -> str:
    """A self-contained HTML page (tables, plots inlined as base64 PNG), e.g. for a Metaflow `html` card."""
    content = json.loads(report.json_path.read_text())
    matches = [TokensToMatch(**match) for match in content["tokens_to_match"]]
    images = "".join(
        f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"></figure>'
        for path in report.plots
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>CoCoMix report</title><style>"
        "body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>"
        "<h1>CoCoMix vs NTP</h1><h2>Verdict</h2><ul>"
        + "".join(f"<li>{html.escape(line)}</li>" for line in content["verdict"])
        + f"</ul><p>{html.escape(floor_text(content['unigram_ppl']))}</p><h2>Tokens to match the NTP baseline's final value</h2>"
        f"{_html_table(*_match_cells(matches))}<h2>Final checkpoints</h2>{_html_table(*_table_cells(content['table']))}"
        f"<h2>Curves</h2>{images}</body></html>"
    )


def _summary(table: list[dict[str, Any]], matches: list[TokensToMatch], unigram_ppl: float | None) -> dict[str, float]:
    """Headline numbers as MLflow metrics: final val ppl per branch, tokens-to-match of val ppl per pair, the
    unigram floor."""
    summary = {f"{row['branch']}/final_val_ppl": row["final_val_ppl"] for row in table if row["final_val_ppl"] is not None}
    if unigram_ppl is not None:
        summary["unigram_val_ppl"] = unigram_ppl
    for match in matches:
        if match.metric == VAL_PPL and match.saving_fraction is not None and match.claim in ("better", "worse"):
            summary[f"{match.candidate}/tokens_to_match"] = match.candidate_tokens
            summary[f"{match.candidate}/saving_fraction"] = match.saving_fraction
    return summary


def write_report(curves: list[BranchCurve], out_dir: str | Path, unigram_ppl: float | None = None) -> ReportFiles:
    """Write report.json, report.md, report.html and the plots (under plots/) into `out_dir`, each atomically.

    report.json holds the verdicts twice: as structured rows (`verdicts`, see `verdict_rows`) for tools, and
    as the lines printed everywhere else (`verdict`)."""
    out_dir = Path(out_dir)
    table, matches, rows = comparison_table(curves), match_all(curves, unigram_ppl), verdict_rows(curves, VAL_PPL, unigram_ppl)
    verdict = verdict_text(rows)
    files = ReportFiles(
        json_path=out_dir / "report.json", markdown_path=out_dir / "report.md", html_path=out_dir / "report.html",
        plots=plot_curves(curves, out_dir / "plots", unigram_ppl), summary=_summary(table, matches, unigram_ppl),
    )
    write_json_atomic(files.json_path, {
        "table": table, "tokens_to_match": [dataclasses.asdict(match) for match in matches],
        "curves": [curve.to_dict() for curve in curves], "summary": files.summary, "unigram_ppl": unigram_ppl,
        "verdicts": rows, "verdict": verdict,
    })
    markdown = to_markdown(table, matches, verdict, unigram_ppl)
    for path, text in ((files.markdown_path, markdown), (files.html_path, report_html(files))):
        with atomic_path(path) as temp:
            temp.write_text(text)
    return files
