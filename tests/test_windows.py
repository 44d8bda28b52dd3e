"""Training and validation windows (SPEC §1): bounds, shifts, determinism, coverage, resume."""

from __future__ import annotations

import numpy as np
import pytest

from cocomix_core.data.windows import TrainWindows, validation_windows

T = 8


def stream(length: int) -> np.ndarray:
    return np.arange(length, dtype=np.uint16)


def epoch_starts(windows: TrainWindows, epoch: int) -> list[int]:
    n = windows.windows_per_epoch
    return [windows.start_of(g) for g in range(epoch * n, (epoch + 1) * n)]


@pytest.mark.parametrize("length", [T, T + 3, 10 * T, 10 * T + 5, 10 * T + T - 1])
def test_windows_lie_inside_the_stream_and_have_length_T(length):
    windows = TrainWindows(stream(length), T, seed=0)
    assert windows.windows_per_epoch == length // T
    for g in range(3 * windows.windows_per_epoch):
        start = windows.start_of(g)
        sample = windows.sample(g)
        assert 0 <= start and start + T <= length
        assert sample.dtype == np.int64 and sample.shape == (T,)
        np.testing.assert_array_equal(sample, np.arange(start, start + T))


@pytest.mark.parametrize("length", [10 * T, 10 * T + 5])
def test_each_window_is_visited_once_per_epoch_with_its_shift_in_range(length):
    # Window i starts in [i*T, i*T + T] (last: [i*T, i*T + remainder]); these ranges are ordered,
    # so the sorted starts of one epoch must fall one per range.
    windows = TrainWindows(stream(length), T, seed=3)
    n, remainder = windows.windows_per_epoch, length - windows.windows_per_epoch * T
    for epoch in range(5):
        shifts = [start - i * T for i, start in enumerate(sorted(epoch_starts(windows, epoch)))]
        assert len(shifts) == n
        assert all(0 <= shift <= T for shift in shifts[:-1])
        assert 0 <= shifts[-1] <= remainder


def test_shifts_cover_zero_to_T_inclusive():
    windows = TrainWindows(stream(50 * T), T, seed=0)
    shifts = set()
    for epoch in range(20):
        shifts |= {start - i * T for i, start in enumerate(sorted(epoch_starts(windows, epoch))[:-1])}
    assert shifts == set(range(T + 1))


def test_without_remainder_the_last_window_is_unshifted():
    windows = TrainWindows(stream(6 * T), T, seed=1)
    for epoch in range(10):
        assert max(epoch_starts(windows, epoch)) == 5 * T


def test_deterministic_for_seed_and_epoch_and_different_across_epochs_and_seeds():
    tokens = stream(40 * T + 3)
    one, two, other = TrainWindows(tokens, T, seed=7), TrainWindows(tokens, T, seed=7), TrainWindows(tokens, T, seed=8)
    assert epoch_starts(one, 0) == epoch_starts(two, 0)
    assert epoch_starts(one, 4) == epoch_starts(two, 4)
    assert epoch_starts(one, 0) != epoch_starts(one, 1)
    assert epoch_starts(one, 0) != epoch_starts(other, 0)


def test_resumed_iteration_equals_continuous_iteration():
    tokens = stream(13 * T + 5)
    continuous = TrainWindows(tokens, T, seed=11)
    expected = [continuous.sample(g) for g in range(60)]  # several epochs, in order
    for resume_at in (0, 7, 13, 29, 52):
        resumed = TrainWindows(tokens, T, seed=11)  # a fresh object, as after a restart
        for g in range(resume_at, 60):
            np.testing.assert_array_equal(resumed.sample(g), expected[g])


def test_batch_stacks_consecutive_samples():
    windows = TrainWindows(stream(20 * T), T, seed=2)
    batch = windows.batch(17, 5)
    assert batch.shape == (5, T) and batch.dtype == np.int64
    np.testing.assert_array_equal(batch, np.stack([windows.sample(g) for g in range(17, 22)]))


def test_validation_windows_are_unshifted_and_bounded():
    tokens = stream(5 * T + 3)
    windows = validation_windows(tokens, T)
    assert windows.shape == (5, T) and windows.dtype == np.int64
    np.testing.assert_array_equal(windows, np.arange(5 * T).reshape(5, T))
    np.testing.assert_array_equal(validation_windows(tokens, T, max_windows=2), windows[:2])
    assert validation_windows(tokens, T, max_windows=50).shape == (5, T)


def test_too_short_splits_and_bad_block_sizes_are_errors():
    with pytest.raises(ValueError, match=r"training split has 7 tokens, fewer than one window of block_size=8"):
        TrainWindows(stream(T - 1), T, seed=0)
    with pytest.raises(ValueError, match="block_size must be at least 2"):
        TrainWindows(stream(100), 1, seed=0)
    with pytest.raises(ValueError, match=r"validation split has 7 tokens, fewer than one window of block_size=8"):
        validation_windows(stream(T - 1), T)
