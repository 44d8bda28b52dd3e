"""Training-step throughput: NTP vs CoCoMix with online and cached concept labels.

    python -m benchmarks.bench_train [--steps 5] [--threads 2] [--shapes fixed,cpu] [--allocator both]

Times the real training step (`accumulate_gradients` + clip + AdamW) on random token ids, fp32,
one process. Shapes:
    fixed  width 256, 4 layers, 4 heads, batch 8 × 256 tokens, C=32768, k_mix=32; online labels
           from a random GPT-2-small-shaped teacher with a 32k TopK(32) SAE at layer 5
    cpu    the `cpu` preset's arms, teacher and SAE (only while it trains its own teacher; its pretrained
           SmolLM2 teacher is timed by benchmarks/bench_teacher.py)
Targets: CoCoMix/NTP step time <= 5x with online labels, <= 1.8x with cached labels.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import numpy as np
import torch
from accelerate import Accelerator
from transformers import PretrainedConfig

from benchmarks.allocator import add_allocator_argument, enter_regime
from cocomix_core.concepts.labels import ConceptExtractor, LabelCache, build_label_cache
from cocomix_core.concepts.sae import TopKSAE
from cocomix_core.data.windows import TrainWindows
from cocomix_core.model.build import TrainJob, build_model, job_for_branch
from cocomix_core.training.trainer import (
    accumulate_gradients,
    build_optimizer,
    flops_per_token,
    peak_flops,
    set_threads,
)
from settings import ExperimentSettings, load_settings, training_branches

# The fixed comparison shape; the teacher is GPT-2-small-shaped (random weights) with a 32k SAE at layer 5.
FIXED_SHAPE = [
    "arms.ntp.model={width: 256, depth: 4, heads: 4}", "arms.cocomix.model={width: 256, depth: 4, heads: 4}",
    "arms.cocomix.concept_num=32", "train.batch_size=8", "data.block_size=256",
    "teacher.model={width: 768, depth: 12, heads: 12}", "sae.num_latents=32768", "sae.k=32", "sae.layer_index=5",
    # GPT-2 tokens and a GPT-2-shaped (random) teacher, whatever the cpu preset's own teacher is
    "tokenizer.name=gpt2", "teacher.pretrained=null",
    "teacher.train={steps: 1, batch_size: 1, lr: 1.0e-3, min_lr: 0, warmup_steps: 0, eval_every: 1, checkpoint_every: 1}",
]


def jobs_for(shape: str, steps: int) -> tuple[TrainJob, TrainJob, ExperimentSettings]:
    """(NTP job, CoCoMix job, settings) of a benchmark shape: `fixed` or a preset name."""
    overrides = [f"train.steps={steps}", "train.warmup_steps=0", "train.precision=fp32",
                 f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    settings = load_settings("cpu" if shape == "fixed" else shape, overrides + (FIXED_SHAPE if shape == "fixed" else []))
    jobs = {b.kind: job_for_branch(settings, b) for b in training_branches(settings)}
    return jobs["ntp"], jobs["cocomix"], settings


def label_pass_flops_per_token(teacher: PretrainedConfig, sae_layer: int, num_latents: int, block_size: int) -> float:
    """FLOPs per token of one online label pass: the teacher forward, input gradients from the loss down
    to block `sae_layer` (no parameter gradients), and the SAE encoder; the same terms as flops_per_token."""
    d, layers, vocab = teacher.n_embd, teacher.n_layer, teacher.vocab_size
    block_params, above = 12 * d * d + 13 * d, layers - sae_layer - 1
    forward = 2 * (layers * block_params + vocab * d) + 4 * layers * block_size * d
    backward = 2 * (above * block_params + vocab * d) + 8 * above * block_size * d
    return forward + backward + 2 * d * num_latents


def seconds_per_step(arms: list[tuple[str, TrainJob, object]], windows: TrainWindows, steps: int) -> dict[str, float]:
    """Median wall time of one optimizer step per arm, after one warm-up step each.

    The arms take turns step by step, so that a burst of load from elsewhere on the machine
    slows them alike instead of skewing one arm's figure.
    """
    accelerator = Accelerator(cpu=True)
    models = {name: job.build_model() for name, job, _ in arms}
    optimizers = {name: build_optimizer(models[name], job.train, accelerator.device) for name, job, _ in arms}
    times: dict[str, list[float]] = {name: [] for name, _, _ in arms}
    for step in range(steps + 1):
        for name, job, labels in arms:
            model, optimizer = models[name], optimizers[name]
            start = time.perf_counter()
            accumulate_gradients(model, job, step, windows, labels, accelerator, contextlib.nullcontext())
            torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(arm_times[1:])) for name, arm_times in times.items()}


def bench_shape(shape: str, steps: int) -> None:
    ntp, cocomix, settings = jobs_for(shape, steps + 1)
    if settings.teacher.pretrained:
        raise SystemExit(f"{shape}: teacher.pretrained={settings.teacher.pretrained}; time it with benchmarks/bench_teacher.py")
    teacher_shape, sae_layer = settings.teacher.model, settings.sae.layer_index
    tokens = np.random.default_rng(0).integers(0, 50256, 2_000_000, dtype=np.uint16)
    windows = TrainWindows(tokens, ntp.block_size, ntp.window_seed)
    torch.manual_seed(0)
    teacher = build_model("ntp", teacher_shape, ntp.block_size, seed=0)
    sae = TopKSAE(cocomix.concept_dim, teacher_shape.width, settings.sae.k)
    extractor = ConceptExtractor(teacher, sae, sae_layer)
    samples = (steps + 1) * cocomix.train.batch_size
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        cache = LabelCache(build_label_cache(extractor, windows, samples, cocomix.train.batch_size,
                                             cocomix.labels_per_token, folder, provenance={"bench": shape}))
        cache_build_s = time.perf_counter() - start
        rows = [("ntp", ntp, None), ("cocomix cached", cocomix, cache), ("cocomix online", cocomix, extractor)]
        timings = seconds_per_step(rows, windows, steps)

    peak, source = peak_flops(torch.device("cpu"))
    tokens_per_step = ntp.train.batch_size * ntp.block_size
    print(f"\n== {shape}: ntp {ntp.shape.width}x{ntp.shape.depth}, cocomix {cocomix.shape.width}x{cocomix.shape.depth} "
          f"C={cocomix.concept_dim} k_mix={cocomix.concept_num}, batch {ntp.train.batch_size}x{ntp.block_size}, "
          f"teacher {teacher_shape.width}x{teacher_shape.depth}, SAE layer {sae_layer}; peak {peak / 1e9:.0f} GFLOP/s ({source})")
    print(f"{'arm':<16}{'s/step':>9}{'tokens/s':>10}{'MFU':>8}{'vs ntp':>8}")
    for name, job, _ in rows:
        seconds = timings[name]
        model_flops = flops_per_token(job.build_model().config, job.block_size)
        mfu = tokens_per_step / seconds * model_flops / peak  # the teacher's work is not model FLOPs
        print(f"{name:<16}{seconds:>9.3f}{tokens_per_step / seconds:>10.0f}{mfu:>8.1%}{seconds / timings['ntp']:>7.2f}x")
    ntp_flops = flops_per_token(ntp.build_model().config, ntp.block_size)
    cocomix_flops = flops_per_token(cocomix.build_model().config, cocomix.block_size)
    label_flops = label_pass_flops_per_token(teacher.config, sae_layer, cocomix.concept_dim, ntp.block_size)
    print(f"FLOPs alone, vs ntp: cocomix cached {cocomix_flops / ntp_flops:.2f}x, "
          f"online {(cocomix_flops + label_flops) / ntp_flops:.2f}x (label pass {label_flops / ntp_flops:.2f}x)")
    print(f"label cache build: {samples} samples in {cache_build_s:.2f}s ({samples * ntp.block_size / cache_build_s:.0f} tokens/s)")
    print("targets: cocomix cached <= 1.80x, online <= 5.00x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="fixed", help="fixed and/or a preset with a trained teacher")
    add_allocator_argument(parser)
    args = parser.parse_args()
    if not enter_regime(args, "benchmarks.bench_train"):
        return
    set_threads(args.threads)
    for shape in args.shapes.split(","):
        bench_shape(shape, args.steps)


if __name__ == "__main__":
    main()
