"""The report: tokens-to-match on hand-made curves, pairing, table, plots and files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

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

    results = [(job("cocomix", "cocomix", 20), {"val_ppl": 30.0}), (job("ntp", "ntp", 10), {"val_ppl": 50.0}),
               (job("cocomix", "cocomix", 10), {"val_ppl": 45.0, "lambada/acc": 0.3})]
    ntp, cocomix = sorted(curves_from_results(results), key=lambda branch: branch.kind, reverse=True)
    assert (ntp.name, ntp.lam_concept, cocomix.lam_concept, cocomix.seed) == ("ntp", None, 0.1, 0)
    assert [point.step for point in cocomix.points] == [10, 20]  # ordered by tokens
    assert cocomix.points[0].metrics == {VAL_PPL: 45.0, ACC: 0.3}


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


def with_intervals(branch: BranchCurve, half_width: float) -> BranchCurve:
    """The branch with a ± half_width interval on every metric of every checkpoint."""
    points = [EvalPoint(point.step, point.tokens_seen, {
        **point.metrics, **{f"{name}_{end}": value + sign * half_width for name, value in point.metrics.items()
                            for end, sign in (("lo", -1), ("hi", 1))},
    }) for point in branch.points]
    return BranchCurve(branch.name, branch.kind, points, branch.seed)


# ----- claims (SPEC §10) ------------------------------------------------------------------------
def test_claim_better_beyond_noise_states_tokens_to_match():
    ntp, cocomix = with_intervals(NTP, 1.0), with_intervals(COCOMIX, 1.0)  # 30 ± 1 vs 26 ± 1
    comparison = compare([ntp], [cocomix], VAL_PPL)
    assert comparison.claim == "better"
    assert comparison.difference.value == -4.0
    assert (comparison.difference.lo, comparison.difference.hi) == pytest.approx((-4 - 2**0.5, -4 + 2**0.5))
    match = tokens_to_match(ntp, cocomix)
    assert match.claim == "better" and "22.2%" in to_markdown(comparison_table([ntp, cocomix]), [match])


def test_claim_within_noise_withholds_the_saving():
    ntp, cocomix = with_intervals(NTP, 5.0), with_intervals(COCOMIX, 5.0)  # 30 ± 5 contains 26
    assert compare([ntp], [cocomix], VAL_PPL).claim == "within noise"
    match = tokens_to_match(ntp, cocomix)
    markdown = to_markdown(comparison_table([ntp, cocomix]), [match])
    assert match.claim == "within noise" and "22.2%" not in markdown and "within noise" in markdown
    # an overlap that contains neither value is still within noise only if one value is inside the other's interval
    assert compare([with_intervals(NTP, 2.1)], [with_intervals(COCOMIX, 2.1)], VAL_PPL).claim == "better"
    # each value outside the other's interval (30 ± 3.9 vs 26 ± 3.9), but the difference -4 ± 5.5 straddles 0
    separated = compare([with_intervals(NTP, 3.9)], [with_intervals(COCOMIX, 3.9)], VAL_PPL)
    assert separated.difference.lo < 0 < separated.difference.hi and separated.claim == "within noise"


def test_claim_degenerate_when_both_arms_score_zero_or_chance():
    zero_ntp = with_intervals(curve("ntp", "ntp", {1000: {ACC: 0.0}}), 0.0)
    zero_cocomix = with_intervals(curve("cocomix", "cocomix", {1000: {ACC: 0.0}}), 0.0)
    assert compare([zero_ntp], [zero_cocomix], ACC).claim == "degenerate"
    assert tokens_to_match(zero_ntp, zero_cocomix, ACC, lower_is_better=False).claim == "degenerate"
    choice = "eval/choice/acc"
    at_chance = [with_intervals(curve(n, k, {1000: {choice: v, "eval/choice/chance": 0.25}}), 0.01)
                 for n, k, v in (("ntp", "ntp", 0.22), ("cocomix", "cocomix", 0.25))]
    assert compare(at_chance[:1], at_chance[1:], choice).claim == "degenerate"


def test_seeds_aggregate_to_a_t_interval_and_paired_differences():
    ntp = [ppl_curve(f"ntp-seed{s}", "ntp", {1000: v}, seed=s) for s, v in ((0, 30.0), (1, 32.0), (2, 31.0))]
    kd = [ppl_curve(f"kd-seed{s}", "kd", {1000: v}, seed=s) for s, v in ((0, 28.0), (1, 29.0), (2, 28.5))]
    for branch in ntp:
        branch.arm = "ntp"
    for branch in kd:
        branch.arm = "kd"
    comparison = compare(ntp, kd, VAL_PPL)
    # independent: mean ± t(0.975, 2) · sd / sqrt(3), with t(0.975, 2) = 4.302653
    half = 4.302653 * 1.0 / 3**0.5
    assert (comparison.reference.value, comparison.reference.lo, comparison.reference.hi) == pytest.approx((31, 31 - half, 31 + half))
    differences = [-2.0, -3.0, -2.5]
    mean_difference = statistics.mean(differences)
    half_difference = 4.302653 * statistics.stdev(differences) / 3**0.5
    assert (comparison.difference.lo, comparison.difference.hi) == pytest.approx(
        (mean_difference - half_difference, mean_difference + half_difference))
    assert comparison.claim == "better"  # 28.5 outside 31 ± 2.48 and 31 outside 28.5 ± 1.24
    rows = verdict_rows(ntp + kd)
    assert [(row["arm"], row["reference"], row["seeds"], row["claim"]) for row in rows] == [("kd", "ntp", 3, "better")]
    assert "significantly better" in verdict_text(rows)[0] and "3 seeds" in verdict_text(rows)[0]


def test_verdict_lists_every_arm_against_ntp_and_ablations_against_cocomix():
    metrics = {"eval/n_params": 1000.0, "eval/flops_per_token": 6e3}
    arms = [with_intervals(curve(name, kind, {1000: {VAL_PPL: ppl, **metrics}}), 0.5)
            for name, kind, ppl in (("ntp", "ntp", 30.0), ("cocomix", "cocomix", 27.0), ("kd", "kd", 29.8),
                                    ("pause", "pause", 31.0), ("cocomix_add", "cocomix", 27.2))]
    rows = verdict_rows(arms)
    assert [(row["arm"], row["reference"], row["claim"]) for row in rows] == [
        ("cocomix", "ntp", "better"), ("kd", "ntp", "within noise"), ("pause", "ntp", "worse"),
        ("cocomix_add", "ntp", "better"), ("cocomix_add", "cocomix", "within noise"),
    ]
    assert "1,000 parameters, 6e+03 training FLOPs/token" in verdict_text(rows)[0]


def test_write_report_writes_every_file(tmp_path: Path):
    files = write_report([with_intervals(NTP, 1.0), with_intervals(COCOMIX, 1.0)], tmp_path / "report")
    content = json.loads(files.json_path.read_text())
    assert [row["branch"] for row in content["table"]] == ["ntp", "cocomix"]
    assert content["tokens_to_match"][0]["candidate_tokens"] == pytest.approx(2000 + 1000 / 3)
    assert [BranchCurve.from_dict(data) for data in content["curves"]] == [with_intervals(NTP, 1.0), with_intervals(COCOMIX, 1.0)]
    assert content["verdict"][0].startswith("cocomix vs ntp: val_ppl 26 [25, 27] vs 30 [29, 31]")
    assert files.summary["cocomix/saving_fraction"] == pytest.approx(1 - (2000 + 1000 / 3) / 3000)
    assert files.summary["ntp/final_val_ppl"] == 30.0

    markdown = files.markdown_path.read_text()
    assert "ntp" in markdown and "cocomix" in markdown and "22.2%" in markdown
    assert markdown.index("## Verdict") < markdown.index("## Tokens to match")
    page = files.html_path.read_text()
    assert page == report_html(files)
    assert page.count("data:image/png;base64,") == len(files.plots) == 1 and "<td>cocomix</td>" in page
