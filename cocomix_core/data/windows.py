"""Training and validation windows over a token stream (SPEC §1).

An epoch has n = N // T training windows. Window i starts at i*T plus a random
shift in [0, T] (the last one: in [0, N - n*T]) so every epoch sees new
boundaries; windows are visited in a seeded random order. Everything is a pure
function of (seed, epoch), so a run resumed at sample g sees exactly the
batches it would have seen.

Samples are numbered globally: sample g is window order[g % n] of epoch g // n.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


@dataclass(frozen=True)
class EpochPlan:
    """Visiting order and start offsets of one epoch's training windows."""

    order: np.ndarray  # permutation of window indices
    starts: np.ndarray  # start offset of window i (indexed by window index)


class TrainWindows:
    """Shifted, shuffled training windows of `block_size` tokens, addressable by global sample index."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int) -> None:
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        if len(tokens) < block_size:
            raise ValueError(
                f"training split has {len(tokens)} tokens, fewer than one window of block_size={block_size}"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.seed = seed
        self.windows_per_epoch = len(tokens) // block_size
        self._plan = lru_cache(maxsize=2)(self._make_plan)

    def _make_plan(self, epoch: int) -> EpochPlan:
        n, size = self.windows_per_epoch, self.block_size
        rng = _epoch_rng(self.seed, epoch)
        remainder = len(self.tokens) - n * size
        max_shift = np.full(n, size, dtype=np.int64)
        max_shift[-1] = remainder
        shifts = rng.integers(0, max_shift + 1)
        starts = np.arange(n, dtype=np.int64) * size + shifts
        order = rng.permutation(n)
        return EpochPlan(order=order, starts=starts)

    def start_of(self, sample: int) -> int:
        """Token offset where global sample `sample` begins."""
        epoch, position = divmod(sample, self.windows_per_epoch)
        plan = self._plan(epoch)
        return int(plan.starts[plan.order[position]])

    def sample(self, sample: int) -> np.ndarray:
        """Token ids (int64, length block_size) of global sample `sample`."""
        start = self.start_of(sample)
        return np.asarray(self.tokens[start : start + self.block_size], dtype=np.int64)

    def batch(self, first_sample: int, batch_size: int) -> np.ndarray:
        """Samples first_sample .. first_sample+batch_size-1 stacked as a (batch_size, block_size) array."""
        return np.stack([self.sample(g) for g in range(first_sample, first_sample + batch_size)])


def validation_windows(tokens: np.ndarray, block_size: int, max_windows: int | None = None) -> np.ndarray:
    """Unshifted consecutive validation windows, (num_windows, block_size) int64."""
    count = len(tokens) // block_size
    if count == 0:
        raise ValueError(
            f"validation split has {len(tokens)} tokens, fewer than one window of block_size={block_size}"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return np.asarray(tokens[: count * block_size], dtype=np.int64).reshape(count, block_size)
