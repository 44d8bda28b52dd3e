"""Training loop for the concept teacher, the NTP baseline and the CoCoMix student; resumable bit for bit.

    python -m cocomix_core.training.trainer --settings cpu --arm cocomix --data DATA --out OUT --labels LABELS
    python -m cocomix_core.training.trainer --settings cpu_study --arm kd-s0 --data DATA --out OUT --teacher-logits CACHE
    torchrun --standalone --nproc_per_node 2 -m cocomix_core.training.trainer ...    (DDP; gloo on CPUs)
    accelerate launch -m cocomix_core.training.trainer ...

Batches. Optimizer step s (0-based) consumes global samples [s·B, (s+1)·B) of
TrainWindows(train tokens, block_size, window_seed), B = train.batch_size. With W processes
and A = train.grad_accum_steps, process r takes the slice [s·B + r·B/W, s·B + (r+1)·B/W) in A
micro-batches of B/(W·A). Each micro-batch loss is divided by A and DDP averages over W, so the
gradient is the mean over the global batch whatever the W×A split.

Loss. NTP and pause: mean next-token cross-entropy. CoCoMix (every mix): L = L_ntp + λ·L_concept
(SPEC §3), with the labels of the very same samples, read from a LabelCache or computed online by a
ConceptExtractor. KD: L = L_ntp + λ_kd·τ²·KL (SPEC §9), with the teacher targets of the very same
samples from a TeacherLogitCache or an OnlineTeacher (see distill.py for the cache's exactness).

Metrics (main process only; `step` = optimizer steps done):
    every train.log_every steps and at the last step:
        train/loss          L of this step, mean over the global batch
        train/ntp_loss      L_ntp of this step
        train/concept_loss  L_concept of this step (CoCoMix only)
        train/kd_loss       mean KL to the teacher at τ, before λ_kd·τ² (KD only)
        train/lr            learning rate this step used (`lr_at`)
        train/grad_norm     global gradient norm before clipping
        train/tokens_seen   step · batch_size · block_size
        train/tokens_per_s  tokens of all processes per wall-clock second since the previous log
        train/mfu           tokens_per_s · flops_per_token / (peak FLOP/s per device · W)
    every train.eval_every steps and at the last step:
        val/loss            mean next-token loss over train.eval_windows unshifted validation windows
        val/ppl             exp(val/loss)  (SPEC §6)
    params: job, kind, n_params, flops_per_token
    tags:   mfu_peak_flops, mfu_peak_source, world_size, resumed_from_step, strategy (ddp or fsdp)
Only tokens_per_s and mfu depend on wall time; a resumed run logs every other value identically.
Each (metric, step) point is logged once: metrics are flushed before the checkpoint of their
step is saved, and a resumed or retried run skips the points its tracker already holds (those
a killed attempt logged after its last checkpoint), so interruptions leave no duplicates.

FLOPs per token of every arm: `models.flops_per_token` (formulas in models.py's docstring).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from transformers import PreTrainedModel

from cocomix_core.concepts.labels import ConceptExtractor, LabelCache
from cocomix_core.data.corpus import data_tokenizer, load_split
from cocomix_core.data.windows import TrainWindows, validation_windows
from cocomix_core.model.build import (
    TrainJob,
    flops_per_token,
    job_for_branch,
    teacher_job,
)
from cocomix_core.plumbing.errors import CocomixError
from cocomix_core.plumbing.progress import Progress, quiet_third_party
from cocomix_core.training.checkpoints import (
    CheckpointError,
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
from cocomix_core.training.distill import (
    OnlineTeacher,
    TeacherLogitCache,
    distillation_kl,
)
from settings.schema import TrainSettings

if TYPE_CHECKING:  # importing MLflow costs seconds in every training process
    from cocomix_core.plumbing.tracking import Tracker

__all__ = [
    "NonFiniteLossError", "TrainResult", "train", "lr_at", "micro_batch_size", "flops_per_token",
    "peak_flops", "checkpoint_steps", "list_checkpoints", "final_checkpoint", "keep_freed_memory",
]

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)

# bf16 dense tensor-core peaks from the vendors' datasheets (SXM parts; PCIe H100 is lower).
GPU_PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}


class NonFiniteLossError(CocomixError, FloatingPointError):
    """The loss or gradient norm stopped being finite; the last good checkpoint is left as it was."""

    def __init__(self, step: int, name: str, value: float) -> None:
        super().__init__(f"non-finite {name} = {value} at optimizer step {step}; the last good checkpoint is kept")
        self.step, self.name, self.value = step, name, value


LabelSource = LabelCache | ConceptExtractor
AUXILIARY_METRIC = {"cocomix": "train/concept_loss", "kd": "train/kd_loss"}
TeacherSource = TeacherLogitCache | OnlineTeacher


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


def unwrapped_name(name: str) -> str:
    """A parameter's name in the unwrapped model, without the module prefixes FSDP inserts."""
    return name.replace("_fsdp_wrapped_module.", "")


def build_optimizer(model: torch.nn.Module, train: TrainSettings, device: torch.device,
                    dims: dict[str, int] | None = None) -> torch.optim.AdamW:
    """AdamW; with decay_all_params every parameter decays (the paper's code), else only matrices.

    Without decay_all_params, 1-D parameters (biases, LayerNorm gains, pre_bias) do not decay,
    as in nanoGPT; embeddings are matrices and do decay (the LM head is tied to them).
    `dims` (parameter name in the unwrapped model -> ndim) gives the shapes FSDP's flat 1-D shards hide.
    """
    named = [(unwrapped_name(name), p) for name, p in model.named_parameters() if p.requires_grad]
    dims = dims or {name: p.dim() for name, p in named}
    params = [p for _, p in named]
    if train.decay_all_params:
        groups = [{"params": params, "weight_decay": train.weight_decay}]
    else:
        groups = [
            {"params": [p for name, p in named if dims[name] >= 2], "weight_decay": train.weight_decay},
            {"params": [p for name, p in named if dims[name] < 2], "weight_decay": 0.0},
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


def _check_teacher_cache(source: TeacherSource, job: TrainJob) -> None:
    """A TeacherLogitCache must hold this job's windows at its τ for every sample the run will consume."""
    if not isinstance(source, TeacherLogitCache):
        return
    source.check({"block_size": job.block_size, "windows_seed": job.window_seed, "temperature": job.kd_temperature})
    needed = job.train.steps * job.train.batch_size
    if source.num_samples < needed:
        raise ValueError(f"teacher-logit cache holds {source.num_samples} samples; this run consumes {needed}")


def _check_label_source(source: LabelSource, job: TrainJob) -> None:
    """Labels must index the concept head the student is built with; a cache must cover the whole run.

    Without the size check an SAE of 128 latents trains a head sized for sae.num_latents=256:
    no error, half the head never labelled.
    """
    if source.concept_dim != job.concept_dim:
        raise ValueError(
            f"the SAE behind the concept labels has {source.concept_dim} latents, but the student's concept head is "
            f"sized from sae.num_latents={job.concept_dim}; set sae.num_latents={source.concept_dim} or use the SAE "
            f"with {job.concept_dim} latents"
        )
    if not isinstance(source, LabelCache):
        return
    source.check({
        "block_size": job.block_size, "k": job.labels_per_token,
        "concept_dim": job.concept_dim, "windows_seed": job.window_seed,
    })
    needed = job.train.steps * job.train.batch_size
    if source.num_samples < needed:
        raise ValueError(f"label cache holds {source.num_samples} samples; this run consumes {needed}")


# ----- sharded training (FSDP) ---------------------------------------------------------------
# `accelerate launch --use_fsdp` puts its FSDP options in the environment, but accelerate applies
# them only on GPUs (on CPUs it falls back to DDP). So the trainer wraps the model itself, with
# accelerate's plugin read from that environment: the same code shards over gloo on CPUs and NCCL
# on GPUs. Checkpoints and trainer states hold the full, unsharded state in the DDP path's format.
def fsdp_requested() -> bool:
    """Whether this process was launched with accelerate's FSDP options (`training_command`, strategy=fsdp)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` wrapped in FSDP (FSDP1) with the launcher's options: one FSDP unit per transformer block, plus the root."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set
    if plugin.fsdp_version != 1:
        raise ValueError(f"the trainer shards with FSDP1; the launcher asked for fsdp_version={plugin.fsdp_version}")
    plugin.set_auto_wrap_policy(model)
    if device.type == "cpu":  # FSDP's CPU handle names its device "cpu" and refuses accelerate's "cpu:0"
        device = torch.device("cpu")
    return FSDP(
        model, sharding_strategy=plugin.sharding_strategy, cpu_offload=plugin.cpu_offload,
        auto_wrap_policy=plugin.auto_wrap_policy, mixed_precision=plugin.mixed_precision_policy,
        sync_module_states=plugin.sync_module_states, backward_prefetch=plugin.backward_prefetch,
        forward_prefetch=plugin.forward_prefetch, use_orig_params=plugin.use_orig_params,
        limit_all_gathers=plugin.limit_all_gathers, device_id=device,
    )


@contextlib.contextmanager
def _full_state_dicts(sharded: torch.nn.Module, rank0_only: bool):
    """Inside: state_dict / optim_state_dict of `sharded` are full (unsharded) ones, on the CPU."""
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        StateDictType,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = sharded.compute_device.type != "cpu"  # on CPUs, offloading crashes the gather (torch 2.13)
    with FSDP.state_dict_type(sharded, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
                              FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only)):
        yield


def _optimizer_parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Unwrapped names of the optimizer's parameters in its order (the order a plain state_dict numbers them in)."""
    names = {id(p): unwrapped_name(name) for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def tied_parameters(model: torch.nn.Module) -> dict[str, str]:
    """{name: name of the parameter it is tied to} (GPT-2's lm_head.weight -> transformer.wte.weight)."""
    first: dict[int, str] = {}
    tied = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            tied[name] = first[id(parameter)]
        first.setdefault(id(parameter), name)
    return tied


def full_training_state(sharded: torch.nn.Module, optimizer: torch.optim.Optimizer, tied: dict[str, str]
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, optimizer state dict), unsharded, as the unwrapped model and a plain optimizer give them.

    Collective: every process must call it; rank 0 gets the states, the others empty dicts.
    `tied` (from `tied_parameters` of the unwrapped model) makes tied entries one tensor again,
    so that save_pretrained stores them once. The optimizer state is numbered by position like
    `Optimizer.state_dict()`, not by FSDP's names.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with _full_state_dicts(sharded, rank0_only=True):
        model_state = sharded.state_dict()
        named_state = FSDP.optim_state_dict(sharded, optimizer)
    if not named_state:
        return model_state, {}
    for name, source in tied.items():
        model_state[name] = model_state[source]
    position = {name: index for index, name in enumerate(_optimizer_parameter_names(sharded, optimizer))}
    return model_state, {
        "state": {position[name]: named_state["state"][name] for name in position if name in named_state["state"]},
        "param_groups": [{**group, "params": [position[name] for name in group["params"]]}
                         for group in named_state["param_groups"]],
    }


def load_sharded_optimizer_state(sharded: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                 state: dict[str, Any]) -> None:
    """Load a full optimizer state (numbered as `full_training_state` writes it) into the sharded optimizer."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    names = _optimizer_parameter_names(sharded, optimizer)
    named_state = {
        "state": {names[index]: value for index, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                         for group in state["param_groups"]],
    }
    with _full_state_dicts(sharded, rank0_only=False):  # every process read the trainer state itself
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(sharded, optimizer, named_state))


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
                         autocast: contextlib.AbstractContextManager, teacher: TeacherSource | None = None
                         ) -> torch.Tensor:
    """Forward and backward over this process's micro-batches of optimizer step `step`; returns (L_ntp, L_aux)
    with L_aux = L_concept (CoCoMix), the KL to the teacher (KD), else 0.

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
                if job.kind == "cocomix":
                    auxiliary = output.concept_loss
                elif job.kind == "kd":
                    targets = teacher.targets(first_sample, input_ids)
                    auxiliary = distillation_kl(output.logits, targets, job.kd_temperature).to(output.loss.dtype)
                else:
                    auxiliary = torch.zeros_like(output.loss)
                losses = torch.stack([output.loss, auxiliary])
                loss = losses[0] + job.auxiliary_weight * losses[1]
            accelerator.backward(loss / settings.grad_accum_steps)
        loss_sums += losses.detach().float()
    return loss_sums / settings.grad_accum_steps


def _fresh_or_resumed(job: TrainJob, out_dir: Path, device: torch.device
                      ) -> tuple[PreTrainedModel, dict[str, Any] | None, int, float]:
    """(model, optimizer state or None, steps done, last val loss): from out_dir's latest trainer state, else freshly seeded.

    The optimizer is built later, on the parameters of the distributed (DDP or FSDP) model.
    """
    model = job.build_model()
    state_folder = latest_trainer_state(out_dir)
    if state_folder is None:
        torch.manual_seed(job.seed)
        np.random.seed(job.seed)
        model.to(device)
        return model, None, 0, float("nan")
    state, summary = load_trainer_state(state_folder)
    if summary["job_digest"] != job.digest():
        raise CheckpointError(
            f"{state_folder} was written by a different job (digest {summary['job_digest'][:12]}, this job "
            f"{job.digest()[:12]}); use a fresh out_dir or the same settings"
        )
    model.load_state_dict(state["model"])
    model.to(device)
    restore_rng_state(state["rng"])  # every process seeds alike (no dropout): rank 0's states serve all
    return model, state["optimizer"], summary["step"], summary["val_loss"]


def _end_documents_with(model: PreTrainedModel, eos_id: int) -> None:
    """The data's end-of-sequence id in the model's configs (GPT-2's 50256 by default), so `generate` and
    lm-eval stop where the data's documents end (SPEC §8: documents end with the tokenizer's EOS)."""
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            config.eos_token_id = config.bos_token_id = eos_id


def _check_same_start(start_step: int, out_dir: Path, accelerator: Accelerator) -> None:
    """Every process must resume from the same trainer state: a gang node that cannot see rank 0's run folder would not."""
    starts = accelerator.gather(torch.tensor([start_step], device=accelerator.device)).tolist()
    if len(set(starts)) > 1:
        raise RuntimeError(
            f"processes would start at different steps {starts} (by global rank): every node of a gang must see the "
            f"same run folder {out_dir} (materialize it on each node before launching)"
        )


@dataclass
class Student:
    """The model being trained, in the forms the loop uses, and its optimizer.

    `model` is the unwrapped model (saved, counted); `distributed` wraps it in DDP or FSDP (evaluated,
    clipped); `forward` is `distributed`, compiled under train.compile (trained).
    """

    model: PreTrainedModel
    distributed: torch.nn.Module
    forward: torch.nn.Module
    optimizer: torch.optim.AdamW
    sharded: bool  # FSDP: parameters, gradients and optimizer state split over the processes
    tied: dict[str, str]  # tied parameter names of the unwrapped model (FSDP unshards them into one tensor)
    n_params: int  # counted before wrapping: FSDP replaces the model's parameters by shards of them

    def clip_gradients(self, max_norm: float) -> float:
        """Clip the global gradient norm to `max_norm`; return the norm before clipping."""
        if self.sharded:  # the norm over every process's shards
            return self.distributed.clip_grad_norm_(max_norm).item()
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()

    def full_states(self, is_main: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(model state, optimizer state), unsharded, on the main process (None elsewhere); collective under FSDP."""
        if self.sharded:
            states = full_training_state(self.distributed, self.optimizer, self.tied)
            return states if is_main else None
        return (self.model.state_dict(), self.optimizer.state_dict()) if is_main else None


def prepare_student(model: PreTrainedModel, optimizer_state: dict[str, Any] | None, train: TrainSettings,
                    accelerator: Accelerator) -> Student:
    """Wrap `model` for the processes (FSDP when the launcher asked for it, else DDP) and build its optimizer."""
    device, n_params = accelerator.device, model.num_parameters()
    if fsdp_requested():
        dims = {name: p.dim() for name, p in model.named_parameters()}
        tied = tied_parameters(model)
        distributed = shard_model(model, device)
        optimizer = build_optimizer(distributed, train, device, dims)
        if optimizer_state is not None:
            load_sharded_optimizer_state(distributed, optimizer, optimizer_state)
    else:
        tied, distributed = {}, accelerator.prepare(model)
        optimizer = build_optimizer(distributed, train, device)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
    forward = torch.compile(distributed) if train.compile else distributed
    return Student(model, distributed, forward, optimizer, sharded=fsdp_requested(), tied=tied, n_params=n_params)


class TrainLog:
    """The main process's metrics: each (name, step) point logged once, and the throughput since the last log.

    Built with the tracker's points, so a resumed or retried run skips those a killed attempt logged.
    """

    def __init__(self, job: TrainJob, tracker: Tracker | None, step_flops: float, peak: float, world_size: int) -> None:
        self.job, self.tracker = job, tracker
        self.flops_per_s_available = peak * world_size
        self.step_flops = step_flops
        self.logged = tracker.logged_points() if tracker is not None else set()
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def count(self, tokens: int) -> None:
        """Add a finished step's tokens to the throughput window."""
        self.window_tokens += tokens

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log the points of `step` the tracker does not hold yet."""
        fresh = {name: value for name, value in metrics.items() if (name, step) not in self.logged}
        if self.tracker is not None and fresh:
            self.tracker.log_metrics(fresh, step=step)

    def log_training(self, step: int, losses: tuple[float, float, float], lr: float, grad_norm: float) -> float:
        """Log the train/ metrics of `step` from its (loss, L_ntp, L_aux); returns the tokens per second."""
        loss, ntp_loss, auxiliary_loss = losses
        tokens_per_s = self.window_tokens / (time.perf_counter() - self.window_start)
        tokens_per_step = self.job.train.batch_size * self.job.block_size
        metrics = {
            "train/loss": loss, "train/ntp_loss": ntp_loss, "train/lr": lr, "train/grad_norm": grad_norm,
            "train/tokens_seen": float(step * tokens_per_step), "train/tokens_per_s": tokens_per_s,
            "train/mfu": tokens_per_s * self.step_flops / self.flops_per_s_available,
        }
        if self.job.kind in AUXILIARY_METRIC:
            metrics[AUXILIARY_METRIC[self.job.kind]] = auxiliary_loss
        self.log(metrics, step)
        self.window_start, self.window_tokens = time.perf_counter(), 0
        return tokens_per_s


def _check_sources(job: TrainJob, labels: LabelSource | None, teacher: TeacherSource | None) -> None:
    """A CoCoMix job needs labels and a KD job a teacher, each covering the whole run."""
    if job.kind == "cocomix":
        if labels is None:
            raise ValueError(f"job {job.name!r} is a CoCoMix job: pass labels (a LabelCache or a ConceptExtractor)")
        _check_label_source(labels, job)
    if job.kind == "kd":
        if teacher is None:
            raise ValueError(f"job {job.name!r} is a KD job: pass teacher (a TeacherLogitCache or an OnlineTeacher)")
        _check_teacher_cache(teacher, job)


def _start_processes(train: TrainSettings, num_threads: int | None) -> Accelerator:
    """This process's accelerator (one per process of the launch), with its threads and allocator set up."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_threads(_thread_count(num_threads, train))
    if accelerator.device.type == "cpu" and train.keep_freed_memory:
        keep_freed_memory()
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # for whatever stays fp32 outside autocast
    return accelerator


def _read_data(job: TrainJob, data_dir: str | Path) -> tuple[TrainWindows, np.ndarray, Any]:
    """(training window stream, validation windows, the data's tokenizer, which checkpoints carry)."""
    block_size = job.block_size
    train_windows = TrainWindows(load_split(data_dir, "train", block_size=block_size), block_size, job.window_seed)
    val_windows = validation_windows(load_split(data_dir, "val", block_size=block_size), block_size,
                                     job.train.eval_windows)
    return train_windows, val_windows, data_tokenizer(data_dir)


def _student(job: TrainJob, out_dir: Path, accelerator: Accelerator, eos_id: int) -> tuple[Student, int, float]:
    """(student, steps done, last val loss): fresh, or from out_dir's latest trainer state, the same on every process."""
    model, optimizer_state, start_step, val_loss = _fresh_or_resumed(job, out_dir, accelerator.device)
    _end_documents_with(model, eos_id)
    _check_same_start(start_step, out_dir, accelerator)
    if accelerator.is_main_process:
        remove_partial_leftovers(out_dir)
    return prepare_student(model, optimizer_state, job.train, accelerator), start_step, val_loss


def _log_setup(job: TrainJob, tracker: Tracker | None, student: Student, start_step: int,
               peak: tuple[float, str], accelerator: Accelerator) -> None:
    """The run's params and tags (main process), and a note when the model is sharded."""
    world_size = accelerator.num_processes
    if tracker is not None:
        tracker.log_params({"job": job.name, "kind": job.kind, "n_params": str(student.n_params),
                            "flops_per_token": f"{flops_per_token(student.model.config, job.block_size):.6g}"})
        tracker.set_tags({"mfu_peak_flops": f"{peak[0]:.4g}", "mfu_peak_source": peak[1],
                          "world_size": str(world_size), "resumed_from_step": str(start_step),
                          "strategy": "fsdp" if student.sharded else "ddp"})
    if student.sharded and accelerator.is_main_process:
        print(f"[{job.name}] FSDP: parameters, gradients and optimizer state sharded over {world_size} processes",
              flush=True)


def _save(student: Student, job: TrainJob, out_dir: Path, step: int, val_loss: float, tokenizer: Any,
          accelerator: Accelerator, tracker: Tracker | None) -> None:
    """Evaluation checkpoint, then the trainer state that resumes after `step`; every process calls it, the main one writes."""
    states = student.full_states(accelerator.is_main_process)  # gathering FSDP's shards is collective
    if states is None:
        return
    model_state, optimizer_state = states
    if tracker is not None:
        tracker.flush()  # metrics up to this step are durable before the state that skips them is
    meta = {"step": step, "tokens_seen": step * job.train.batch_size * job.block_size, "job": job.name,
            "kind": job.kind, "settings_digest": job.settings_digest, "job_digest": job.digest(), "val_loss": val_loss}
    save_checkpoint(student.model, out_dir, meta, state_dict=model_state if student.sharded else None,
                    tokenizer=tokenizer)
    save_trainer_state(out_dir, {"model": model_state, "optimizer": optimizer_state, "rng": capture_rng_state()},
                       meta)


def _check_finite(step: int, **values: float) -> None:
    """Stop on a non-finite loss or gradient norm (the values are the same on every process, so all of them stop)."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise NonFiniteLossError(step, name.replace("_", " "), value)


@quiet_third_party()  # transformers' "Writing model shards" bar at every checkpoint
def train(job: TrainJob, data_dir: str | Path, out_dir: str | Path, *, tracker: Tracker | None = None,
          labels: LabelSource | None = None, teacher: TeacherSource | None = None, num_threads: int | None = None
          ) -> TrainResult:
    """Train `job` on data_dir's train.bin, checkpointing into out_dir; continue from out_dir's trainer state if any.

    `labels` (a LabelCache or a ConceptExtractor) is required for CoCoMix jobs, `teacher` (a TeacherLogitCache
    or an OnlineTeacher) for KD jobs. Only the main process logs to `tracker`, saves and shows progress.
    Calling train again after a crash or a kill continues exactly where the last trainer state left off.
    """
    _check_sources(job, labels, teacher)
    settings, out_dir = job.train, Path(out_dir)
    accelerator = _start_processes(settings, num_threads)
    is_main, world_size = accelerator.is_main_process, accelerator.num_processes
    tracker = tracker if is_main else None
    train_windows, val_windows, tokenizer = _read_data(job, data_dir)
    student, start_step, val_loss = _student(job, out_dir, accelerator, tokenizer.eos_id)
    dtype = autocast_dtype(settings.precision, accelerator.device)
    autocast = torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype is not None)
    peak = peak_flops(accelerator.device)
    _log_setup(job, tracker, student, start_step, peak, accelerator)
    log = TrainLog(job, tracker, flops_per_token(student.model.config, job.block_size), peak[0], world_size)

    save_steps = set(checkpoint_steps(settings))
    with Progress(job.name, settings.steps, initial=start_step, enabled=is_main) as progress:
        for step in range(start_step, settings.steps):
            done = step + 1
            # one optimizer step over the global batch of `step`
            lr = lr_at(step, settings)
            for group in student.optimizer.param_groups:
                group["lr"] = lr
            step_losses = accumulate_gradients(student.forward, job, step, train_windows, labels, accelerator,
                                               autocast, teacher)
            grad_norm = student.clip_gradients(settings.grad_clip)
            ntp_loss, auxiliary_loss = accelerator.reduce(step_losses, "mean").tolist()
            loss = ntp_loss + job.auxiliary_weight * auxiliary_loss
            _check_finite(done, loss=loss, grad_norm=grad_norm)
            student.optimizer.step()
            student.optimizer.zero_grad(set_to_none=True)
            log.count(settings.batch_size * job.block_size)

            # logging, evaluation and checkpoints, each on its schedule and at the last step
            if done % settings.log_every == 0 or done == settings.steps:
                tokens_per_s = log.log_training(done, (loss, ntp_loss, auxiliary_loss), lr, grad_norm)
                progress.set_values(loss=loss, **{"tokens/s": round(tokens_per_s)})
            if done % settings.eval_every == 0 or done == settings.steps:
                val_loss = evaluate(student.distributed, val_windows, micro_batch_size(settings, world_size),
                                    accelerator, autocast)
                log.log({"val/loss": val_loss, "val/ppl": math.exp(val_loss)}, done)
                progress.set_values(val_ppl=math.exp(val_loss))
            if done in save_steps:
                _save(student, job, out_dir, done, val_loss, tokenizer, accelerator, tracker)
            progress.update(1)  # after logging, so the line of this step shows its own values
    accelerator.wait_for_everyone()
    if tracker is not None:
        tracker.flush()
    return _result(job, out_dir, start_step, val_loss)


def _result(job: TrainJob, out_dir: Path, start_step: int, val_loss: float) -> TrainResult:
    """The finished run's result. Paths follow from the schedule, so processes on nodes that do not see out_dir get them too."""
    settings = job.train
    checkpoints = [checkpoint_dir(out_dir, step) for step in checkpoint_steps(settings)]
    return TrainResult(
        job_name=job.name,
        final_step=settings.steps,
        tokens_seen=settings.steps * settings.batch_size * job.block_size,
        checkpoints=checkpoints,
        final_checkpoint=checkpoints[-1],
        trainer_state=trainer_state_dir(out_dir, settings.steps),
        final_val_loss=val_loss,
        final_val_ppl=math.exp(val_loss),
        resumed_from_step=start_step if start_step > 0 else None,
    )


# ----- command line ---------------------------------------------------------------------------
class InputError(CocomixError, ValueError):
    """A bad command-line input (folder, file, run id), worded for the user."""


def _load_teacher_arg(name: str, device: torch.device, precision: str) -> torch.nn.Module:
    """The --teacher model in the dtype of `teacher.precision`: a local folder is checked (config.json, weight
    files) before transformers sees it."""
    from cocomix_core.concepts.labels import load_teacher
    from cocomix_core.concepts.teachers import teacher_dtype
    from cocomix_core.model.folders import ModelFolderError, check_model_folder

    folder = Path(name).expanduser()
    if folder.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        try:
            check_model_folder(folder)
        except (ModelFolderError, OSError) as error:
            raise InputError(f"--teacher {name}: {error}") from None
    try:
        return load_teacher(name, device, dtype=teacher_dtype(precision, device))
    except OSError as error:  # transformers: not on the hub, hub unreachable, offline and not cached
        raise InputError(f"--teacher {name}: cannot load the model ({str(error).strip().splitlines()[0]})") from None


def _label_source(args: argparse.Namespace, settings: Any, job: TrainJob, device: torch.device) -> LabelSource:
    """A LabelCache from --labels, or an online ConceptExtractor from --teacher and --sae, checked against the job."""
    from cocomix_core.concepts.labels import ActivationConceptExtractor
    from cocomix_core.concepts.sae import SAEError, load_sae

    if args.labels:
        try:
            source: LabelSource = LabelCache(args.labels)
        except (OSError, ValueError, KeyError) as error:
            raise InputError(f"--labels {args.labels}: not a label cache ({error})") from None
    elif args.teacher and args.sae:
        teacher = _load_teacher_arg(args.teacher, device, settings.teacher.precision)
        try:
            sae = load_sae(args.sae, map_location=device)
        except (SAEError, OSError) as error:
            raise InputError(f"--sae {args.sae}: {error}") from None
        extractor = ActivationConceptExtractor if job.label_selection == "activation" else ConceptExtractor
        try:
            source = extractor(teacher, sae, settings.sae.layer_index)
        except ValueError as error:  # width or layer mismatch between the SAE and the teacher
            raise InputError(f"--sae {args.sae} with --teacher {args.teacher}: {error}") from None
    else:
        raise InputError(f"--arm {job.name} is a CoCoMix branch: give --labels, or --teacher and --sae")
    try:
        _check_label_source(source, job)
    except ValueError as error:
        raise InputError(str(error)) from None
    return source


def _teacher_source(args: argparse.Namespace, settings: Any, job: TrainJob, device: torch.device) -> TeacherSource:
    """A TeacherLogitCache from --teacher-logits, or an OnlineTeacher from --teacher, checked against the job."""
    if args.teacher_logits:
        try:
            source: TeacherSource = TeacherLogitCache(args.teacher_logits)
        except (OSError, ValueError, KeyError) as error:
            raise InputError(f"--teacher-logits {args.teacher_logits}: not a teacher-logit cache ({error})") from None
    elif args.teacher:
        source = OnlineTeacher(_load_teacher_arg(args.teacher, device, settings.teacher.precision))
    else:
        raise InputError(f"--arm {job.name} is a KD branch: give --teacher-logits, or --teacher")
    try:
        _check_teacher_cache(source, job)
    except ValueError as error:
        raise InputError(f"--teacher-logits {args.teacher_logits}: {error}") from None
    return source


def _check_output_folder(out: str) -> None:
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(f"--out {out}: not a writable folder ({error.strerror or error})") from None


def _open_inputs(args: argparse.Namespace, parser: argparse.ArgumentParser
                 ) -> tuple[TrainJob, Any, LabelSource | None, TeacherSource | None]:
    """Settings, job, tracker, labels and KD teacher of the command line, every input checked before training starts."""
    from cocomix_core.data.corpus import load_manifest
    from cocomix_core.data.tokenizer import student_vocab_size
    from cocomix_core.plumbing.tracking import ConsoleTracker, MlflowTracker, check_run
    from settings.cli import settings_from_args
    from settings.schema import training_branches

    settings = settings_from_args(args)
    load_manifest(args.data)  # a missing or broken data folder fails here, before any model is built
    vocab_size = student_vocab_size(data_tokenizer(args.data))  # the models read the data's tokenizer's ids
    if args.arm == "teacher":
        job = teacher_job(settings, vocab_size=vocab_size)
    else:
        branches = {branch.name: branch for branch in training_branches(settings)}
        if args.arm not in branches:
            parser.error(f"--arm {args.arm!r} is not a branch; choose from teacher, {', '.join(branches)}")
        job = job_for_branch(settings, branches[args.arm], vocab_size=vocab_size)
    _check_output_folder(args.out)
    if args.mlflow_run_id:
        check_run(args.mlflow_run_id, settings.tracking.mlflow_uri)
        tracker = MlflowTracker(args.mlflow_run_id, settings.tracking.mlflow_uri)
    else:
        tracker = ConsoleTracker(f"[{job.name}] ")
    device = Accelerator(cpu=not torch.cuda.is_available()).device
    labels = _label_source(args, settings, job, device) if job.kind == "cocomix" else None
    teacher = _teacher_source(args, settings, job, device) if job.kind == "kd" else None
    return job, tracker, labels, teacher


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: train one branch (or the teacher) of an experiment's settings.

    Bad input (settings, data folder, teacher, SAE, labels, run id) exits with one line naming it.
    """
    from cocomix_core.plumbing.tracking import ended_on_failure
    from settings.cli import add_settings_arguments, settings_from_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_settings_arguments(parser)
    parser.add_argument("--arm", required=True, help="a branch name of the settings, or 'teacher'")
    parser.add_argument("--data", required=True, help="folder with train.bin / val.bin")
    parser.add_argument("--out", required=True, help="run folder: checkpoints/ and trainer_state/")
    parser.add_argument("--labels", help="label cache folder (CoCoMix, cached labels)")
    parser.add_argument("--teacher", help="teacher model folder or HF name (CoCoMix: online labels; KD: online logits)")
    parser.add_argument("--teacher-logits", help="teacher-logit cache folder (KD, cached targets)")
    parser.add_argument("--sae", help="SAE file or URL (CoCoMix, online labels)")
    parser.add_argument("--threads", type=int, help="torch threads per process")
    parser.add_argument("--mlflow-run-id", help="log to this existing MLflow run (default: the console)")
    args = parser.parse_args(argv)

    try:
        job, tracker, labels, teacher = _open_inputs(args, parser)
    except CocomixError as error:
        sys.exit(f"error: {error}")
    # The run belongs to the caller, who ends it; an interrupted or failed attempt ends it KILLED or FAILED.
    owns_status = args.mlflow_run_id and PartialState().is_main_process
    uri = settings_from_args(args).tracking.mlflow_uri
    try:
        with ended_on_failure([args.mlflow_run_id], uri) if owns_status else contextlib.nullcontext():
            try:
                result = train(job, args.data, args.out, tracker=tracker, labels=labels, teacher=teacher,
                               num_threads=args.threads)
            finally:
                tracker.close()
    except CocomixError as error:  # e.g. data files not matching their manifest, a non-finite loss, a foreign --out
        sys.exit(f"error: {error}")
    if PartialState().is_main_process:
        print(f"done: step {result.final_step}, val ppl {result.final_val_ppl:.3f}, final checkpoint {result.final_checkpoint}")


if __name__ == "__main__":
    main()
