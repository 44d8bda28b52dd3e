"""Knowledge distillation from the experiment's teacher (SPEC §9, the `kd` arm).

    L = L_ntp + λ_kd · τ² · mean_t KL(softmax(u_t/τ) ‖ softmax(s_t/τ))

u_t and s_t are the teacher's and the student's next-token logits at every position that has a
next token (t = 0 … T−2, the HF shift), computed in float32 (float64 stays float64).

Teacher targets come from one of two sources, both read by the trainer as `source.targets(first_sample, input_ids)`:
    OnlineTeacher      runs the teacher on the very batch: full logits, exact.
    TeacherLogitCache  written once per experiment by `build_teacher_logit_cache` and shared by
                       every seed: per token, the top-k teacher log-probabilities at τ, their ids,
                       and the log of the remaining (tail) probability mass r_t.

Exactness of the cache. With S_t the cached ids, p the teacher's and q the student's distribution
at τ, the cached loss is the KL of the coarse-grained distributions (S_t's ids, plus one bucket for
the tail):  Σ_{v∈S} p_v log(p_v/q_v) + r log(r/Q),  Q = 1 − Σ_{v∈S} q_v  (computed as a masked log-sum-exp).
  * Value: by the log-sum inequality it never exceeds the exact KL; the gap is r_t · KL(p̃ ‖ q̃) of the
    tail-conditional distributions, so it vanishes with r_t (and is exactly 0 when k covers the vocabulary).
  * Gradient: w.r.t. s_t/τ it is q_v − p_v on S (exact) and q_v(1 − r/Q) on the tail instead of
    q_v − p_v, so its L1 error per position is Σ_tail |p_v − r·q_v/Q| ≤ 2·r_t.
The cache records the mean and max of r_t over every cached position (manifest `tail_mass`), so the
bound of a run is known before it trains. Cached values are float32 log-probabilities computed from
float32 teacher logits, exactly as the online path computes them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cocomix_core.plumbing.files import atomic_path, sha256_file

CACHE_FORMAT = "cocomix-teacher-logits-v1"
MANIFEST_FILE = "manifest.json"
ARRAY_FILES = {"token_ids": ("top_ids.i32", np.int32), "log_probs": ("top_log_probs.f32", np.float32),
               "tail_log_prob": ("tail_log_prob.f32", np.float32)}

__all__ = ["TeacherTargets", "OnlineTeacher", "TeacherLogitCache", "build_teacher_logit_cache",
           "distillation_kl", "top_k_targets"]


@dataclass
class TeacherTargets:
    """Top-k teacher distribution at τ per token: ids and log-probs (B×T×k), log tail mass (B×T)."""

    token_ids: torch.Tensor
    log_probs: torch.Tensor
    tail_log_prob: torch.Tensor


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _masked_logsumexp(values: torch.Tensor, masked_ids: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim leaving out `masked_ids`; a finite floor instead of −inf keeps gradients finite
    when nothing is left (then the result is ≈ dtype min and every caller weights it by a zero mass)."""
    floor = torch.finfo(values.dtype).min
    return values.scatter(-1, masked_ids, floor).logsumexp(dim=-1)


def top_k_targets(teacher_logits: torch.Tensor, k: int, temperature: float) -> TeacherTargets:
    """The cacheable part of softmax(u/τ): its k largest log-probs, their ids, and the log of the rest's mass."""
    log_p = F.log_softmax(teacher_logits.to(_compute_dtype(teacher_logits)) / temperature, dim=-1)
    k = min(k, log_p.shape[-1])
    top_log_probs, top_ids = torch.topk(log_p, k, dim=-1)
    return TeacherTargets(token_ids=top_ids, log_probs=top_log_probs, tail_log_prob=_masked_logsumexp(log_p, top_ids))


def distillation_kl(student_logits: torch.Tensor, teacher: torch.Tensor | TeacherTargets, temperature: float) -> torch.Tensor:
    """mean over positions with a next token of KL(softmax(u/τ) ‖ softmax(s/τ)); exact for full teacher logits,
    the tail-bucketed KL of the module docstring for `TeacherTargets`. Not multiplied by τ² or λ_kd."""
    dtype = _compute_dtype(student_logits)
    log_q = F.log_softmax(student_logits[:, :-1].to(dtype) / temperature, dim=-1)
    if isinstance(teacher, torch.Tensor):
        # The student may have padded vocabulary rows (SPEC §8): the teacher gives them probability 0.
        log_p = F.log_softmax(teacher[:, :-1].to(dtype) / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q[..., : log_p.shape[-1]])).sum(-1)
        return kl.mean()
    ids = teacher.token_ids[:, :-1].to(log_q.device, torch.int64)
    log_p = teacher.log_probs[:, :-1].to(log_q.device, dtype)
    log_r = teacher.tail_log_prob[:, :-1].to(log_q.device, dtype)
    head = (log_p.exp() * (log_p - log_q.gather(-1, ids))).sum(-1)
    log_tail_q = _masked_logsumexp(log_q, ids)
    r = log_r.exp()
    tail = torch.where(r > 0, r * (log_r - log_tail_q), torch.zeros((), dtype=dtype, device=r.device))
    return (head + tail).mean()


class OnlineTeacher:
    """The teacher run on each training batch: exact full logits (one teacher forward per micro-batch)."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher.eval().requires_grad_(False)

    @torch.no_grad()
    def targets(self, first_sample: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher logits B×T×V of `input_ids` (first_sample is unused: the ids are the batch)."""
        device = next(self.teacher.parameters()).device
        return self.teacher(input_ids=input_ids.to(device), use_cache=False).logits.float()


def _manifest_core(num_samples: int, block_size: int, top_k: int, temperature: float, vocab_size: int,
                   windows_seed: int, provenance: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT, "num_samples": int(num_samples), "block_size": int(block_size), "top_k": int(top_k),
        "temperature": float(temperature), "vocab_size": int(vocab_size), "windows_seed": int(windows_seed),
        "provenance": json.loads(json.dumps(dict(provenance), sort_keys=True, default=str)),
    }


def build_teacher_logit_cache(
    teacher: nn.Module, windows: Any, num_samples: int, batch_size: int, top_k: int, temperature: float,
    out_dir: str | os.PathLike, provenance: Mapping[str, Any],
) -> Path:
    """Top-k teacher targets at τ of global samples 0..num_samples-1 of `windows` into out_dir (atomically).

    Like `concepts.build_label_cache`: row g holds sample g; an intact cache with the same manifest is kept as is.
    """
    if num_samples < 1 or batch_size < 1 or top_k < 1:
        raise ValueError(f"num_samples, batch_size and top_k must be positive, got {num_samples}, {batch_size}, {top_k}")
    vocab_size = int(teacher.config.vocab_size)
    out_dir = Path(out_dir)
    core = _manifest_core(num_samples, windows.block_size, min(top_k, vocab_size), temperature, vocab_size,
                          windows.seed, provenance)
    if (out_dir / MANIFEST_FILE).is_file():
        try:
            cache = TeacherLogitCache(out_dir)
            if all(cache.manifest.get(key) == value for key, value in core.items()) and cache.verify_files():
                return out_dir
        except (ValueError, OSError, json.JSONDecodeError):
            pass  # unreadable or stale: rebuild

    online = OnlineTeacher(teacher)
    shape = (num_samples, windows.block_size)
    tail_sum, tail_max = 0.0, 0.0
    with atomic_path(out_dir) as temp:
        temp.mkdir(parents=True)
        arrays = {
            field: np.lib.format.open_memmap(temp / name, mode="w+", dtype=dtype,
                                             shape=shape if field == "tail_log_prob" else (*shape, core["top_k"]))
            for field, (name, dtype) in ARRAY_FILES.items()
        }
        for first in range(0, num_samples, batch_size):
            count = min(batch_size, num_samples - first)
            ids = torch.from_numpy(windows.batch(first, count))
            targets = top_k_targets(online.targets(first, ids), core["top_k"], temperature)
            for field, array in arrays.items():
                array[first : first + count] = getattr(targets, field).cpu().numpy()
            tail = targets.tail_log_prob.exp()
            tail_sum, tail_max = tail_sum + tail.sum().item(), max(tail_max, tail.max().item())
        for array in arrays.values():
            array.flush()
        del arrays
        manifest = dict(core, tail_mass={"mean": tail_sum / (num_samples * windows.block_size), "max": tail_max},
                        sha256={name: sha256_file(temp / name) for name, _ in ARRAY_FILES.values()})
        (temp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out_dir


class TeacherLogitCache:
    """Read side of a folder written by `build_teacher_logit_cache`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no teacher-logit cache manifest at {manifest_path}")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {CACHE_FORMAT!r}")
        self.num_samples = int(self.manifest["num_samples"])
        self.temperature = float(self.manifest["temperature"])
        self._arrays = {field: np.load(self.path / name, mmap_mode="r") for field, (name, _) in ARRAY_FILES.items()}
        expected = (self.num_samples, int(self.manifest["block_size"]))
        for field, array in self._arrays.items():
            if array.shape[:2] != expected:
                raise ValueError(f"{self.path / ARRAY_FILES[field][0]} has shape {array.shape}, expected {expected}+")

    def verify_files(self) -> bool:
        """Whether every array file still has the checksum the manifest recorded."""
        stored = self.manifest.get("sha256", {})
        return all(sha256_file(self.path / name) == stored.get(name) for name, _ in ARRAY_FILES.values())

    def check(self, expected: Mapping[str, Any]) -> None:
        """Raise ValueError naming every manifest field that differs from `expected` (e.g. temperature, block_size)."""
        problems = [f"{key}: cache has {self.manifest.get(key)!r}, expected {value!r}"
                    for key, value in expected.items() if self.manifest.get(key) != value]
        if problems:
            raise ValueError(f"teacher-logit cache at {self.path} does not match: " + "; ".join(problems))

    def targets(self, first_sample: int, input_ids: torch.Tensor) -> TeacherTargets:
        """Targets of samples first_sample … first_sample + len(input_ids) − 1."""
        end = first_sample + len(input_ids)
        if first_sample < 0 or end > self.num_samples:
            raise IndexError(f"teacher-logit cache holds samples 0..{self.num_samples - 1}; asked for {first_sample}..{end - 1}")
        rows = {field: torch.from_numpy(np.array(array[first_sample:end])) for field, array in self._arrays.items()}
        return TeacherTargets(**rows)
