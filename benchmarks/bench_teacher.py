"""Teacher-side costs: label passes in fp32 and bf16, SAE training, and bf16/fp32 label agreement.

    python -m benchmarks.bench_teacher [--threads 2] [--batches 3] [--parts smollm2,fixed] [--cache DIR]

smollm2  the `cpu` preset's teacher (SmolLM2-135M-Instruct GGUF, converted once into --cache):
         label-pass tokens/s in fp32 and bf16 and their ratio to the preset's NTP step, SAE training
         time and health (FVU, dead latents) with the preset's SAE settings, and the share of tokens whose
         top-K label set is identical between bf16 and fp32 passes (on the preset's training windows).
fixed    bench_train's fixed shape: a random GPT-2-small-shaped teacher with a 32k TopK(32) SAE at layer 5,
         batch 8 x 256: bf16 vs fp32 label pass (target >= 2.5x faster) and the CoCoMix step with online
         labels from the bf16 teacher (fp32 student) vs the NTP step (target <= 3.5x).
Timings alternate between the arms batch by batch (medians), so load from elsewhere hits both alike.
bf16 is only fast on CPUs with native bf16 (avx512_bf16/AMX) or on GPUs; elsewhere it is emulated.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_train import jobs_for, seconds_per_step
from cocomix_core.concepts import teachers
from cocomix_core.concepts.labels import ConceptExtractor, load_teacher
from cocomix_core.concepts.sae import TopKSAE
from cocomix_core.concepts.sae_fit import sae_train_config, train_sae
from cocomix_core.data.corpus import load_split, prepare_corpus
from cocomix_core.data.tokenizer import load_tokenizer, student_vocab_size
from cocomix_core.data.windows import TrainWindows
from cocomix_core.model.build import build_model, job_for_branch
from cocomix_core.training.trainer import set_threads
from settings import load_settings, training_branches


def label_seconds(extractors: dict[str, ConceptExtractor], windows: TrainWindows, batch: int, batches: int,
                  k: int) -> dict[str, float]:
    """Median seconds of one label pass over `batch` windows per extractor, taking turns, after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in extractors}
    for index in range(batches + 1):
        ids = torch.from_numpy(windows.batch(index * batch, batch))
        for name, extractor in extractors.items():
            start = time.perf_counter()
            extractor.concept_labels(ids, k)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values[1:])) for name, values in times.items()}


def label_agreement(fp32: ConceptExtractor, bf16: ConceptExtractor, windows: TrainWindows, batch: int,
                    batches: int, k: int) -> float:
    """Share of tokens whose set of k labels is identical between the bf16 and the fp32 passes."""
    same = total = 0
    for index in range(batches):
        ids = torch.from_numpy(windows.batch(index * batch, batch))
        a, b = fp32.concept_labels(ids, k).sort(-1).values, bf16.concept_labels(ids, k).sort(-1).values
        same += int((a == b).all(-1).sum())
        total += a.shape[0] * a.shape[1]
    return same / total


def bench_smollm2(cache: Path, batches: int, agreement_batches: int) -> None:
    settings = load_settings("cpu")
    started = time.perf_counter()
    folder = teachers.resolve_teacher(settings.teacher.pretrained, cache / "teachers")
    print(f"teacher {settings.teacher.pretrained}: ready in {time.perf_counter() - started:.1f}s ({folder})")
    tokenizer = load_tokenizer(settings.tokenizer.name, folder)
    started = time.perf_counter()
    data_dir = cache / f"data-{tokenizer.digest[:12]}"
    manifest = prepare_corpus(settings.data, data_dir, tokenizer)
    print(f"prepare (or reuse): {time.perf_counter() - started:.1f}s, {manifest['splits']['train']['tokens']} train tokens")
    block, batch, layer = settings.data.block_size, settings.concepts.extract_batch_size, settings.sae.layer_index
    windows = TrainWindows(load_split(data_dir, "train"), block, settings.data.window_seed)

    teacher = load_teacher(folder)
    started = time.perf_counter()
    sae, metrics = train_sae(teacher, windows, layer, sae_train_config(settings.sae, block))
    print(f"SAE at block {layer}: {time.perf_counter() - started:.1f}s for {settings.sae.steps} steps on "
          f"{metrics['tokens_seen']} activations ({settings.sae.activation_tokens} captured); fvu {metrics['fvu']:.3f} (on normalised "
          f"inputs {metrics['fvu_normalized']:.3f}), "
          f"dead {metrics['dead_fraction']:.1%}, mean L0 {metrics['mean_l0']:.1f}  (targets: fvu <= 0.25, dead <= 20%)")

    k = settings.concepts.labels_per_token
    extractors = {"fp32": ConceptExtractor(teacher, sae, layer),
                  "bf16": ConceptExtractor(copy.deepcopy(teacher).to(torch.bfloat16), sae, layer)}
    seconds = label_seconds(extractors, windows, batch, batches, k)
    vocab = student_vocab_size(tokenizer)
    ntp_branch = next(b for b in training_branches(settings) if b.kind == "ntp")
    ntp = job_for_branch(settings, ntp_branch, vocab_size=vocab)
    ntp_seconds = seconds_per_step([("ntp", ntp, None)], windows, batches)["ntp"]
    ntp_token_s = ntp_seconds / (ntp.train.batch_size * block)
    label_tokens = settings.train.steps * settings.train.batch_size * block
    print(f"{'label pass':<12}{'tokens/s':>10}{'vs NTP step/token':>20}{'label cache of the preset':>28}")
    for name, value in seconds.items():
        token_s = value / (batch * block)
        print(f"{name:<12}{1 / token_s:>10.0f}{token_s / ntp_token_s:>19.1f}x{label_tokens * token_s:>26.0f} s")
    print(f"NTP step of the cpu preset (vocab {vocab}): {ntp.train.batch_size * block / ntp_seconds:.0f} tokens/s")
    agreement = label_agreement(extractors["fp32"], extractors["bf16"], windows, batch, agreement_batches, k)
    print(f"bf16 vs fp32: identical top-{k} label sets on {agreement:.1%} of "
          f"{agreement_batches * batch * block} tokens; auto precision here: {teachers.teacher_dtype('auto')}")


def bench_fixed(batches: int) -> None:
    ntp, cocomix, settings = jobs_for("fixed", batches + 1)
    teacher_shape, layer = settings.teacher.model, settings.sae.layer_index
    tokens = np.random.default_rng(0).integers(0, 50256, 2_000_000, dtype=np.uint16)
    windows = TrainWindows(tokens, ntp.block_size, ntp.window_seed)
    teacher = build_model("ntp", teacher_shape, ntp.block_size, seed=0)
    sae = TopKSAE(cocomix.concept_dim, teacher_shape.width, settings.sae.k)
    fp32 = ConceptExtractor(teacher, sae, layer)
    bf16 = ConceptExtractor(copy.deepcopy(teacher).to(torch.bfloat16), sae, layer)
    batch = cocomix.train.batch_size
    seconds = label_seconds({"fp32": fp32, "bf16": bf16}, windows, batch, batches, cocomix.labels_per_token)
    steps = seconds_per_step([("ntp", ntp, None), ("cocomix online bf16", cocomix, bf16)], windows, batches)
    print(f"\n== fixed: teacher {teacher_shape.width}x{teacher_shape.depth}, SAE {cocomix.concept_dim} at block {layer}, "
          f"batch {batch}x{ntp.block_size}")
    print(f"label pass fp32 {seconds['fp32']:.2f}s, bf16 {seconds['bf16']:.2f}s: bf16 "
          f"{seconds['fp32'] / seconds['bf16']:.2f}x faster (target >= 2.5x)")
    print(f"step: ntp {steps['ntp']:.2f}s, cocomix online (bf16 teacher) {steps['cocomix online bf16']:.2f}s = "
          f"{steps['cocomix online bf16'] / steps['ntp']:.2f}x (target <= 3.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per arm (after one warm-up)")
    parser.add_argument("--agreement-batches", type=int, default=4, help="batches of the bf16/fp32 label comparison")
    parser.add_argument("--parts", default="smollm2,fixed")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cocomix-bench-teacher",
                        help="converted teacher and prepared data, reused between runs")
    args = parser.parse_args()
    set_threads(args.threads)
    print(f"torch threads {args.threads}; native bf16 on this CPU: {teachers.cpu_has_native_bf16()}")
    if "smollm2" in args.parts:
        bench_smollm2(args.cache, args.batches, args.agreement_batches)
    if "fixed" in args.parts:
        bench_fixed(args.batches)


if __name__ == "__main__":
    main()
