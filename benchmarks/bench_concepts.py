"""Cost of concept labels per batch, in units of one NTP student step (target: <= 3.5x).

Shape: batch 8 x 256 tokens, fp32, 2 threads. Teacher: GPT-2-small-shaped GPT2LMHeadModel
(768 wide, 12 layers, random weights); SAE: 32768 latents, k=32 at layer 5; K=4 labels.
Student: GPT2LMHeadModel 256 wide, 4 layers, forward + backward. Also times a naive
extractor (full backward with parameter grads, dense B x T x C scores) for comparison.

    python -m benchmarks.bench_concepts [--reps 2] [--batch 8] [--seq 256] [--allocator both]

Each memory regime (benchmarks/allocator.py) runs in its own process.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.allocator import add_allocator_argument, enter_regime
from benchmarks.bench_train import label_pass_flops_per_token
from cocomix_core.concepts.labels import ConceptExtractor, next_token_loss
from cocomix_core.concepts.sae import TopKSAE
from cocomix_core.training.trainer import flops_per_token


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def naive_labels(teacher: GPT2LMHeadModel, sae: TopKSAE, ids: torch.Tensor, layer: int, k: int) -> torch.Tensor:
    teacher.requires_grad_(True)
    teacher.zero_grad(set_to_none=True)
    out = teacher(input_ids=ids, output_hidden_states=True, use_cache=False)
    x = out.hidden_states[layer + 1]
    x.retain_grad()
    next_token_loss(out.logits, ids).backward()
    with torch.no_grad():
        latents, _ = sae.encode(x.detach())
        scores = (x.grad @ sae.decoder.weight) * latents
        labels = scores.topk(k, dim=-1).indices
    teacher.requires_grad_(False)
    teacher.zero_grad(set_to_none=True)
    return labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-naive", action="store_true")
    add_allocator_argument(parser)
    args = parser.parse_args()
    if not enter_regime(args, "benchmarks.bench_concepts"):
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ids = torch.randint(0, 50257, (args.batch, args.seq))
    student = GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=args.seq)).train()
    student.config.use_cache = False

    def ntp_step() -> None:
        student.zero_grad(set_to_none=True)
        next_token_loss(student(input_ids=ids, use_cache=False).logits, ids).backward()

    teacher = GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024)).eval()
    sae = TopKSAE(32768, 768, 32)
    with torch.no_grad():
        sae.decoder.weight.copy_(F.normalize(torch.randn(768, 32768), dim=0))
        sae.encoder.weight.copy_(sae.decoder.weight.t())
    extractor = ConceptExtractor(teacher, sae, layer_index=5)

    t_ntp = timed(ntp_step, args.reps)
    t_teacher = timed(lambda: extractor.residual_and_grad(ids), args.reps)
    t_labels = timed(lambda: extractor.concept_labels(ids, 4), args.reps)
    print(f"shape: batch {args.batch} x seq {args.seq}, fp32, threads {args.threads}")
    print(f"NTP student step (256w x 4L, fwd+bwd): {t_ntp:8.3f} s  (1.00x)")
    print(f"extractor teacher fwd + partial bwd:  {t_teacher:8.3f} s  ({t_teacher / t_ntp:.2f}x)")
    print(f"extractor labels per batch (total):   {t_labels:8.3f} s  ({t_labels / t_ntp:.2f}x, target <= 3.5x)")
    label_flops = label_pass_flops_per_token(teacher.config, 5, sae.num_latents, args.seq)
    print(f"FLOPs alone: label pass {label_flops / flops_per_token(student.config, args.seq):.2f}x the NTP step")
    if not args.skip_naive:
        t_naive = timed(lambda: naive_labels(teacher, sae, ids, 5, 4), args.reps)
        print(f"naive extractor (param grads, dense): {t_naive:8.3f} s  ({t_naive / t_ntp:.2f}x)")
        ours = extractor.concept_labels(ids, 4)
        ref = naive_labels(teacher, sae, ids, 5, 4)
        same = (ours.sort(-1).values == ref.sort(-1).values).all(-1).float().mean()
        print(f"label sets equal to naive on {100 * float(same):.1f}% of tokens (the rest: ties among zero scores, which the SPEC leaves in any order, or fp32 near-ties)")


if __name__ == "__main__":
    main()
