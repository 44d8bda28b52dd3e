"""The unigram floor (SPEC §10): the validation perplexity of a model that knows only token frequencies.

A student above this perplexity has not yet learned anything a context could help with, so a
comparison of two such students says nothing about concepts. The frequencies are the training
split's token counts, add-one smoothed over the whole vocabulary (so unseen tokens keep a share):

    p(v) = (count_train(v) + 1) / (N_train + V)
    unigram ppl = exp(−(1/N_val) Σ_t log p(val_t))
"""

from __future__ import annotations

import math

import numpy as np


def unigram_perplexity(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """exp of the mean negative log-probability of `val_tokens` under add-one smoothed train frequencies."""
    if len(train_tokens) == 0 or len(val_tokens) == 0:
        raise ValueError("the unigram perplexity needs non-empty train and validation tokens")
    largest = int(max(train_tokens.max(), val_tokens.max()))
    if largest >= vocab_size:
        raise ValueError(f"token id {largest} is outside the vocabulary of {vocab_size} ids")
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    log_probs = np.log(counts + 1.0) - math.log(len(train_tokens) + vocab_size)
    return float(math.exp(-log_probs[np.asarray(val_tokens, dtype=np.int64)].mean()))
