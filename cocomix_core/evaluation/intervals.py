"""95% intervals and paired differences (SPEC §10): what a comparison of two arms may claim.

    t_interval(values)                          mean and Student-t interval across seeds
    paired_t_difference(reference, candidate)   ≥ 2 seeds: t-interval of the per-seed differences
    bootstrap_replicates(items, statistic)      a statistic on `samples` resamples of items (fixed seed)
    paired_bootstrap(reference, candidate)      1 seed: the same resamples of the shared windows/items, both arms
    min_detectable_difference(se, seeds)        the effect a study had 80% power to detect at 5% two-sided

Pairing is what makes a study sensitive: both arms share the seed's training windows, its validation
windows and its task items, so most of the seed-to-seed (or item-to-item) spread cancels in the
difference. Each arm's own interval keeps that shared spread and is for reading, never for deciding.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

LEVEL = 0.95  # two-sided confidence of every interval
UPPER = 1 - (1 - LEVEL) / 2  # 0.975: the quantile of a two-sided 95% interval
POWER = 0.80  # of the minimal detectable difference


@dataclass(frozen=True)
class Interval:
    """A value with its 95% interval; `n` is how many seeds (or items) it comes from."""

    value: float
    lo: float | None
    hi: float | None
    n: int = 1

    @property
    def known(self) -> bool:
        return self.lo is not None and self.hi is not None

    def excludes(self, value: float) -> bool:
        """Whether `value` lies outside the interval (False when there is no interval)."""
        return self.known and not (self.lo <= value <= self.hi)


@dataclass(frozen=True)
class PairedDifference:
    """candidate − reference with its 95% interval, standard error and the study's minimal detectable difference."""

    value: float
    lo: float
    hi: float
    standard_error: float
    min_detectable: float
    method: str  # "paired t" (seeds) or "paired bootstrap" (windows/items of one seed)
    n: int  # seeds, or items resampled

    @property
    def excludes_zero(self) -> bool:
        return not (self.lo <= 0.0 <= self.hi)


def t_interval(values: Sequence[float]) -> Interval:
    """Mean and 95% Student-t interval, mean ± t(0.975, n−1) · sd / √n (sd with n−1)."""
    if len(values) < 2:
        raise ValueError(f"a t-interval needs at least 2 values, got {len(values)}")
    mean = float(np.mean(values))
    half = _t_quantile(UPPER, len(values)) * _standard_error(values)
    return Interval(mean, mean - half, mean + half, n=len(values))


def _standard_error(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def _t_quantile(probability: float, n: int) -> float:
    """The Student-t quantile at n − 1 degrees of freedom."""
    # Imported here: scipy.stats costs ~0.5 s, which every evaluate task (bootstrap intervals only) would pay.
    from scipy.stats import t as student_t

    return float(student_t.ppf(probability, n - 1))


def min_detectable_difference(standard_error: float, seeds: int | None) -> float:
    """The smallest true difference the study detects with 80% power at 5% two-sided (SPEC §10):

        MDD = (q_0.975 + q_0.80) × SE

    with q the Student-t quantiles at n − 1 degrees of freedom for n seeds, or the normal quantiles
    (1.95996 + 0.84162 ≈ 2.80) for the one-seed bootstrap (`seeds=None`), SE the paired difference's
    standard error.
    """
    if seeds is None:
        normal = statistics.NormalDist()
        return float((normal.inv_cdf(UPPER) + normal.inv_cdf(POWER)) * standard_error)
    if seeds < 2:
        raise ValueError(f"a t-based detectable difference needs at least 2 seeds, got {seeds}")
    return (_t_quantile(UPPER, seeds) + _t_quantile(POWER, seeds)) * standard_error


def paired_t_difference(reference: Sequence[float], candidate: Sequence[float]) -> PairedDifference:
    """The t-interval of the per-seed differences candidate[i] − reference[i] (index i = one seed)."""
    if len(reference) != len(candidate):
        raise ValueError(f"paired seeds differ in number: {len(reference)} references, {len(candidate)} candidates")
    differences = [c - r for r, c in zip(reference, candidate)]
    interval = t_interval(differences)
    error = _standard_error(differences)
    return PairedDifference(interval.value, interval.lo, interval.hi, error,
                            min_detectable_difference(error, len(differences)), "paired t", len(differences))


def bootstrap_rows(items: int, samples: int, seed: int) -> np.ndarray:
    """The resampled item indices, samples × items; the same for every arm with the same (items, samples, seed)."""
    return np.random.default_rng(seed).integers(0, items, size=(samples, items))


def bootstrap_replicates(
    items: Sequence[Any], statistic: Callable[[list[Any]], float] | None = None, samples: int = 1000, seed: int = 0,
) -> np.ndarray:
    """`statistic` (default: the mean) of each resample of `items` with replacement, in resample order."""
    if len(items) == 0:
        raise ValueError("a bootstrap needs at least one item")
    rows = bootstrap_rows(len(items), samples, seed)
    if statistic is None:
        return np.asarray(items, dtype=np.float64)[rows].mean(axis=1)
    return np.array([statistic([items[index] for index in row]) for row in rows], dtype=np.float64)


def percentile_interval(replicates: Sequence[float]) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of bootstrap replicates."""
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(np.asarray(replicates, dtype=np.float64), [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_interval(
    items: Sequence[Any], statistic: Callable[[list[Any]], float] | None = None, samples: int = 1000, seed: int = 0,
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `statistic` (default: the mean) over resamples of `items`."""
    return percentile_interval(bootstrap_replicates(items, statistic, samples, seed))


def paired_difference_from_replicates(
    value: float, reference_replicates: Sequence[float], candidate_replicates: Sequence[float], items: int,
) -> PairedDifference:
    """The paired bootstrap interval from both arms' replicates on the same resamples (same rows, same order)."""
    if len(reference_replicates) != len(candidate_replicates) or len(reference_replicates) < 2:
        raise ValueError("paired bootstrap replicates must be equally many (at least 2) for both arms")
    differences = np.asarray(candidate_replicates, dtype=np.float64) - np.asarray(reference_replicates, dtype=np.float64)
    lo, hi = percentile_interval(differences)
    error = float(np.std(differences, ddof=1))  # the bootstrap standard error of the difference
    return PairedDifference(value, lo, hi, error, min_detectable_difference(error, None), "paired bootstrap", items)


def paired_bootstrap(
    reference_items: Sequence[Any], candidate_items: Sequence[Any],
    statistic: Callable[[list[Any]], float] | None = None, samples: int = 1000, seed: int = 0,
) -> PairedDifference:
    """candidate − reference of `statistic` over one seed's shared windows/items: each resample draws the same
    item indices for both arms and recomputes both arms' statistic on it."""
    if len(reference_items) != len(candidate_items):
        raise ValueError(f"paired items differ in number: {len(reference_items)} vs {len(candidate_items)}")

    def whole(items: Sequence[Any]) -> float:
        return float(np.mean(items)) if statistic is None else float(statistic(list(items)))

    return paired_difference_from_replicates(
        whole(candidate_items) - whole(reference_items),
        bootstrap_replicates(reference_items, statistic, samples, seed),
        bootstrap_replicates(candidate_items, statistic, samples, seed), len(reference_items),
    )
