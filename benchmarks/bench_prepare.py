"""Corpus preparation throughput: prepare_corpus on the SOTU corpus vs raw encode_ordinary_batch.

Run from the repo root: python -m benchmarks.bench_prepare
Both sides use the same texts and thread count; the target is prepare / raw >= 0.8. The two
are timed alternately, best of REPEATS, in wall and in CPU seconds: on a shared machine the
CPU-time ratio is the steadier measure of preparation's own overhead.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from cocomix_core.data.corpus import (
    prepare_corpus,
    sotu_speech_files,
    strip_audience_notes,
)
from cocomix_core.data.tokenizer import gpt2_encoding
from settings.schema import DataSettings

REPEATS = 5


def timed(work: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of every thread of this process) of one call of `work()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    data = DataSettings()  # default: the sotu corpus
    encoding = gpt2_encoding()  # built once outside the timings, as in a long preparation run
    texts = [strip_audience_notes(path.read_text(encoding="utf-8")) for path in sotu_speech_files()]
    tokens = sum(len(ids) + 1 for ids in encoding.encode_ordinary_batch(texts, num_threads=data.encode_workers))

    raw_times, prepare_times = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(REPEATS):
            raw_times.append(timed(lambda: encoding.encode_ordinary_batch(texts, num_threads=data.encode_workers)))
            # A fresh folder per call, so no call is skipped as already prepared.
            prepare_times.append(timed(lambda: prepare_corpus(data, Path(scratch) / f"run{repeat}")))

    print(f"sotu corpus: {len(texts)} documents, {tokens:,} tokens, {data.encode_workers} threads, best of {REPEATS}")
    print(f"{'':<28}{'wall tokens/s':>16}{'CPU tokens/s':>16}")
    raw, prepare = [min(t[i] for t in raw_times) for i in (0, 1)], [min(t[i] for t in prepare_times) for i in (0, 1)]
    print(f"{'raw encode_ordinary_batch':<28}{tokens / raw[0]:>16,.0f}{tokens / raw[1]:>16,.0f}")
    print(f"{'prepare_corpus':<28}{tokens / prepare[0]:>16,.0f}{tokens / prepare[1]:>16,.0f}")
    print(f"{'ratio prepare / raw':<28}{raw[0] / prepare[0]:>16.2f}{raw[1] / prepare[1]:>16.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
