"""CPU step-time benchmark: NTP GPT-2 vs the CoCoMix student, and gathered vs dense concept compression.

Run from the repo root: python -m benchmarks.bench_models [--allocator both]
(fp32, 2 threads; prints ms/step and ratios vs the NTP step, per memory regime: see benchmarks/allocator.py)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.allocator import add_allocator_argument, enter_regime
from cocomix_core.model.modeling_cocomix import (
    CoCoMixConfig,
    CoCoMixForCausalLM,
    compress_sparse_concepts,
)

WIDTH, LAYERS, HEADS, BATCH, SEQ = 256, 4, 4, 8, 256
CONCEPTS, K_MIX, K_LABELS, VOCAB, LAMBDA = 32768, 32, 4, 50257, 0.1
WARMUP, REPEATS = 2, 5

GPT2_KWARGS = dict(n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=SEQ,
                   resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)


def median_ms(*steps: Callable[[], None]) -> list[float]:
    """Median wall time of each step in ms, after warmup; the steps alternate so that they share any CPU contention."""
    for _ in range(WARMUP):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(REPEATS):
        for step, step_times in zip(steps, times):
            start = time.perf_counter()
            step()
            step_times.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(step_times) for step_times in times]


def dense_compress(values: torch.Tensor, indices: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """The C-wide reference: scatter z_k into a dense vector and multiply by the whole weight."""
    z_k = torch.zeros(*values.shape[:-1], layer.in_features, dtype=values.dtype).scatter(-1, indices, values)
    return layer(z_k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_allocator_argument(parser)
    if not enter_regime(parser.parse_args(), "benchmarks.bench_models"):
        return
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    concept_labels = torch.randint(0, CONCEPTS, (BATCH, SEQ, K_LABELS))

    ntp = GPT2LMHeadModel(GPT2Config(**GPT2_KWARGS)).train()
    cocomix = CoCoMixForCausalLM(CoCoMixConfig(**GPT2_KWARGS, concept_dim=CONCEPTS, concept_num=K_MIX,
                                               insert_layer_index=LAYERS // 2)).train()

    def ntp_step() -> None:
        ntp.zero_grad(set_to_none=True)
        ntp(ids, labels=ids).loss.backward()

    def cocomix_step() -> None:
        cocomix.zero_grad(set_to_none=True)
        out = cocomix(ids, labels=ids, concept_labels=concept_labels)  # as the trainer calls it: fused L_c and TopK
        (out.loss + LAMBDA * out.concept_loss).backward()

    layer = cocomix.transformer.compress_layer
    values = torch.randn(BATCH, SEQ, K_MIX, requires_grad=True)
    indices = torch.stack([torch.randperm(CONCEPTS)[:K_MIX] for _ in range(BATCH * SEQ)]).view(BATCH, SEQ, K_MIX)

    def compress_step(compress: Callable) -> Callable[[], None]:
        def step() -> None:
            layer.zero_grad(set_to_none=True)
            values.grad = None
            compress(values, indices, layer).square().mean().backward()
        return step

    ntp_ms, cocomix_ms, gather_ms, dense_ms = median_ms(
        ntp_step, cocomix_step, compress_step(compress_sparse_concepts), compress_step(dense_compress)
    )

    print(f"width {WIDTH}, {LAYERS} layers, {HEADS} heads, batch {BATCH}, seq {SEQ}, C {CONCEPTS}, k_mix {K_MIX}, "
          f"fp32, {torch.get_num_threads()} threads; median of {REPEATS} after {WARMUP} warmup")
    print(f"NTP GPT-2 fwd+bwd        {ntp_ms:9.1f} ms/step   1.00x")
    print(f"CoCoMix fwd+bwd (+L_c)   {cocomix_ms:9.1f} ms/step   {cocomix_ms / ntp_ms:.2f}x NTP (target <= 1.8x)")
    print(f"compress, gathered       {gather_ms:9.1f} ms/step   {gather_ms / ntp_ms:.2f}x NTP")
    print(f"compress, dense C-wide   {dense_ms:9.1f} ms/step   {dense_ms / ntp_ms:.2f}x NTP "
          f"({dense_ms / gather_ms:.1f}x the gathered one)")


if __name__ == "__main__":
    main()
