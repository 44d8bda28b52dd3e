"""The unigram floor of a tiny corpus, computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cocomix_core.data.unigram import unigram_perplexity


def test_unigram_perplexity_of_a_tiny_corpus():
    # train 0 0 1 2 over a 4-id vocabulary: counts 2, 1, 1, 0; add-one: 3, 2, 2, 1 over 4 + 4 = 8.
    # val 0 3: p = 3/8 and 1/8, so ppl = exp(-(log 3/8 + log 1/8) / 2) = 1 / sqrt(3/64) = 8 / sqrt(3) = 4.618802
    train, val = np.array([0, 0, 1, 2], dtype=np.uint16), np.array([0, 3], dtype=np.uint16)
    assert unigram_perplexity(train, val, vocab_size=4) == pytest.approx(8 / math.sqrt(3))
    assert 8 / math.sqrt(3) == pytest.approx(4.618802, abs=1e-6)
    # a bigger vocabulary spreads the smoothing mass thinner: p(0) = 3/10, p(3) = 1/10 -> 10 / sqrt(3)
    assert unigram_perplexity(train, val, vocab_size=6) == pytest.approx(10 / math.sqrt(3))


def test_unigram_perplexity_refuses_ids_outside_the_vocabulary_and_empty_splits():
    with pytest.raises(ValueError, match="token id 4 is outside the vocabulary of 4 ids"):
        unigram_perplexity(np.array([0, 4]), np.array([0]), vocab_size=4)
    with pytest.raises(ValueError, match="non-empty"):
        unigram_perplexity(np.array([], dtype=np.uint16), np.array([0]), vocab_size=4)
