"""The report: tokens-to-match on hand-made curves, pairing, table, plots and files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from cocomix_core.evaluation.intervals import bootstrap_replicates, percentile_interval
from cocomix_core.reporting.report import (
    VAL_PPL,
    BranchCurve,
    EvalPoint,
    compare,
    comparison_table,
    curves_from_results,
    lower_is_better,
    match_all,
    pair_branches,
    plot_curves,
    report_html,
    to_markdown,
    tokens_to_match,
    verdict_rows,
    verdict_text,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ACC = "eval/lambada/acc"


def curve(name: str, kind: str, values: dict[int, dict[str, float]], seed: int | None = None) -> BranchCurve:
    """A branch with one checkpoint per {tokens: metrics}, 100 tokens per step."""
    points = [EvalPoint(step=tokens // 100, tokens_seen=tokens, metrics=metrics) for tokens, metrics in values.items()]
    return BranchCurve(name=name, kind=kind, points=points, seed=seed)


def ppl_curve(name: str, kind: str, ppl_by_tokens: dict[int, float], seed: int | None = None) -> BranchCurve:
    return curve(name, kind, {tokens: {VAL_PPL: ppl} for tokens, ppl in ppl_by_tokens.items()}, seed)


NTP = ppl_curve("ntp", "ntp", {1000: 50.0, 2000: 40.0, 3000: 30.0})
COCOMIX = ppl_curve("cocomix", "cocomix", {1000: 45.0, 2000: 32.0, 3000: 26.0})


def test_tokens_to_match_interpolates_the_first_crossing():
    match = tokens_to_match(NTP, COCOMIX)
    # NTP ends at ppl 30 after 3000 tokens. CoCoMix is at 32 after 2000 tokens and 26 after 3000:
    # the straight line between them crosses 30 a third of the way, at 2000 + 1000 * 2/6 tokens.
    expected_tokens = 2000 + 1000 * (32.0 - 30.0) / (32.0 - 26.0)
    assert match.target_value == 30.0 and match.reference_tokens == 3000
    assert match.candidate_tokens == pytest.approx(expected_tokens)
    assert match.saving_fraction == pytest.approx(1 - expected_tokens / 3000)  # 2/9 fewer tokens


def test_tokens_to_match_takes_the_first_crossing_of_a_noisy_curve():
    noisy = ppl_curve("cocomix", "cocomix", {1000: 29.0, 2000: 31.0, 3000: 25.0})
    assert tokens_to_match(NTP, noisy).candidate_tokens == 1000  # reached at the first checkpoint already


def test_target_never_reached_is_not_extrapolated():
    slow = ppl_curve("cocomix", "cocomix", {1000: 60.0, 2000: 45.0, 3000: 31.0})
    match = tokens_to_match(NTP, slow)
    assert match.candidate_tokens is None and match.saving_fraction is None
    assert match.candidate_tokens_evaluated == 3000
    markdown = to_markdown(comparison_table([NTP, slow]), [match])
    assert "not reached within 3,000" in markdown


def test_tokens_to_match_for_a_higher_is_better_metric():
    ntp = curve("ntp", "ntp", {1000: {ACC: 0.20}, 2000: {ACC: 0.30}, 4000: {ACC: 0.40}})
    cocomix = curve("cocomix", "cocomix", {1000: {ACC: 0.25}, 2000: {ACC: 0.35}, 3000: {ACC: 0.45}})
    assert not lower_is_better(ACC) and lower_is_better(VAL_PPL) and lower_is_better("eval/wikitext/word_perplexity")
    match = tokens_to_match(ntp, cocomix, ACC, lower_is_better=False)
    # target 0.40 lies halfway between 0.35 (2000 tokens) and 0.45 (3000 tokens)
    assert match.candidate_tokens == pytest.approx(2500)
    assert match.saving_fraction == pytest.approx(1 - 2500 / 4000)
    assert tokens_to_match(ntp, cocomix, ACC, lower_is_better=True).candidate_tokens == 1000  # wrong direction differs


def test_reference_without_the_metric_is_an_error():
    with pytest.raises(ValueError, match="no 'eval/absent'"):
        tokens_to_match(NTP, COCOMIX, "eval/absent")


def test_each_cocomix_branch_is_paired_with_the_ntp_branch_of_its_seed():
    ntp0, ntp1 = (ppl_curve(f"ntp-seed{seed}", "ntp", {1000: 40.0}, seed) for seed in (0, 1))
    cocomix0, cocomix1 = (ppl_curve(f"cocomix-seed{seed}", "cocomix", {1000: 35.0}, seed) for seed in (0, 1))
    lam_sweep0 = ppl_curve("cocomix-seed0-lam0.05", "cocomix", {1000: 38.0}, seed=0)
    pairs = pair_branches([ntp0, ntp1, cocomix0, cocomix1, lam_sweep0])
    assert [(reference.name, candidate.name) for reference, candidate in pairs] == [
        ("ntp-seed0", "cocomix-seed0"), ("ntp-seed1", "cocomix-seed1"), ("ntp-seed0", "cocomix-seed0-lam0.05"),
    ]
    # a seed without its own baseline falls back to the only NTP branch there is
    assert pair_branches([ntp0, cocomix1]) == [(ntp0, cocomix1)]
    assert pair_branches([ntp0, ntp1, ppl_curve("c", "cocomix", {1000: 1.0}, seed=7)]) == []


def test_curves_from_flow_results():
    def job(branch: str, kind: str, step: int) -> dict:
        return {"branch": {"name": branch, "arm": branch, "kind": kind, "seed": 0, "lam_concept": 0.1},
                "step": step, "tokens_seen": step * 100, "key": f"runs/r/{branch}/checkpoints/step_{step:06d}"}

    replicates = {"val_ppl": {"items": 2, "replicates": [29.0, 31.0]}}
    results = [(job("cocomix", "cocomix", 20), {"val_ppl": 30.0}, replicates), (job("ntp", "ntp", 10), {"val_ppl": 50.0}, {}),
               (job("cocomix", "cocomix", 10), {"val_ppl": 45.0, "lambada/acc": 0.3}, {})]
    ntp, cocomix = sorted(curves_from_results(results), key=lambda branch: branch.kind, reverse=True)
    assert (ntp.name, ntp.lam_concept, cocomix.lam_concept, cocomix.seed) == ("ntp", None, 0.1, 0)
    assert [point.step for point in cocomix.points] == [10, 20]  # ordered by tokens
    assert cocomix.points[0].metrics == {VAL_PPL: 45.0, ACC: 0.3}
    assert cocomix.points[1].replicates == {VAL_PPL: replicates["val_ppl"]}  # named like the metrics


def test_comparison_table_reports_final_and_best_values():
    ntp = curve("ntp", "ntp", {1000: {VAL_PPL: 40.0, ACC: 0.2}, 2000: {VAL_PPL: 42.0, ACC: 0.3}})
    cocomix = curve("cocomix", "cocomix", {1000: {VAL_PPL: 35.0}, 2000: {VAL_PPL: 33.0, ACC: 0.4}})
    table = comparison_table([ntp, cocomix])
    assert table[0] == {
        "branch": "ntp", "kind": "ntp", "seed": None, "lam_concept": None, "final_step": 20, "final_tokens": 2000,
        "final_val_ppl": 42.0, "best_val_ppl": 40.0, "lambada/acc": 0.3,
    }
    assert (table[1]["final_val_ppl"], table[1]["best_val_ppl"], table[1]["lambada/acc"]) == (33.0, 33.0, 0.4)
    markdown = to_markdown(table, match_all([ntp, cocomix]))
    assert "| ntp |" in markdown and "| cocomix |" in markdown and ACC in markdown


def test_plots_are_real_pngs(tmp_path: Path):
    ntp = curve("ntp", "ntp", {1000: {VAL_PPL: 40.0, ACC: 0.2}, 2000: {VAL_PPL: 35.0, ACC: 0.3}})
    cocomix = curve("cocomix", "cocomix", {1000: {VAL_PPL: 38.0, ACC: 0.25}, 2000: {VAL_PPL: 33.0, ACC: 0.35}})
    cocomix.training_val_ppl = [(500, 60.0), (1000, 39.0), (2000, 32.0)]
    paths = plot_curves([ntp, cocomix], tmp_path)
    assert [path.name for path in paths] == ["val_ppl.png", "lambada__acc.png", "training_val_ppl.png"]
    for path in paths:
        content = path.read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > 5000
    assert sorted(tmp_path.iterdir()) == sorted(paths)  # no temporaries left


def one_seed(name: str, kind: str, windows: list[float], tokens: int = 3000, arm: str = "") -> BranchCurve:
    """A one-checkpoint branch whose val ppl is the mean of per-window values, with its bootstrap replicates over
    those windows (1000 resamples, seed 0, as the evaluator draws them) and the percentile interval from them."""
    replicates = bootstrap_replicates(windows, samples=1000, seed=0)
    lo, hi = percentile_interval(replicates)
    metrics = {VAL_PPL: statistics.mean(windows), f"{VAL_PPL}_lo": lo, f"{VAL_PPL}_hi": hi}
    point = EvalPoint(tokens // 100, tokens, metrics, {VAL_PPL: {"items": len(windows), "replicates": list(replicates)}})
    return BranchCurve(name=name, kind=kind, points=[point], seed=0, arm=arm)


def seeded(arm: str, kind: str, by_seed: dict[int, dict[int, float]]) -> list[BranchCurve]:
    """One branch per seed of `arm`, each {tokens: val ppl}."""
    branches = [ppl_curve(f"{arm}-s{seed}", kind, values, seed) for seed, values in by_seed.items()]
    for branch in branches:
        branch.arm = arm
    return branches


# ----- claims (SPEC §10) ------------------------------------------------------------------------
def test_one_seed_paired_bootstrap_decides_where_the_arms_intervals_overlap():
    # Two validation windows. NTP scores 20 and 40 (mean 30, own interval [20, 40]); CoCoMix 17 and 35 (mean 26,
    # own [17, 35]): the own intervals overlap widely. Per window CoCoMix is lower by 3 and by 5, so every
    # resample's difference lies in {-3, -4, -5} and its 95% interval is [-5, -3]: it excludes 0, "better".
    ntp, cocomix = one_seed("ntp", "ntp", [20.0, 40.0]), one_seed("cocomix", "cocomix", [17.0, 35.0])
    comparison = compare([ntp], [cocomix], VAL_PPL)
    assert (comparison.reference.lo, comparison.reference.hi) == pytest.approx((20.0, 40.0))
    assert comparison.reference.lo < comparison.candidate.value < comparison.reference.hi  # overlapping
    assert comparison.difference.value == pytest.approx(-4.0)
    assert (comparison.difference.lo, comparison.difference.hi) == pytest.approx((-5.0, -3.0))
    assert comparison.difference.method == "paired bootstrap" and comparison.claim == "better"
    assert compare([cocomix], [ntp], VAL_PPL).claim == "worse"  # the same pair the other way round


def test_no_detectable_difference_comes_with_its_size():
    # NTP windows 20, 40; CoCoMix 22, 30: per window +2 and -10, so the paired interval is [-10, 2] and holds 0.
    ntp, cocomix = one_seed("ntp", "ntp", [20.0, 40.0]), one_seed("cocomix", "cocomix", [22.0, 30.0])
    (row,) = verdict_rows([ntp, cocomix])
    assert row["claim"] == "no detectable difference" and row["tokens_to_match"] is None
    assert (row["difference"]["lo"], row["difference"]["hi"]) == pytest.approx((-10.0, 2.0))
    # SE of the resampled differences {2, -4, -10} (probabilities 1/4, 1/2, 1/4): sqrt(6² / 2) = 4.243 (sampled ~);
    # the smallest detectable difference is 2.801585 · SE ≈ 11.9
    assert row["min_detectable_difference"] == pytest.approx(2.801585 * 4.243, rel=0.08)
    line = verdict_text([row])[0]
    assert f"no detectable difference (smallest detectable difference {row['min_detectable_difference']:.4g}" in line
    assert "paired difference -4 [-10, 2] (paired bootstrap)" in line
    match = tokens_to_match(ntp, cocomix, claim=row["claim"])
    assert "%" not in to_markdown(comparison_table([ntp, cocomix]), [match]).split("## Final")[0].split("## Tokens")[1]


def test_one_seed_without_replicates_makes_no_claim():
    assert compare([NTP], [COCOMIX], VAL_PPL).claim == "no interval"
    assert verdict_rows([NTP, COCOMIX])[0]["difference"] is None


def test_perplexities_above_the_unigram_floor_share_are_degenerate():
    # unigram floor 100: 0.8 × 100 = 80. NTP at 85 and CoCoMix at 90 are both above it: degenerate, whatever the
    # paired interval ([4, 6] here, which excludes 0) says.
    ntp, cocomix = one_seed("ntp", "ntp", [80.0, 90.0]), one_seed("cocomix", "cocomix", [84.0, 96.0])
    assert compare([ntp], [cocomix], VAL_PPL).claim == "worse"
    assert compare([ntp], [cocomix], VAL_PPL, unigram_ppl=100.0).claim == "degenerate"
    (row,) = verdict_rows([ntp, cocomix], unigram_ppl=100.0)
    lines = verdict_text([row])
    assert "degenerate: both arms near the unigram level (above 0.8 × unigram ppl 100 = 80)" in lines[0]
    assert "cpu_study" in lines[1]  # the text points to the study whose students learn
    # one arm below 0.8 × floor (NTP at 78.5): a real comparison again
    better_ntp = one_seed("ntp", "ntp", [75.0, 82.0])
    assert compare([better_ntp], [cocomix], VAL_PPL, unigram_ppl=100.0).claim == "worse"
    assert "cpu_study" not in " ".join(verdict_text(verdict_rows([better_ntp, cocomix], unigram_ppl=100.0)))


def test_claim_degenerate_when_both_arms_score_zero_or_chance():
    zero = [curve(name, kind, {1000: {ACC: 0.0}}) for name, kind in (("ntp", "ntp"), ("cocomix", "cocomix"))]
    assert compare(zero[:1], zero[1:], ACC).claim == "degenerate"
    choice = "eval/choice/acc"
    at_chance = [curve(n, k, {1000: {choice: v, "eval/choice/chance": 0.25}})
                 for n, k, v in (("ntp", "ntp", 0.22), ("cocomix", "cocomix", 0.25))]
    assert compare(at_chance[:1], at_chance[1:], choice).claim == "degenerate"
    assert tokens_to_match(*at_chance, choice, lower_is_better=False).claim == "degenerate"


def test_seeds_pair_into_a_t_interval_of_differences_that_decides():
    ntp = seeded("ntp", "ntp", {0: {1000: 1000.0}, 1: {1000: 1300.0}, 2: {1000: 700.0}})
    kd = seeded("kd", "kd", {0: {1000: 950.0}, 1: {1000: 1240.0}, 2: {1000: 660.0}})
    comparison = compare(ntp, kd, VAL_PPL)
    # NTP's own interval: 1000 ± 4.302653 · 300 / sqrt(3) = 1000 ± 745.2, which holds KD's mean 950
    assert (comparison.reference.lo, comparison.reference.hi) == pytest.approx((254.8, 1745.2), abs=0.1)
    # differences -50, -60, -40: mean -50, sd 10, half-width 4.302653 · 10 / sqrt(3) = 24.8414
    assert (comparison.difference.lo, comparison.difference.hi) == pytest.approx((-74.8414, -25.1586), abs=1e-4)
    assert comparison.difference.method == "paired t" and comparison.claim == "better"
    (row,) = verdict_rows(ntp + kd)
    assert (row["arm"], row["reference"], row["seeds"], row["claim"]) == ("kd", "ntp", 3, "better")
    # (t_0.975 + t_0.80 at 2 df) · SE = (4.302653 + 1.060660) · 10 / sqrt(3) = 30.965
    assert row["min_detectable_difference"] == pytest.approx(30.965, abs=1e-3)
    assert "3 seeds: mean, t-interval" in verdict_text([row])[0] and ": better (" in verdict_text([row])[0]


def test_tokens_to_match_carries_its_interval_across_seeds():
    # NTP ends at 30, 32, 31 after 2,000 tokens. KD crosses each seed's target on the line between its two
    # checkpoints: seed 0: 1000 + (30-40)·1000/(20-40) = 1500; seed 1: 1000 + (32-40)·1000/(26-40) = 1571.43;
    # seed 2: 1000 + (31-40)·1000/(22-40) = 1500. Savings 1 - t/2000: 0.25, 0.214286, 0.25;
    # mean 0.238095, sd 0.020620, half-width 4.302653 · 0.020620 / sqrt(3) = 0.051223.
    # Final differences -10, -6, -9: mean -8.333, sd 2.0817, interval -8.333 ± 5.171, which excludes 0: better.
    ntp = seeded("ntp", "ntp", {seed: {1000: 50.0, 2000: final} for seed, final in ((0, 30.0), (1, 32.0), (2, 31.0))})
    kd = seeded("kd", "kd", {0: {1000: 40.0, 2000: 20.0}, 1: {1000: 40.0, 2000: 26.0}, 2: {1000: 40.0, 2000: 22.0}})
    (row,) = verdict_rows(ntp + kd)
    assert row["claim"] == "better"
    saving = row["tokens_to_match"]["saving"]
    assert saving["value"] == pytest.approx(0.238095, abs=1e-6)
    assert (saving["lo"], saving["hi"]) == pytest.approx((0.238095 - 0.051223, 0.238095 + 0.051223), abs=1e-5)
    assert row["tokens_to_match"]["seeds_reached"] == 3
    assert "with 23.8% fewer tokens [18.7%, 28.9%] across 3 seeds" in verdict_text([row])[0]


def test_verdict_rows_are_structured_for_other_tools():
    metrics = {"eval/n_params": 1000.0, "eval/flops_per_token": 6e3}
    ntp, cocomix = one_seed("ntp", "ntp", [20.0, 40.0]), one_seed("cocomix", "cocomix", [17.0, 35.0])
    for branch in (ntp, cocomix):
        branch.points[0].metrics.update(metrics)
    (row,) = verdict_rows([ntp, cocomix], unigram_ppl=500.0)
    assert {"arm", "reference", "metric", "seeds", "arm_estimate", "reference_estimate", "difference",
            "min_detectable_difference", "claim", "tokens_to_match", "unigram_ppl"} <= set(row)
    assert (row["arm"], row["reference"], row["metric"], row["seeds"], row["unigram_ppl"]) == (
        "cocomix", "ntp", VAL_PPL, 1, 500.0)
    assert row["arm_estimate"] == {"value": 26.0, "lo": pytest.approx(17.0), "hi": pytest.approx(35.0), "n": 1}
    assert {key: row["difference"][key] for key in ("value", "lo", "hi")} == pytest.approx(
        {"value": -4.0, "lo": -5.0, "hi": -3.0})
    assert row["tokens_to_match"] == {"seeds": 1, "seeds_reached": 1, "saving": {"value": 0.0, "lo": None, "hi": None, "n": 1}}
    assert "1,000 parameters, 6e+03 training FLOPs/token" in verdict_text([row])[0]


def test_verdict_lists_every_arm_against_ntp_and_ablations_against_cocomix():
    arms = [one_seed(name, kind, windows) for name, kind, windows in (
        ("ntp", "ntp", [20.0, 40.0]), ("cocomix", "cocomix", [17.0, 35.0]), ("kd", "kd", [22.0, 30.0]),
        ("pause", "pause", [23.0, 41.0]), ("cocomix_add", "cocomix", [18.0, 35.0]))]
    rows = verdict_rows(arms)
    # per window against ntp: cocomix -3, -5; kd +2, -10; pause +3, +1; cocomix_add -2, -5;
    # cocomix_add against cocomix: +1, 0 -> interval [0, 1] holds 0
    assert [(row["arm"], row["reference"], row["claim"]) for row in rows] == [
        ("cocomix", "ntp", "better"), ("kd", "ntp", "no detectable difference"), ("pause", "ntp", "worse"),
        ("cocomix_add", "ntp", "better"), ("cocomix_add", "cocomix", "no detectable difference"),
    ]


def ending_with_windows(branch: BranchCurve, windows: list[float]) -> BranchCurve:
    """`branch` whose final checkpoint is replaced by `one_seed`'s evaluation of these windows."""
    final = one_seed(branch.name, branch.kind, windows, branch.points[-1].tokens_seen).points[0]
    return BranchCurve(branch.name, branch.kind, [*branch.points[:-1], final], branch.seed)


def test_write_report_writes_every_file(tmp_path: Path):
    # final checkpoints: NTP windows 29, 31 (ppl 30); CoCoMix 25, 27 (ppl 26): 4 lower on both windows, "better"
    ntp, cocomix = ending_with_windows(NTP, [29.0, 31.0]), ending_with_windows(COCOMIX, [25.0, 27.0])
    files = write_report([ntp, cocomix], tmp_path / "report", unigram_ppl=872.0)
    content = json.loads(files.json_path.read_text())
    assert [row["branch"] for row in content["table"]] == ["ntp", "cocomix"]
    assert content["tokens_to_match"][0]["candidate_tokens"] == pytest.approx(2000 + 1000 / 3)
    assert content["tokens_to_match"][0]["claim"] == "better"
    assert [BranchCurve.from_dict(data) for data in content["curves"]] == [ntp, cocomix]
    assert "replicates" not in content["curves"][0]["points"][-1]  # thousands of numbers stay out of report.json
    assert content["verdict"][0].startswith("cocomix vs ntp: val_ppl 26 [25, 27] vs 30 [29, 31] (1 seed")
    assert content["unigram_ppl"] == 872.0 and content["verdicts"][0]["claim"] == "better"
    assert content["verdicts"][0]["difference"]["value"] == pytest.approx(-4.0)
    assert files.summary["cocomix/saving_fraction"] == pytest.approx(1 - (2000 + 1000 / 3) / 3000)
    assert files.summary["ntp/final_val_ppl"] == 30.0 and files.summary["unigram_val_ppl"] == 872.0

    markdown = files.markdown_path.read_text()
    assert "ntp" in markdown and "cocomix" in markdown and "22.2%" in markdown
    assert markdown.index("## Verdict") < markdown.index("Unigram floor: validation perplexity 872") < markdown.index(
        "## Tokens to match")
    page = files.html_path.read_text()
    assert page == report_html(files) and "Unigram floor" in page
    assert page.count("data:image/png;base64,") == len(files.plots) == 1 and "<td>cocomix</td>" in page


def test_the_unigram_floor_is_drawn_on_perplexity_plots(tmp_path: Path):
    # the floor is far above the curves, so drawing it stretches the y-axis: the PNG differs from one without it
    without = plot_curves([NTP, COCOMIX], tmp_path / "without")[0].read_bytes()
    with_floor = plot_curves([NTP, COCOMIX], tmp_path / "with", unigram_ppl=872.0)[0].read_bytes()
    assert with_floor.startswith(PNG_SIGNATURE) and with_floor != without
