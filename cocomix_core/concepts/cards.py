"""Concept cards (SPEC §11): each SAE latent's top activating corpus contexts and its activation frequency.

Gathered during the label pass (`labels.build_label_cache`), from the SAE latents it computes
anyway, so a card costs no extra teacher pass:

    collector = CardCollector(num_latents)
    collector.update(attribution, labels, offsets)     # per batch: latents on the support, chosen labels
    cards = collector.finish(train_tokens)             # contexts read from the token stream
    cards.save(folder / CARDS_FILE); ConceptCards.load(...)

A latent keeps its TOP_CONTEXTS highest activations at distinct corpus offsets (training windows
overlap, and a long label pass visits a token once per epoch: the same text is shown once).
A context is CONTEXT_BEFORE tokens, the firing token, CONTEXT_AFTER tokens of the training split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol

import numpy as np

from cocomix_core.plumbing.files import atomic_path

if TYPE_CHECKING:
    import torch

CARDS_FILE = "cards.npz"
TOP_CONTEXTS = 10
CONTEXT_BEFORE, CONTEXT_AFTER = 8, 3  # 12 tokens, the firing one at index CONTEXT_BEFORE
NO_TOKEN = -1  # context slots beyond the ends of the stream, or of an unused context


class SAESupport(Protocol):
    """A batch's SAE support, as the label pass's `Attribution` holds it (named here, not imported: no cycle)."""

    indices: torch.Tensor  # B×T×k_sae latent ids
    latents: torch.Tensor  # B×T×k_sae activations on the support


@dataclass
class ConceptCards:
    """Every latent's card data; `contexts[c, j]` is the j-th strongest context of latent c (NO_TOKEN padded)."""

    active_counts: np.ndarray  # C int64: tokens where the latent was active (on the SAE support, a > 0)
    label_counts: np.ndarray  # C int64: times it was chosen as one of a token's K labels
    tokens: int  # tokens in the pass
    top_values: np.ndarray  # C×TOP_CONTEXTS float32, -inf where unused
    contexts: np.ndarray  # C×TOP_CONTEXTS×(CONTEXT_BEFORE + 1 + CONTEXT_AFTER) int64

    @property
    def num_latents(self) -> int:
        return len(self.active_counts)

    def frequency(self, latent: int) -> float:
        """Share of the pass's tokens on which `latent` was active."""
        return float(self.active_counts[latent]) / max(self.tokens, 1)

    def most_chosen(self, count: int) -> list[int]:
        """The `count` latents most often chosen as labels (ties: smaller id first), never-chosen ones left out."""
        order = np.lexsort((np.arange(self.num_latents), -self.label_counts))
        return [int(latent) for latent in order[:count] if self.label_counts[latent] > 0]

    def used_contexts(self, latent: int) -> list[tuple[float, np.ndarray]]:
        """(activation, context ids) of the latent's contexts, strongest first."""
        return [(float(value), self.contexts[latent, j]) for j, value in enumerate(self.top_values[latent])
                if np.isfinite(value)]

    def save(self, path: str | os.PathLike) -> None:
        """Write the cards atomically (compressed: most latents of a big SAE have few contexts)."""
        with atomic_path(path) as temp, open(temp, "wb") as handle:
            np.savez_compressed(handle, active_counts=self.active_counts, label_counts=self.label_counts,
                                tokens=np.int64(self.tokens), top_values=self.top_values, contexts=self.contexts)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ConceptCards":
        with np.load(Path(path)) as stored:
            return cls(active_counts=stored["active_counts"], label_counts=stored["label_counts"],
                       tokens=int(stored["tokens"]), top_values=stored["top_values"], contexts=stored["contexts"])


class CardCollector:
    """Running top contexts, activation counts and label counts of every latent over a label pass."""

    def __init__(self, num_latents: int, top: int = TOP_CONTEXTS) -> None:
        self.top = top
        self.values = np.full((num_latents, top), -np.inf, dtype=np.float32)
        self.offsets = np.full((num_latents, top), NO_TOKEN, dtype=np.int64)
        self.active_counts = np.zeros(num_latents, dtype=np.int64)
        self.label_counts = np.zeros(num_latents, dtype=np.int64)
        self.tokens = 0

    def update(self, attribution: SAESupport, labels: torch.Tensor, offsets: np.ndarray) -> None:
        """Fold in one batch: its SAE support (B×T×k_sae), its labels (B×T×K) and each token's corpus offset (B×T)."""
        values = attribution.latents.detach().float().cpu().numpy().reshape(len(offsets.ravel()), -1)
        latents = attribution.indices.cpu().numpy().reshape(values.shape)
        token_offsets = np.broadcast_to(offsets.reshape(-1, 1), values.shape)
        active = values > 0
        self.active_counts += np.bincount(latents[active], minlength=len(self.active_counts))
        self.label_counts += np.bincount(labels.cpu().numpy().ravel(), minlength=len(self.label_counts))
        self.tokens += values.shape[0]
        self._merge(values[active], latents[active], token_offsets[active])

    def _merge(self, values: np.ndarray, latents: np.ndarray, offsets: np.ndarray) -> None:
        """Keep each latent's `top` highest values at distinct offsets among its old entries and these candidates."""
        beats = values > self.values[latents, -1]  # most candidates lose to a latent's current last entry
        values, latents, offsets = values[beats], latents[beats], offsets[beats]
        if not len(values):
            return
        touched = np.unique(latents)
        values = np.concatenate([self.values[touched].ravel(), values])
        latents = np.concatenate([np.repeat(touched, self.top), latents])
        offsets = np.concatenate([self.offsets[touched].ravel(), offsets])
        order = np.lexsort((-values, latents))  # by latent, strongest first
        values, latents, offsets = values[order], latents[order], offsets[order]
        # One entry per (latent, offset): np.unique's first index is the strongest, the array being sorted so.
        _, first = np.unique(latents * (int(offsets.max()) + 2) + offsets + 1, return_index=True)
        first = np.sort(first)
        values, latents, offsets = values[first], latents[first], offsets[first]
        rank = np.arange(len(latents)) - np.searchsorted(latents, latents, side="left")
        kept = (rank < self.top) & np.isfinite(values)
        self.values[touched], self.offsets[touched] = -np.inf, NO_TOKEN
        self.values[latents[kept], rank[kept]] = values[kept]
        self.offsets[latents[kept], rank[kept]] = offsets[kept]

    def finish(self, stream: np.ndarray) -> ConceptCards:
        """The cards, each context read from `stream` (the token stream the offsets index)."""
        return ConceptCards(active_counts=self.active_counts.copy(), label_counts=self.label_counts.copy(),
                            tokens=self.tokens, top_values=self.values.copy(),
                            contexts=contexts_at(stream, self.offsets))


def contexts_at(stream: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The CONTEXT_BEFORE + 1 + CONTEXT_AFTER tokens around each offset (offsets.shape + (width,)), NO_TOKEN padded."""
    span = np.arange(-CONTEXT_BEFORE, CONTEXT_AFTER + 1)
    where = offsets[..., None] + span
    inside = (offsets[..., None] >= 0) & (where >= 0) & (where < len(stream))
    picked = np.asarray(stream[np.clip(where, 0, len(stream) - 1).ravel()], dtype=np.int64).reshape(where.shape)
    return np.where(inside, picked, NO_TOKEN)


def shown_latents(cards: ConceptCards, count: int, extra: Iterable[int] = ()) -> list[int]:
    """The latents the report shows: the `count` most often chosen as labels, then `extra` ids not among them."""
    chosen = cards.most_chosen(count)
    return chosen + [latent for latent in dict.fromkeys(extra) if latent not in chosen and latent < cards.num_latents]
