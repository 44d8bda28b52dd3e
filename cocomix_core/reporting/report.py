"""The experiment's report: per-token curves of every branch, tokens-to-match, a table and plots.

Input is one `BranchCurve` per training branch: its checkpoint evaluations ordered by training
tokens, with metrics named as in `tracking` (`eval/val_ppl`, `eval/<task>/<metric>`).

Pairing rule (seeds and λ sweeps): every non-NTP branch (CoCoMix, KD, pause) is compared with the
NTP branch of the same seed. When no NTP branch has that seed but exactly one NTP branch exists,
that one is the reference; otherwise the branch is left unpaired (listed in the table, not matched).

Claims (SPEC §10). A metric's estimate for an arm is its value with a 95% interval: with one seed the
bootstrap interval logged with it (`<metric>_lo`, `<metric>_hi`); with several seeds the mean across
seeds and the t-interval across seeds. Arm X is "better"/"worse" than its reference only when the two
are separated: each value lies outside the other's interval, and the difference's interval (below)
excludes zero, so a verdict never contradicts an interval printed beside it. Otherwise the claim is "within noise",
and it is "degenerate" when both arms are at or below chance on an accuracy-like metric (chance is the
logged `eval/<task>/chance`, else 0), whatever the values. Tokens-to-match savings are stated only
for "better"/"worse" pairs. The difference's interval is the t-interval of the per-seed differences
(paired by seed) with several seeds, else the two intervals' half-widths added in quadrature.
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

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import (
    t as student_t,  # the object API draws with Agg; no pyplot, no display
)

from cocomix_core.plumbing.files import atomic_path, write_json_atomic

VAL_PPL = "eval/val_ppl"
EVAL_PREFIX = "eval/"
TRAINING_VAL_PPL_PLOT = "training_val_ppl.png"
# Metric names whose value falls as the model improves; every other metric (acc, ...) rises.
_LOWER_IS_BETTER_WORDS = ("ppl", "perplexity", "loss", "nll", "bits_per_byte")
INTERVAL_SUFFIXES = ("_lo", "_hi")
CHANCE_METRIC = "chance"
Claim = Literal["better", "worse", "within noise", "degenerate", "no interval"]
ArmKind = Literal["ntp", "cocomix", "kd", "pause"]


@dataclass(frozen=True)
class EvalPoint:
    """The evaluation of one checkpoint."""

    step: int
    tokens_seen: int
    metrics: dict[str, float]


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
        return dataclasses.asdict(self)

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


def curves_from_results(results: Iterable[tuple[dict[str, Any], dict[str, float]]]) -> list[BranchCurve]:
    """Group (evaluation job, metrics) pairs into one curve per branch.

    A job is `{"branch": {"name", "kind", "seed", "lam_concept", ...}, "step", "tokens_seen", ...}`;
    metric names get the `eval/` prefix when they lack it.
    """
    branches: dict[str, dict[str, Any]] = {}
    points: dict[str, list[EvalPoint]] = defaultdict(list)
    for job, metrics in results:
        branch = branches.setdefault(job["branch"]["name"], job["branch"])
        named = {name if name.startswith(EVAL_PREFIX) else EVAL_PREFIX + name: value for name, value in metrics.items()}
        points[branch["name"]].append(EvalPoint(int(job["step"]), int(job["tokens_seen"]), named))
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
) -> TokensToMatch:
    """Tokens the candidate needs to reach the reference's value at its final checkpoint.

    Interpolation rule: walk the candidate's checkpoints in token order and find the first one
    whose value reaches the target (<= when lower is better, >= otherwise). If it is the first
    checkpoint, its tokens are the answer (nothing is assumed before it). Otherwise the answer is
    the linear interpolation of tokens between it and the previous checkpoint on the
    (tokens, metric) line: t = t0 + (target - v0) * (t1 - t0) / (v1 - v0). A target never reached
    gives None: the curve is not extrapolated.
    """
    reference_values = reference.values(metric)
    if not reference_values:
        raise ValueError(f"reference branch {reference.name!r} has no {metric!r}")
    reference_tokens, target = reference_values[-1]
    candidate_values = candidate.values(metric)
    crossing = _first_crossing(candidate_values, target, lower_is_better)
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


def match_all(curves: list[BranchCurve]) -> list[TokensToMatch]:
    """Tokens-to-match of every pair, for validation perplexity and every task metric both measured."""
    matches = []
    for reference, candidate in pair_branches(curves):
        shared = [metric for metric in task_metrics([reference]) if candidate.values(metric)]
        for metric in [VAL_PPL, *shared]:
            if reference.values(metric):
                matches.append(tokens_to_match(reference, candidate, metric, lower_is_better(metric)))
    return matches


# ----- claims (SPEC §10) ----------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A value with its 95% interval (lo, hi); `seeds` says how many seeds it aggregates."""

    value: float
    lo: float | None
    hi: float | None
    seeds: int = 1

    @property
    def has_interval(self) -> bool:
        return self.lo is not None and self.hi is not None

    def contains(self, value: float) -> bool:
        return self.lo <= value <= self.hi


@dataclass(frozen=True)
class Comparison:
    """Candidate vs reference on one metric at their final checkpoints: estimates, difference, claim."""

    metric: str
    reference: Estimate
    candidate: Estimate
    difference: Estimate  # candidate - reference
    claim: Claim


def _t_interval(values: list[float]) -> Estimate:
    """Mean and 95% Student-t interval across seeds."""
    mean = float(np.mean(values))
    half = float(student_t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))
    return Estimate(mean, mean - half, mean + half, seeds=len(values))


def _final_metrics(curve: BranchCurve, metric: str) -> dict[str, float] | None:
    measured = [point.metrics for point in curve.points if metric in point.metrics]
    return measured[-1] if measured else None


def estimate(curves: list[BranchCurve], metric: str) -> Estimate | None:
    """The final-checkpoint estimate of `metric` over an arm's seeds (module docstring); None when unmeasured."""
    finals = [final for curve in curves if (final := _final_metrics(curve, metric)) is not None]
    if not finals:
        return None
    if len(finals) > 1:
        return _t_interval([final[metric] for final in finals])
    final = finals[0]
    return Estimate(final[metric], final.get(metric + "_lo"), final.get(metric + "_hi"))


def _chance(curves: list[BranchCurve], metric: str) -> float:
    task_prefix = metric.rsplit("/", 1)[0]
    finals = [final for curve in curves if (final := _final_metrics(curve, metric)) is not None]
    return max((final.get(f"{task_prefix}/{CHANCE_METRIC}", 0.0) for final in finals), default=0.0)


def _difference(references: list[BranchCurve], candidates: list[BranchCurve], metric: str,
                reference: Estimate, candidate: Estimate) -> Estimate:
    by_seed = {curve.seed: _final_metrics(curve, metric) for curve in references}
    paired = [(final[metric], by_seed[curve.seed][metric]) for curve in candidates
              if (final := _final_metrics(curve, metric)) is not None and by_seed.get(curve.seed) is not None]
    if len(paired) > 1:
        return _t_interval([c - r for c, r in paired])
    value = candidate.value - reference.value
    if not (reference.has_interval and candidate.has_interval):
        return Estimate(value, None, None)
    below = np.hypot(candidate.value - candidate.lo, reference.hi - reference.value)
    above = np.hypot(candidate.hi - candidate.value, reference.value - reference.lo)
    return Estimate(value, float(value - below), float(value + above))


def compare(references: list[BranchCurve], candidates: list[BranchCurve], metric: str) -> Comparison:
    """The SPEC §10 claim for candidate vs reference arm (each a list of seed branches) on `metric`."""
    reference, candidate = estimate(references, metric), estimate(candidates, metric)
    if reference is None or candidate is None:
        raise ValueError(f"{metric!r} is not measured by both arms")
    difference = _difference(references, candidates, metric, reference, candidate)
    lower = lower_is_better(metric)
    chance = _chance(references + candidates, metric)
    if not lower and reference.value <= chance and candidate.value <= chance:
        claim: Claim = "degenerate"
    elif not (reference.has_interval and candidate.has_interval):
        claim = "no interval"
    elif reference.contains(candidate.value) or candidate.contains(reference.value) or difference.contains(0.0):
        claim = "within noise"
    else:
        claim = "better" if (candidate.value < reference.value) == lower else "worse"
    return Comparison(metric, reference, candidate, difference, claim)


def _by_arm(curves: list[BranchCurve]) -> dict[str, list[BranchCurve]]:
    arms: dict[str, list[BranchCurve]] = defaultdict(list)
    for curve in curves:
        arms[curve.arm].append(curve)
    return dict(arms)


def verdict_rows(curves: list[BranchCurve], metric: str = VAL_PPL) -> list[dict[str, Any]]:
    """One row per (arm, reference): every arm against the NTP arm, and CoCoMix-kind arms after the first
    CoCoMix arm (the ablations) also against that one; with parameters and training FLOPs per token of both."""
    arms = _by_arm(curves)
    kinds = {name: branches[0].kind for name, branches in arms.items()}
    ntp = next((name for name, kind in kinds.items() if kind == "ntp"), None)
    cocomix = next((name for name, kind in kinds.items() if kind == "cocomix"), None)
    pairs = [(ntp, name) for name in arms if ntp is not None and name != ntp]
    pairs += [(cocomix, name) for name, kind in kinds.items() if cocomix and kind == "cocomix" and name != cocomix]
    rows = []
    for reference, candidate in pairs:
        if estimate(arms[reference], metric) is None or estimate(arms[candidate], metric) is None:
            continue
        comparison = compare(arms[reference], arms[candidate], metric)
        rows.append({
            "arm": candidate, "kind": kinds[candidate], "reference": reference, "metric": metric,
            "seeds": comparison.candidate.seeds, "candidate": dataclasses.asdict(comparison.candidate),
            "reference_estimate": dataclasses.asdict(comparison.reference),
            "difference": dataclasses.asdict(comparison.difference), "claim": comparison.claim,
            **{f"{side}_{quantity}": _final_metrics(arms[name][0], metric).get(f"{EVAL_PREFIX}{quantity}")
               for side, name in (("candidate", candidate), ("reference", reference))
               for quantity in ("n_params", "flops_per_token")},
        })
    return rows


def _interval_text(estimate_fields: dict[str, Any]) -> str:
    value, lo, hi = estimate_fields["value"], estimate_fields["lo"], estimate_fields["hi"]
    return f"{value:.4g}" + (f" [{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else " [no interval]")


def _size_text(params: float | None, flops: float | None) -> str:
    return f"{params:,.0f} parameters, {flops:.3g} training FLOPs/token" if params and flops else "size not logged"


_CLAIM_WORDS = {
    "better": "significantly better (each value outside the other's 95% interval; the difference's excludes 0)",
    "worse": "significantly worse (each value outside the other's 95% interval; the difference's excludes 0)",
    "within noise": "within noise: not significant",
    "degenerate": "degenerate: both arms at or below chance, no comparison",
    "no interval": "no interval logged: no claim",
}


def verdict_text(rows: list[dict[str, Any]]) -> list[str]:
    """The verdict as plain-language lines, one per row of `verdict_rows`."""
    lines = []
    for row in rows:
        seeds = f"{row['seeds']} seeds, mean and t-interval" if row["seeds"] > 1 else "1 seed, bootstrap interval"
        lines.append(
            f"{row['arm']} vs {row['reference']}: {row['metric'].removeprefix(EVAL_PREFIX)} "
            f"{_interval_text(row['candidate'])} vs {_interval_text(row['reference_estimate'])} ({seeds}); "
            f"difference {_interval_text(row['difference'])}: {_CLAIM_WORDS[row['claim']]}. "
            f"{row['arm']}: {_size_text(row['candidate_n_params'], row['candidate_flops_per_token'])}; "
            f"{row['reference']}: {_size_text(row['reference_n_params'], row['reference_flops_per_token'])}."
        )
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


def to_markdown(table: list[dict[str, Any]], tokens_to_match: list[TokensToMatch], verdict: list[str] = ()) -> str:
    """The report as Markdown: the verdict per arm first, then tokens-to-match, then the per-branch table."""
    parts = ["# CoCoMix vs NTP", "", "## Verdict", ""]
    parts += [f"- {line}" for line in verdict] or ["No arm to compare with the NTP baseline."]
    parts += ["", "## Tokens to match the NTP baseline's final value", ""]
    parts.append(_markdown_table(*_match_cells(tokens_to_match)) if tokens_to_match else "No CoCoMix/NTP pair to compare.")
    parts += ["", "## Final checkpoints", "", _markdown_table(*_table_cells(table)), ""]
    return "\n".join(parts)


def _plot(series: dict[str, list[tuple[float, float]]], styles: dict[str, dict], ylabel: str, path: Path) -> Path:
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    for name, points in series.items():
        axes.plot([tokens for tokens, _ in points], [value for _, value in points], label=name, **styles[name])
    axes.set(xlabel="training tokens", ylabel=ylabel, title=ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png")
    return path


def plot_curves(curves: list[BranchCurve], out_dir: str | Path) -> list[Path]:
    """One PNG per metric (val ppl, each task metric, training val ppl when given), one line per branch."""
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
            paths.append(_plot(series, styles, metric, out_dir / file_name))
    training = {curve.name: curve.training_val_ppl for curve in curves if curve.training_val_ppl}
    if training:
        line_only = {name: dict(style, marker=None) for name, style in styles.items()}
        paths.append(_plot(training, line_only, "val/ppl during training", out_dir / TRAINING_VAL_PPL_PLOT))
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
        + "</ul><h2>Tokens to match the NTP baseline's final value</h2>"
        f"{_html_table(*_match_cells(matches))}<h2>Final checkpoints</h2>{_html_table(*_table_cells(content['table']))}"
        f"<h2>Curves</h2>{images}</body></html>"
    )


def _summary(table: list[dict[str, Any]], matches: list[TokensToMatch]) -> dict[str, float]:
    """Headline numbers as MLflow metrics: final val ppl per branch, tokens-to-match of val ppl per pair."""
    summary = {f"{row['branch']}/final_val_ppl": row["final_val_ppl"] for row in table if row["final_val_ppl"] is not None}
    for match in matches:
        if match.metric == VAL_PPL and match.saving_fraction is not None and match.claim in ("better", "worse"):
            summary[f"{match.candidate}/tokens_to_match"] = match.candidate_tokens
            summary[f"{match.candidate}/saving_fraction"] = match.saving_fraction
    return summary


def write_report(curves: list[BranchCurve], out_dir: str | Path) -> ReportFiles:
    """Write report.json, report.md, report.html and the plots (under plots/) into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    table, matches, verdict = comparison_table(curves), match_all(curves), verdict_text(verdict_rows(curves))
    files = ReportFiles(
        json_path=out_dir / "report.json", markdown_path=out_dir / "report.md", html_path=out_dir / "report.html",
        plots=plot_curves(curves, out_dir / "plots"), summary=_summary(table, matches),
    )
    write_json_atomic(files.json_path, {
        "table": table, "tokens_to_match": [dataclasses.asdict(match) for match in matches],
        "curves": [curve.to_dict() for curve in curves], "summary": files.summary, "verdict": verdict,
    })
    for path, text in ((files.markdown_path, to_markdown(table, matches, verdict)), (files.html_path, report_html(files))):
        with atomic_path(path) as temp:
            temp.write_text(text)
    return files
