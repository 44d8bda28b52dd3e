"""95% intervals, paired differences and the minimal detectable difference, against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cocomix_core.evaluation.intervals import (
    bootstrap_replicates,
    min_detectable_difference,
    paired_bootstrap,
    paired_difference_from_replicates,
    paired_t_difference,
    t_interval,
)

# Student-t quantiles at 2 degrees of freedom have a closed form: t_p = (2p − 1) / sqrt(2p(1 − p)).
T975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # 4.302653
T80_DF2 = 0.60 / math.sqrt(2 * 0.80 * 0.20)  # 1.060660
Z975, Z80 = 1.959964, 0.841621  # normal quantiles (tables)


def test_t_interval_of_three_seeds():
    # mean 31; deviations -1, 1, 0 -> sd = sqrt(2/2) = 1; SE = 1/sqrt(3); half-width = 4.302653 / sqrt(3) = 2.48414
    interval = t_interval([30.0, 32.0, 31.0])
    assert interval.value == 31.0 and interval.n == 3
    assert (interval.lo, interval.hi) == pytest.approx((31 - 2.48414, 31 + 2.48414), abs=1e-5)
    assert T975_DF2 == pytest.approx(4.302653, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 values"):
        t_interval([1.0])


def test_paired_t_difference_excludes_zero_where_the_arms_intervals_overlap():
    # Three seeds with a large seed-to-seed spread that both arms share.
    reference, candidate = [1000.0, 1300.0, 700.0], [950.0, 1240.0, 660.0]
    # each arm's own interval: reference 1000 ± 4.302653 · 300/sqrt(3) = 1000 ± 745.2 contains the candidate's 950
    own = t_interval(reference)
    assert own.lo < t_interval(candidate).value < own.hi
    # differences -50, -60, -40: mean -50, sd 10, SE 10/sqrt(3) = 5.773503, half-width 4.302653 · 5.773503 = 24.8414
    difference = paired_t_difference(reference, candidate)
    assert difference.value == pytest.approx(-50.0)
    assert (difference.lo, difference.hi) == pytest.approx((-74.8414, -25.1586), abs=1e-4)
    assert difference.standard_error == pytest.approx(5.773503, abs=1e-6)
    assert difference.excludes_zero and difference.method == "paired t" and difference.n == 3
    # minimal detectable difference: (t_0.975 + t_0.80 at 2 df) · SE = (4.302653 + 1.060660) · 5.773503 = 30.9652
    assert difference.min_detectable == pytest.approx((T975_DF2 + T80_DF2) * 5.773503, abs=1e-4)
    assert difference.min_detectable == pytest.approx(30.9652, abs=1e-3)


def test_paired_t_difference_needs_matching_seeds():
    with pytest.raises(ValueError, match="differ in number"):
        paired_t_difference([1.0, 2.0], [1.0])


def test_min_detectable_difference_formula():
    # 1-seed bootstrap: normal quantiles, (1.959964 + 0.841621) · SE = 2.801585 · SE
    assert min_detectable_difference(1.0, None) == pytest.approx(Z975 + Z80, abs=1e-6)
    assert min_detectable_difference(2.5, None) == pytest.approx(2.5 * 2.801585, abs=1e-5)
    # 3 seeds: Student-t at 2 degrees of freedom, (4.302653 + 1.060660) · SE = 5.363313 · SE
    assert min_detectable_difference(1.0, 3) == pytest.approx(5.363313, abs=1e-6)
    # 2 seeds (1 df): t_p = tan(π (p − 1/2)): tan(0.475π) + tan(0.3π) = 12.706205 + 1.376382
    assert min_detectable_difference(1.0, 2) == pytest.approx(12.706205 + 1.376382, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        min_detectable_difference(1.0, 1)


def test_paired_bootstrap_on_two_windows_spans_the_two_differences():
    # Two validation windows; window losses per arm. Each resample draws 2 window indices (the same for both arms),
    # so the resampled mean difference is d0 = -1.0 (both draws window 0, probability 1/4), d1 = -0.4 (both window 1,
    # 1/4) or their mean -0.7 (1/2). With 1000 resamples each extreme holds ~25% > 2.5% of them, so the 95%
    # percentile interval is exactly [-1.0, -0.4]; the value is mean(candidate) - mean(reference) = 1.3 - 2.0.
    reference, candidate = [1.0, 3.0], [0.0, 2.6]
    difference = paired_bootstrap(reference, candidate, samples=1000, seed=0)
    assert difference.value == pytest.approx(-0.7)
    assert (difference.lo, difference.hi) == pytest.approx((-1.0, -0.4))
    assert difference.excludes_zero and difference.method == "paired bootstrap" and difference.n == 2
    # SE: the three values with probabilities 1/4, 1/2, 1/4 have variance 0.3² / 2 = 0.045, sd 0.2121 (sampled: ~)
    assert difference.standard_error == pytest.approx(0.2121, rel=0.08)
    assert difference.min_detectable == pytest.approx(2.801585 * difference.standard_error, rel=1e-6)
    # the arms' own bootstrap intervals ([1, 3] and [0, 2.6]) overlap; the pairing is what decides
    assert paired_bootstrap(reference, candidate, samples=1000, seed=0) == difference  # fixed seed: reproducible


def test_paired_bootstrap_recomputes_each_arms_metric_on_each_resample():
    # The statistic is the perplexity exp(mean window loss), computed per arm and then subtracted:
    # both draws window 0: e^0 - e^1 = 1 - 2.718282 = -1.718282; both window 1: e^2.6 - e^3 = 13.463738 - 20.085537
    # = -6.621799; one of each: e^1.3 - e^2 = 3.669297 - 7.389056 = -3.719759 (also the value on the full sample).
    def perplexity(losses: list[float]) -> float:
        return math.exp(np.mean(losses))

    difference = paired_bootstrap([1.0, 3.0], [0.0, 2.6], perplexity, samples=1000, seed=3)
    assert difference.value == pytest.approx(-3.719759, abs=1e-6)
    assert (difference.lo, difference.hi) == pytest.approx((-6.621799, -1.718282), abs=1e-6)


def test_a_constant_shift_gives_a_zero_width_interval():
    # candidate = reference - 0.5 on every item: every resample's difference is -0.5
    reference = [2.0, 5.0, 3.5, 4.0]
    difference = paired_bootstrap(reference, [value - 0.5 for value in reference], samples=200, seed=1)
    assert (difference.value, difference.lo, difference.hi) == pytest.approx((-0.5, -0.5, -0.5))
    assert difference.standard_error == pytest.approx(0.0, abs=1e-12)


def test_replicates_pair_only_when_both_arms_used_the_same_resamples():
    reference = bootstrap_replicates([1.0, 3.0], samples=500, seed=7)
    candidate = bootstrap_replicates([0.0, 2.6], samples=500, seed=7)
    from_replicates = paired_difference_from_replicates(-0.7, reference, candidate, items=2)
    assert from_replicates == paired_bootstrap([1.0, 3.0], [0.0, 2.6], samples=500, seed=7)
    with pytest.raises(ValueError, match="equally many"):
        paired_difference_from_replicates(-0.7, reference, candidate[:10], items=2)
    with pytest.raises(ValueError, match="differ in number"):
        paired_bootstrap([1.0, 2.0], [1.0])
