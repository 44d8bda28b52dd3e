"""How well a student predicts the teacher's concepts (SPEC §11), on the validation windows evaluation scores.

    topk_overlap(concept_logits, labels)            per token: |top-K of z[t] ∩ label[t]| / K
    frequency_overlap(label_counts, labels)         the same for a predictor of the K most frequent labels
    checkpoint_overlap(model, windows, labels, b)   a checkpoint's mean overlap

K is the labels per token (the label cache's k). The frequency predictor is the floor a student
must beat to have learned more than which concepts are common.
"""

from __future__ import annotations

import numpy as np
import torch

OVERLAP_METRIC = "eval/concept_topk_overlap"
FREQUENCY_METRIC = "concepts/frequency_topk_overlap"


def topk_overlap(concept_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per token, the share of its K labels found among the K largest concept logits (…×C, …×K -> …)."""
    k = labels.shape[-1]
    predicted = concept_logits.topk(k, dim=-1).indices
    hits = (labels.unsqueeze(-1) == predicted.unsqueeze(-2)).any(-1)
    return hits.float().mean(-1)


def frequency_overlap(label_counts: np.ndarray, labels: np.ndarray) -> float:
    """Mean overlap of the constant prediction "the K most often chosen training labels" with `labels` (…×K)."""
    k = labels.shape[-1]
    most_chosen = np.lexsort((np.arange(len(label_counts)), -label_counts))[:k]  # ties: smaller id first
    return float(np.isin(labels, most_chosen).mean())


@torch.inference_mode()
def checkpoint_overlap(model: torch.nn.Module, windows: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    """Mean `topk_overlap` of the model's concept logits over every token of `windows` (V×T) against `labels` (V×T×K)."""
    if len(windows) != len(labels):
        raise ValueError(f"{len(windows)} validation windows but labels for {len(labels)}: the label cache was "
                         "built for other eval.val_windows")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for first in range(0, len(windows), batch_size):
            ids = torch.as_tensor(windows[first : first + batch_size], device=device)
            batch_labels = torch.as_tensor(np.asarray(labels[first : first + batch_size], dtype=np.int64), device=device)
            logits = model.transformer(input_ids=ids, use_cache=False).concept_logits  # the trunk: no LM head needed
            total += float(topk_overlap(logits.float(), batch_labels).double().sum())
    finally:
        model.train(was_training)
    return total / labels.shape[0] / labels.shape[1]
