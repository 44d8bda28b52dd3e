"""What the concepts add to the flow at the `cpu` preset (target: report step + <= 30 s on 2 cores).

The inputs have the `cpu` preset's shapes, built here rather than by a 10-minute flow run:
its CoCoMix student (width 128, depth 4, 2,048 concepts, TopK 16, block 128; GPT-2's 50,257 ids
stand in for SmolLM2's 49,152), cards of a 2,048-latent SAE with every latent's 10 contexts
filled, K = 4 labels on the 32 validation windows evaluation scores, 4 checkpoints.

    python -m benchmarks.bench_concepts_report [--threads 2]

Times, each once after a warm-up of the imports:
    concepts step   CardCollector.update on the label pass's 32 batches (8 windows × 128 tokens, k_sae 32, K 4)
    report step     loading the checkpoint, gather_concepts (24 cards decoded, 3 concepts × 3 prompts steered,
                    32 tokens each) and write_concepts (plot, HTML, markdown, JSON)
    evaluate step   checkpoint_overlap of one checkpoint (paid once per CoCoMix checkpoint)
The validation label pass the concepts step adds (32 windows × 128 tokens of SmolLM2) is the label pass's
speed times 4,096 tokens: see benchmarks/bench_teacher.py.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cocomix_core.concepts.cards import (
    CONTEXT_AFTER,
    CONTEXT_BEFORE,
    TOP_CONTEXTS,
    CardCollector,
    ConceptCards,
)
from cocomix_core.data.tokenizer import gpt2_tokenizer
from cocomix_core.evaluation.concept_quality import checkpoint_overlap
from cocomix_core.model.build import build_model
from cocomix_core.reporting.concepts_report import gather_concepts, write_concepts
from settings import load_settings

LATENTS, BLOCK, VAL_WINDOWS, K, VOCAB = 2048, 128, 32, 4, 50257


class FixedCache:
    """What the report reads of a label cache: its cards and validation labels (here random, cpu-preset sized)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.k = K
        self._cards = ConceptCards(
            active_counts=rng.integers(1, 5000, LATENTS), label_counts=rng.integers(0, 5000, LATENTS),
            tokens=64 * 4 * BLOCK, top_values=np.sort(rng.random((LATENTS, TOP_CONTEXTS)), axis=1)[:, ::-1].astype(np.float32),
            contexts=rng.integers(0, VOCAB, (LATENTS, TOP_CONTEXTS, CONTEXT_BEFORE + 1 + CONTEXT_AFTER)),
        )
        self._val_labels = rng.integers(0, LATENTS, (VAL_WINDOWS, BLOCK, K))

    def cards(self) -> ConceptCards:
        return self._cards

    def val_labels(self) -> np.ndarray:
        return self._val_labels


def card_seconds(rng: np.random.Generator, batches: int = 32, batch: int = 8, k_sae: int = 32) -> float:
    """Seconds of the card bookkeeping over a cpu-preset label pass (random supports and activations)."""
    from cocomix_core.concepts.labels import Attribution

    collector, tokens = CardCollector(LATENTS), batch * BLOCK
    passes = [(Attribution(scores=torch.zeros(batch, BLOCK, k_sae),
                           indices=torch.from_numpy(np.argsort(rng.random((tokens, LATENTS)), axis=1)[:, :k_sae]
                                                    ).reshape(batch, BLOCK, k_sae),
                           latents=torch.rand(batch, BLOCK, k_sae)),
               torch.randint(0, LATENTS, (batch, BLOCK, K)), np.arange(tokens).reshape(batch, BLOCK) + index * tokens)
              for index in range(batches)]
    started = time.perf_counter()
    for attribution, labels, offsets in passes:
        collector.update(attribution, labels, offsets)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings("cpu")
    arm = settings.arms["cocomix"]
    model = build_model("cocomix", arm.model, BLOCK, concept_dim=LATENTS, concept_num=arm.concept_num,
                        insert_layer_index=arm.insert_layer_index, seed=0).eval()
    rng = np.random.default_rng(0)
    cache, tokenizer = FixedCache(rng), gpt2_tokenizer().hf()
    val_tokens = rng.integers(0, VOCAB, 8 * VAL_WINDOWS * BLOCK)
    windows = val_tokens[: VAL_WINDOWS * BLOCK].reshape(VAL_WINDOWS, BLOCK)
    overlap = {"cocomix": [(step * 4 * BLOCK, 0.1) for step in (16, 32, 48, 64)]}

    gather_concepts(cache, tokenizer, settings.concepts.model_copy(update={"steer_concepts": 0}), overlap)  # warm-up
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        started = time.perf_counter()
        model = type(model).from_pretrained(folder).eval()  # the report step loads the final checkpoint
        content = gather_concepts(cache, tokenizer, settings.concepts, overlap, model, val_tokens, "cocomix step_000064")
        write_concepts(content, Path(folder) / "concepts")
        report_seconds = time.perf_counter() - started

    started = time.perf_counter()
    checkpoint_overlap(model, windows, cache.val_labels(), settings.eval.batch_size)
    overlap_seconds = time.perf_counter() - started
    print(f"concepts step, concept cards gathered during the label pass: {card_seconds(rng):.2f} s")
    print(f"report step, concepts added: {report_seconds:.2f} s ({len(content.cards)} cards, "
          f"{len(content.steering)} concepts × {settings.concepts.steer_prompts} prompts steered)")
    print(f"evaluate step, concept overlap of one checkpoint: {overlap_seconds:.2f} s")


if __name__ == "__main__":
    main()
