"""Checkpoints of a training run: evaluation checkpoints (all kept) and the resumable trainer state.

    out_dir/checkpoints/step_000050/     HF model folder (safetensors) + tokenizer + checkpoint.json
    out_dir/trainer_state/step_000050/   state.pt (model, optimizer, RNG states, loop state) + state.json

Every folder is written under a ".partial" temporary name and renamed when complete; the
metadata file is written last inside it. So a crash while saving leaves the previous
checkpoint intact and the interrupted one unmistakably invalid. Trainer states get one folder
per step, so the new one is complete before the old one is deleted (no moment without one).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from cocomix_core.fileio import atomic_path, is_partial
from cocomix_core.tokenizer import TextTokenizer, save_hf_tokenizer

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_DIR = "trainer_state"
CHECKPOINT_META = "checkpoint.json"
TRAINER_STATE_FILE = "state.pt"
TRAINER_STATE_META = "state.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    """Where the evaluation checkpoint of `step` lives."""
    return Path(out_dir) / CHECKPOINTS_DIR / _step_dir_name(step)


def trainer_state_dir(out_dir: str | Path, step: int) -> Path:
    """Where the trainer state written after `step` lives."""
    return Path(out_dir) / TRAINER_STATE_DIR / _step_dir_name(step)


def _complete_step_dirs(root: Path, marker: str) -> list[Path]:
    """Folders step_NNNNNN under root that hold `marker` (written last), sorted by step."""
    found = [
        path for path in root.glob("step_*")
        if path.is_dir() and not is_partial(path) and _STEP_DIR.match(path.name) and (path / marker).is_file()
    ]
    return sorted(found, key=lambda path: int(_STEP_DIR.match(path.name).group(1)))


def remove_partial_leftovers(out_dir: str | Path) -> None:
    """Delete folders left by saves that were interrupted (names containing ".partial")."""
    for root in (Path(out_dir) / CHECKPOINTS_DIR, Path(out_dir) / TRAINER_STATE_DIR):
        for path in root.glob("*"):
            if is_partial(path):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# ----- evaluation checkpoints ----------------------------------------------------------------
def save_checkpoint(
    model: PreTrainedModel, out_dir: str | Path, metadata: dict[str, Any], tokenizer: TextTokenizer | None = None
) -> Path:
    """Write out_dir/checkpoints/step_{step:06d}/ (model, tokenizer, checkpoint.json) atomically.

    `metadata` must hold "step"; it becomes checkpoint.json. `tokenizer` (default GPT-2's) is the data's:
    its HF files go into the folder, so stock `AutoTokenizer` and `lm_eval --model hf` load the checkpoint.
    """
    final = checkpoint_dir(out_dir, metadata["step"])
    with atomic_path(final) as temp:
        model.save_pretrained(temp)
        if tokenizer is None or tokenizer.is_gpt2:
            save_hf_tokenizer(temp)
        else:
            tokenizer.save(temp)
        (temp / CHECKPOINT_META).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete evaluation checkpoints of a run, sorted by step (interrupted saves are skipped)."""
    return _complete_step_dirs(Path(out_dir) / CHECKPOINTS_DIR, CHECKPOINT_META)


def checkpoint_info(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint.json of a checkpoint folder: step, tokens_seen, job, kind, digests."""
    return json.loads((Path(checkpoint) / CHECKPOINT_META).read_text())


def final_checkpoint(out_dir: str | Path) -> Path:
    """The last complete checkpoint of a run: a regular HF model folder (for a teacher: `load_teacher` it)."""
    checkpoints = list_checkpoints(out_dir)
    if not checkpoints:
        raise FileNotFoundError(f"no complete checkpoint under {Path(out_dir) / CHECKPOINTS_DIR}")
    return checkpoints[-1]


# ----- trainer state -------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Every RNG the process uses: python, numpy, torch CPU and (when present) every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(out_dir: str | Path, state: dict[str, Any], summary: dict[str, Any]) -> Path:
    """Write out_dir/trainer_state/step_{step}/ atomically, then delete older trainer states.

    `state` is torch-saved (tensors, optimizer state, RNG states); `summary` (JSON, must hold
    "step") is written last and marks the folder complete.
    """
    final = trainer_state_dir(out_dir, summary["step"])
    root = final.parent
    with atomic_path(final) as temp:
        temp.mkdir(parents=True)
        torch.save(state, temp / TRAINER_STATE_FILE)
        (temp / TRAINER_STATE_META).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    for older in root.glob("step_*"):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)
    return final


def latest_trainer_state(out_dir: str | Path) -> Path | None:
    """The newest complete trainer-state folder of a run, or None when the run has not saved one."""
    states = _complete_step_dirs(Path(out_dir) / TRAINER_STATE_DIR, TRAINER_STATE_META)
    return states[-1] if states else None


def load_trainer_state(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, summary) of a trainer-state folder written by `save_trainer_state`."""
    folder = Path(folder)
    summary = json.loads((folder / TRAINER_STATE_META).read_text())
    # Our own file, holding RNG states (python tuples, numpy arrays) that the weights-only loader rejects.
    state = torch.load(folder / TRAINER_STATE_FILE, map_location="cpu", weights_only=False)
    return state, summary
