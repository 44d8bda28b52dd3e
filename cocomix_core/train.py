"""Training loop for the concept teacher, the NTP baseline and the CoCoMix student; resumable bit for bit.

    python -m cocomix_core.train --settings cpu --arm cocomix --data DATA --out OUT --labels LABELS
    torchrun --standalone --nproc_per_node 2 -m cocomix_core.train ...    (DDP; gloo on CPUs)
    accelerate launch -m cocomix_core.train ...

Batches. Optimizer step s (0-based) consumes global samples [s·B, (s+1)·B) of
TrainWindows(train tokens, block_size, window_seed), B = train.batch_size. With W processes
and A = train.grad_accum_steps, process r takes the slice [s·B + r·B/W, s·B + (r+1)·B/W) in A
micro-batches of B/(W·A). Each micro-batch loss is divided by A and DDP averages over W, so the
gradient is the mean over the global batch whatever the W×A split.

Loss. NTP: mean next-token cross-entropy. CoCoMix: L = L_ntp + λ·L_concept (SPEC §3), with the
labels of the very same samples, read from a LabelCache or computed online by a ConceptExtractor.

Metrics (main process only; `step` = optimizer steps done):
    every train.log_every steps and at the last step:
        train/loss          L of this step, mean over the global batch
        train/ntp_loss      L_ntp of this step
        train/concept_loss  L_concept of this step (CoCoMix only)
        train/lr            learning rate this step used (`lr_at`)
        train/grad_norm     global gradient norm before clipping
        train/tokens_seen   step · batch_size · block_size
        train/tokens_per_s  tokens of all processes per wall-clock second since the previous log
        train/mfu           tokens_per_s · flops_per_token / (peak FLOP/s per device · W)
    every train.eval_every steps and at the last step:
        val/loss            mean next-token loss over train.eval_windows unshifted validation windows
        val/ppl             exp(val/loss)  (SPEC §6)
    params: job, kind, n_params, flops_per_token
    tags:   mfu_peak_flops, mfu_peak_source, world_size, resumed_from_step
Only tokens_per_s and mfu depend on wall time; a resumed run logs every other value identically.

FLOPs per token (fwd + bwd = 3 × fwd; matmuls only; d width, L layers, T block size, V vocab):
    NTP:     6·(L·P_block + V·d) + 12·L·T·d
    CoCoMix: 6·((L_lo + 2·L_up)·P_block + V·d + C·d + k_mix·d) + 12·T·d·(L_lo + 4·L_up)
with P_block = 12·d² + 13·d (a GPT-2 block's parameters, i.e. the non-embedding parameters),
V·d the tied LM head (a per-token matmul, so it is counted although its weight is an
embedding), C·d the concept predictor, k_mix·d the gathered compress layer, and L_lo / L_up
the blocks before / from the insert layer: the upper blocks run on the interleaved 2T
sequence, so their parameters count twice per token and their attention four times
(twice the positions, each attending over twice the length).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from tqdm.auto import tqdm
from transformers import PretrainedConfig, PreTrainedModel

from cocomix_core.checkpoints import (
    capture_rng_state,
    checkpoint_dir,
    final_checkpoint,
    latest_trainer_state,
    list_checkpoints,
    load_trainer_state,
    remove_partial_leftovers,
    restore_rng_state,
    save_checkpoint,
    save_trainer_state,
    trainer_state_dir,
)
from cocomix_core.concepts import ConceptExtractor, LabelCache
from cocomix_core.data import data_tokenizer, load_split
from cocomix_core.models import TrainJob, job_for_branch, teacher_job
from cocomix_core.modeling import CoCoMixConfig
from cocomix_core.windows import TrainWindows, validation_windows
from settings.schema import TrainSettings

if TYPE_CHECKING:  # importing MLflow costs seconds in every training process
    from cocomix_core.tracking import Tracker

__all__ = [
    "NonFiniteLossError", "TrainResult", "train", "lr_at", "micro_batch_size", "flops_per_token",
    "peak_flops", "checkpoint_steps", "list_checkpoints", "final_checkpoint", "keep_freed_memory",
]

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)

# bf16 dense tensor-core peaks from the vendors' datasheets (SXM parts; PCIe H100 is lower).
GPU_PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm stopped being finite; the last good checkpoint is left as it was."""

    def __init__(self, step: int, name: str, value: float) -> None:
        super().__init__(f"non-finite {name} = {value} at optimizer step {step}; the last good checkpoint is kept")
        self.step, self.name, self.value = step, name, value


LabelSource = LabelCache | ConceptExtractor


@dataclass
class TrainResult:
    """What a finished training run hands on to the flow."""

    job_name: str
    final_step: int
    tokens_seen: int
    checkpoints: list[Path]
    final_checkpoint: Path
    trainer_state: Path
    final_val_loss: float
    final_val_ppl: float
    resumed_from_step: int | None  # None: started from scratch


# ----- pure pieces of the recipe -------------------------------------------------------------
def lr_at(step: int, train: TrainSettings) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr.

    Warmup: lr·(step+1)/warmup_steps for step < warmup_steps. The cosine runs from lr at step
    warmup_steps to min_lr at the last step (steps−1).
    """
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    decay_steps = max(1, train.steps - 1 - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (train.lr - train.min_lr)


def checkpoint_steps(train: TrainSettings) -> list[int]:
    """Optimizer steps after which a checkpoint is saved: every checkpoint_every, and the last."""
    return sorted({*range(train.checkpoint_every, train.steps + 1, train.checkpoint_every), train.steps})


def micro_batch_size(train: TrainSettings, world_size: int) -> int:
    """Sequences per process per forward pass: batch_size / (processes · grad_accum_steps)."""
    split = world_size * train.grad_accum_steps
    if train.batch_size % split:
        raise ValueError(
            f"train.batch_size={train.batch_size} is not divisible by train.grad_accum_steps="
            f"{train.grad_accum_steps} × {world_size} processes; change one of them"
        )
    return train.batch_size // split


def flops_per_token(config: PretrainedConfig, block_size: int) -> float:
    """Training FLOPs per token of a GPT-2 or CoCoMix model (formula in the module docstring)."""
    d, layers, vocab = config.n_embd, config.n_layer, config.vocab_size
    block_params = 12 * d * d + 13 * d
    if not isinstance(config, CoCoMixConfig):
        return 6 * (layers * block_params + vocab * d) + 12 * layers * block_size * d
    lower = config.insert_layer_index
    upper = layers - lower
    concept_params = config.concept_dim * d + config.concept_num * d
    matmul_params = (lower + 2 * upper) * block_params + vocab * d + concept_params
    return 6 * matmul_params + 12 * block_size * d * (lower + 4 * upper)


@lru_cache(maxsize=None)
def _measured_matmul_flops(device_type: str, dtype: torch.dtype, size: int, threads: int) -> float:
    """Best FLOP/s of a few square matmuls: the practical peak of this device (`threads` keys the cache)."""
    a = torch.randn(size, size, device=device_type, dtype=dtype)
    b = torch.randn(size, size, device=device_type, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if device_type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from) for MFU.

    GPUs: the datasheet bf16 dense peak when the model is in the table, else a measured bf16
    matmul. CPUs: a measured fp32 matmul at the current thread count (measured once per process).
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for model, flops in GPU_PEAK_BF16_FLOPS.items():
            if model in name:
                return flops, f"datasheet bf16 dense: {name}"
        return _measured_matmul_flops("cuda", torch.bfloat16, 8192, 0), f"measured bf16 matmul: {name}"
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):  # the benchmark must not shift the training RNG
        flops = _measured_matmul_flops("cpu", torch.float32, 1024, threads)
    return flops, f"measured fp32 matmul, {threads} CPU threads"


# ----- setup ---------------------------------------------------------------------------------
def set_threads(num_threads: int) -> None:
    """Use `num_threads` intra-op threads here and in child processes (OpenMP / MKL read the env)."""
    torch.set_num_threads(num_threads)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(num_threads)


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation from its heap and never trim it: a caching allocator for CPU tensors.

    By default each tensor over 32 MB gets fresh pages from mmap and returns them on free, so every
    training step zero-fills its logits and gradients again in page faults (~470k per step at the
    benchmark shape, ~0.7 s of 3.3 s). Returns False where mallopt is unavailable (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    no_mmap = mallopt(M_MMAP_MAX, 0)
    never_trim = mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # an int: trims only a free top of the heap over 2 GiB
    return bool(no_mmap and never_trim)


def _thread_count(num_threads: int | None, train: TrainSettings) -> int:
    processes_on_this_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return num_threads or train.cpu_threads or max(1, (os.cpu_count() or 1) // processes_on_this_node)


def build_optimizer(model: torch.nn.Module, train: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW; with decay_all_params every parameter decays (the paper's code), else only matrices.

    Without decay_all_params, 1-D parameters (biases, LayerNorm gains, pre_bias) do not decay,
    as in nanoGPT; embeddings are matrices and do decay (the LM head is tied to them).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if train.decay_all_params:
        groups = [{"params": params, "weight_decay": train.weight_decay}]
    else:
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    return torch.optim.AdamW(
        groups, lr=lr_at(0, train), betas=train.betas, eps=train.adam_eps, fused=device.type == "cuda"
    )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 under `precision=bf16`, or `auto` on a GPU; None means plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _concept_labels(source: LabelSource, first_sample: int, input_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Labels B×T×K of the micro-batch that starts at global sample `first_sample`."""
    if isinstance(source, LabelCache):  # rows are global sample indices of the same window stream
        labels = source.labels(first_sample, len(input_ids))
    else:  # an online extractor runs the teacher on these very ids
        labels = source.concept_labels(input_ids, k)
    if labels.shape != (*input_ids.shape, k):
        raise ValueError(f"concept labels have shape {tuple(labels.shape)}, expected {(*input_ids.shape, k)}")
    return labels.to(input_ids.device)


def _check_label_cache(source: LabelSource, job: TrainJob) -> None:
    """A LabelCache must hold labels of this job's windows for every sample the run will consume."""
    if not isinstance(source, LabelCache):
        return
    source.check({
        "block_size": job.block_size, "k": job.labels_per_token,
        "concept_dim": job.concept_dim, "windows_seed": job.window_seed,
    })
    needed = job.train.steps * job.train.batch_size
    if source.num_samples < needed:
        raise ValueError(f"label cache holds {source.num_samples} samples; this run consumes {needed}")


# ----- the loop ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: PreTrainedModel, windows: np.ndarray, batch_size: int, accelerator: Accelerator,
             autocast: contextlib.AbstractContextManager) -> float:
    """Mean next-token loss over validation windows, split across processes."""
    model.eval()
    mine = windows[accelerator.process_index :: accelerator.num_processes]
    total = torch.zeros(2, device=accelerator.device)  # (sum of window losses, windows)
    for start in range(0, len(mine), batch_size):
        ids = torch.from_numpy(mine[start : start + batch_size]).to(accelerator.device)
        with autocast:
            loss = model(ids, labels=ids).loss
        total += torch.stack([loss.float() * len(ids), torch.tensor(float(len(ids)), device=loss.device)])
    model.train()
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item()


def accumulate_gradients(train_model: torch.nn.Module, job: TrainJob, step: int, windows: TrainWindows,
                         labels: LabelSource | None, accelerator: Accelerator,
                         autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """Forward and backward over this process's micro-batches of optimizer step `step`; returns (L_ntp, L_concept).

    Each micro-batch loss is divided by the accumulation steps and DDP averages over processes
    (on the last micro-batch only), so the gradients are those of the mean over the global batch.
    """
    settings, world_size = job.train, accelerator.num_processes
    micro = micro_batch_size(settings, world_size)
    process_first = step * settings.batch_size + accelerator.process_index * (settings.batch_size // world_size)
    loss_sums = torch.zeros(2, device=accelerator.device)
    for accum in range(settings.grad_accum_steps):
        first_sample = process_first + accum * micro
        input_ids = torch.from_numpy(windows.batch(first_sample, micro)).to(accelerator.device)
        extra = {}
        if job.kind == "cocomix":
            extra["concept_labels"] = _concept_labels(labels, first_sample, input_ids, job.labels_per_token)
        is_last = accum == settings.grad_accum_steps - 1
        with contextlib.nullcontext() if is_last else accelerator.no_sync(train_model):
            with autocast:
                output = train_model(input_ids, labels=input_ids, **extra)
                concept = output.concept_loss if job.kind == "cocomix" else torch.zeros_like(output.loss)
                losses = torch.stack([output.loss, concept])
                loss = losses[0] + job.lam_concept * losses[1]
            accelerator.backward(loss / settings.grad_accum_steps)
        loss_sums += losses.detach().float()
    return loss_sums / settings.grad_accum_steps


def _fresh_or_resumed(job: TrainJob, out_dir: Path, device: torch.device
                      ) -> tuple[PreTrainedModel, torch.optim.AdamW, int, float]:
    """(model, optimizer, steps done, last val loss): from out_dir's latest trainer state, else freshly seeded."""
    model = job.build_model()
    state_folder = latest_trainer_state(out_dir)
    if state_folder is None:
        torch.manual_seed(job.seed)
        np.random.seed(job.seed)
        model.to(device)
        return model, build_optimizer(model, job.train, device), 0, float("nan")
    state, summary = load_trainer_state(state_folder)
    if summary["job_digest"] != job.digest():
        raise ValueError(
            f"{state_folder} was written by a different job (digest {summary['job_digest'][:12]}, this job "
            f"{job.digest()[:12]}); use a fresh out_dir or the same settings"
        )
    model.load_state_dict(state["model"])
    model.to(device)
    optimizer = build_optimizer(model, job.train, device)
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"])  # every process seeds alike (no dropout): rank 0's states serve all
    return model, optimizer, summary["step"], summary["val_loss"]


def train(
    job: TrainJob,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    tracker: Tracker | None = None,
    labels: LabelSource | None = None,
    num_threads: int | None = None,
) -> TrainResult:
    """Train `job` on data_dir's train.bin, checkpointing into out_dir; continue from out_dir's trainer state if any.

    `labels` (a LabelCache or a ConceptExtractor) is required for CoCoMix jobs. Only the main
    process logs to `tracker`, saves and shows progress. Calling train again after a crash or a
    kill continues exactly where the last trainer state left off.
    """
    settings = job.train
    if job.kind == "cocomix" and labels is None:
        raise ValueError(f"job {job.name!r} is a CoCoMix job: pass labels (a LabelCache or a ConceptExtractor)")
    if job.kind == "cocomix":
        _check_label_cache(labels, job)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, world_size = accelerator.device, accelerator.num_processes
    is_main = accelerator.is_main_process
    micro = micro_batch_size(settings, world_size)
    set_threads(_thread_count(num_threads, settings))
    if device.type == "cpu" and settings.keep_freed_memory:
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # for whatever stays fp32 outside autocast
    out_dir = Path(out_dir)
    tracker = tracker if is_main else None

    train_windows = TrainWindows(load_split(data_dir, "train", block_size=job.block_size), job.block_size, job.window_seed)
    tokenizer = data_tokenizer(data_dir)  # checkpoints carry the data's tokenizer files
    val_windows = validation_windows(load_split(data_dir, "val", block_size=job.block_size), job.block_size, settings.eval_windows)

    model, optimizer, start_step, last_val_loss = _fresh_or_resumed(job, out_dir, device)
    resumed = start_step > 0
    if is_main:
        remove_partial_leftovers(out_dir)
    train_model = accelerator.prepare(model)
    if settings.compile:
        train_model = torch.compile(train_model)

    dtype = autocast_dtype(settings.precision, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    tokens_per_step = settings.batch_size * job.block_size
    step_flops = flops_per_token(model.config, job.block_size)
    peak, peak_source = peak_flops(device)
    if tracker is not None:
        tracker.log_params({"job": job.name, "kind": job.kind, "n_params": str(model.num_parameters()),
                            "flops_per_token": f"{step_flops:.6g}"})
        tracker.set_tags({"mfu_peak_flops": f"{peak:.4g}", "mfu_peak_source": peak_source,
                          "world_size": str(world_size), "resumed_from_step": str(start_step)})

    def save(step: int) -> None:
        """Evaluation checkpoint, then the trainer state that resumes after `step` (main process only)."""
        if tracker is not None:
            tracker.flush()  # metrics up to this step are durable before the state that skips them is
        meta = {"step": step, "tokens_seen": step * tokens_per_step, "job": job.name, "kind": job.kind,
                "settings_digest": job.settings_digest, "job_digest": job.digest(), "val_loss": last_val_loss}
        save_checkpoint(model, out_dir, meta, tokenizer)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": capture_rng_state()}
        save_trainer_state(out_dir, state, meta)

    save_steps = set(checkpoint_steps(settings))
    window_start, window_tokens = time.perf_counter(), 0
    with tqdm(total=settings.steps, initial=start_step, desc=job.name, disable=not is_main, dynamic_ncols=True) as progress:
        for step in range(start_step, settings.steps):
            lr = lr_at(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_losses = accumulate_gradients(train_model, job, step, train_windows, labels, accelerator, autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip).item()
            ntp_loss, concept_loss = accelerator.reduce(step_losses, "mean").tolist()
            loss = ntp_loss + job.lam_concept * concept_loss
            done = step + 1
            for name, value in (("loss", loss), ("grad norm", grad_norm)):
                if not math.isfinite(value):  # same values on every process, so all of them stop
                    raise NonFiniteLossError(done, name, value)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window_tokens += tokens_per_step
            progress.update(1)

            if done % settings.log_every == 0 or done == settings.steps:
                tokens_per_s = window_tokens / (time.perf_counter() - window_start)
                metrics = {
                    "train/loss": loss, "train/ntp_loss": ntp_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                    "train/tokens_seen": float(done * tokens_per_step), "train/tokens_per_s": tokens_per_s,
                    "train/mfu": tokens_per_s * step_flops / (peak * world_size),
                }
                if job.kind == "cocomix":
                    metrics["train/concept_loss"] = concept_loss
                if tracker is not None:
                    tracker.log_metrics(metrics, step=done)
                progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
                window_start, window_tokens = time.perf_counter(), 0
            if done % settings.eval_every == 0 or done == settings.steps:
                last_val_loss = evaluate(model, val_windows, micro, accelerator, autocast)
                if tracker is not None:
                    tracker.log_metrics({"val/loss": last_val_loss, "val/ppl": math.exp(last_val_loss)}, step=done)
            if is_main and done in save_steps:
                save(done)
    accelerator.wait_for_everyone()
    if tracker is not None:
        tracker.flush()

    # Paths follow from the schedule, so processes on nodes that do not see out_dir get them too.
    checkpoints = [checkpoint_dir(out_dir, step) for step in checkpoint_steps(settings)]
    return TrainResult(
        job_name=job.name,
        final_step=settings.steps,
        tokens_seen=settings.steps * tokens_per_step,
        checkpoints=checkpoints,
        final_checkpoint=checkpoints[-1],
        trainer_state=trainer_state_dir(out_dir, settings.steps),
        final_val_loss=last_val_loss,
        final_val_ppl=math.exp(last_val_loss),
        resumed_from_step=start_step if resumed else None,
    )


# ----- command line --------------------------------------------------------------------------
def _label_source(args: argparse.Namespace, settings: Any, device: torch.device) -> LabelSource | None:
    """A LabelCache from --labels, or an online ConceptExtractor from --teacher and --sae."""
    from cocomix_core.concepts import load_teacher
    from cocomix_core.sae import load_sae

    if args.labels:
        return LabelCache(args.labels)
    if args.teacher and args.sae:
        teacher = load_teacher(args.teacher, device)
        return ConceptExtractor(teacher, load_sae(args.sae, map_location=device), settings.sae.layer_index)
    return None


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: train one branch (or the teacher) of an experiment's settings."""
    from settings.cli import add_settings_arguments, settings_from_args
    from settings.schema import training_branches

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_settings_arguments(parser)
    parser.add_argument("--arm", required=True, help="a branch name of the settings, or 'teacher'")
    parser.add_argument("--data", required=True, help="folder with train.bin / val.bin")
    parser.add_argument("--out", required=True, help="run folder: checkpoints/ and trainer_state/")
    parser.add_argument("--labels", help="label cache folder (CoCoMix, cached labels)")
    parser.add_argument("--teacher", help="teacher model folder or HF name (CoCoMix, online labels)")
    parser.add_argument("--sae", help="SAE file or URL (CoCoMix, online labels)")
    parser.add_argument("--threads", type=int, help="torch threads per process")
    parser.add_argument("--mlflow-run-id", help="log to this existing MLflow run (default: the console)")
    args = parser.parse_args(argv)

    settings = settings_from_args(args)
    if args.arm == "teacher":
        job = teacher_job(settings)
    else:
        branches = {branch.name: branch for branch in training_branches(settings)}
        if args.arm not in branches:
            parser.error(f"--arm {args.arm!r} is not a branch; choose from teacher, {', '.join(branches)}")
        job = job_for_branch(settings, branches[args.arm])

    from cocomix_core.tracking import ConsoleTracker, MlflowTracker

    tracker = MlflowTracker(args.mlflow_run_id, settings.tracking.mlflow_uri) if args.mlflow_run_id else ConsoleTracker(f"[{job.name}] ")
    device = Accelerator(cpu=not torch.cuda.is_available()).device
    labels = _label_source(args, settings, device) if job.kind == "cocomix" else None
    result = train(job, args.data, args.out, tracker=tracker, labels=labels, num_threads=args.threads)
    tracker.close()
    if PartialState().is_main_process:
        print(f"done: step {result.final_step}, val ppl {result.final_val_ppl:.3f}, final checkpoint {result.final_checkpoint}")


if __name__ == "__main__":
    main()
