"""Checkpoints of a training run: evaluation checkpoints (all kept) and the resumable trainer state.

    out_dir/checkpoints/step_000050/     HF model folder (safetensors) + tokenizer + checkpoint.json
    out_dir/trainer_state/step_000050/   state.safetensors (model, optimizer, RNG tensors) + state.json

Every folder is written under a ".partial" temporary name and renamed when complete; the
metadata file is written last inside it. So a crash while saving leaves the previous
checkpoint intact and the interrupted one unmistakably invalid. Trainer states get one folder
per step, so the new one is complete before the old one is deleted (no moment without one).

Nothing here unpickles: a run folder may live on shared storage, and loading a pickle runs
whatever code it names. Tensors go to safetensors, everything else (loop state, optimizer
hyperparameters, python/numpy RNG states) to JSON. The metadata file records the sha256 of
every file it vouches for, and loading verifies them.
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
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from cocomix_core.data.tokenizer import TextTokenizer, save_hf_tokenizer
from cocomix_core.plumbing.errors import CocomixError
from cocomix_core.plumbing.files import (
    atomic_path,
    cached_sha256,
    is_partial,
    sha256_file,
)

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_DIR = "trainer_state"
CHECKPOINT_META = "checkpoint.json"
TRAINER_STATE_FILE = "state.safetensors"
TRAINER_STATE_META = "state.json"
PICKLED_TRAINER_STATE = "state.pt"  # written by versions before TRAINER_STATE_FORMAT 2; never loaded
TRAINER_STATE_FORMAT = 2
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(CocomixError, RuntimeError):
    """A checkpoint or trainer state that must not be used: corrupted, or not in a format we load."""


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
    model: PreTrainedModel, out_dir: str | Path, metadata: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None, tokenizer: TextTokenizer | None = None,
) -> Path:
    """Write out_dir/checkpoints/step_{step:06d}/ (model, tokenizer, checkpoint.json) atomically.

    `metadata` must hold "step"; it becomes checkpoint.json, with the sha256 of every other
    file under "files_sha256" (what `verify_checkpoint` checks). `state_dict` replaces the
    model's own weights (a sharded model's gathered full state). `tokenizer` (default GPT-2's)
    is the data's: its HF files go into the folder, so stock `AutoTokenizer` and
    `lm_eval --model hf` load the checkpoint.
    """
    final = checkpoint_dir(out_dir, metadata["step"])
    with atomic_path(final) as temp:
        # a copy: save_pretrained empties the dict it is given
        model.save_pretrained(temp, state_dict=None if state_dict is None else dict(state_dict))
        if tokenizer is None or tokenizer.is_gpt2:
            save_hf_tokenizer(temp)
        else:
            tokenizer.save(temp)
        digests = {path.name: sha256_file(path) for path in sorted(temp.iterdir()) if path.is_file()}
        meta = {**metadata, "files_sha256": digests}
        (temp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return final


def _verify_files(folder: Path, recorded: dict[str, str], meta_name: str) -> None:
    """Raise CheckpointError naming the first file that is missing or whose sha256 differs from `recorded`."""
    for name, expected in sorted(recorded.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing, though {meta_name} lists it: the folder is incomplete")
        if cached_sha256(path) != expected:
            raise CheckpointError(
                f"{path} does not match the sha256 recorded in {meta_name} when it was written: the file is "
                "corrupted; delete this folder (training resumes from the previous one) or train again"
            )


def verify_checkpoint(checkpoint: str | Path) -> None:
    """Raise CheckpointError unless every file of a checkpoint matches the digest recorded when it was written.

    Digests are cached beside the files by (size, mtime, inode), so a second check costs a stat per file.
    """
    folder = Path(checkpoint)
    recorded = checkpoint_info(folder).get("files_sha256")
    if recorded is None:
        raise CheckpointError(f"{folder / CHECKPOINT_META} records no files_sha256: written by an older version; train again")
    unlisted = [path.name for path in folder.glob("*.safetensors") if path.name not in recorded]
    if unlisted:  # weights added after the fact would be loaded beside the vouched-for ones
        raise CheckpointError(f"{folder} holds weight files its {CHECKPOINT_META} does not list: {unlisted}")
    _verify_files(folder, recorded, CHECKPOINT_META)


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


# ----- trainer state-------------------------------------------------------------------------
# A trainer state is a nested structure of dicts, lists, tuples, tensors, numpy arrays and
# scalars (model and optimizer state dicts, RNG states). It is split into a flat dict of
# tensors (safetensors) and a JSON "structure" in which every container is tagged, so that
# loading rebuilds exactly these types and nothing else: no code is ever named in the file.
_ARRAY_DTYPES = {"uint32", "int64", "float64", "uint8"}


def _encode(value: Any, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensor = value.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses shared memory (tied weights)
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
        return {"tensor": name}
    if isinstance(value, np.ndarray):
        if value.dtype.name not in _ARRAY_DTYPES:
            raise TypeError(f"trainer state: numpy arrays of dtype {value.dtype} are not supported")
        return {"ndarray": value.tolist(), "dtype": value.dtype.name}
    if isinstance(value, dict):
        return {"dict": [[_encode(key, tensors, seen), _encode(item, tensors, seen)] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(item, tensors, seen) for item in value]}
    if isinstance(value, list):
        return [_encode(item, tensors, seen) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"trainer state: cannot store a {type(value).__name__} without pickling")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        return tensors[value["tensor"]]
    if "ndarray" in value:
        if value["dtype"] not in _ARRAY_DTYPES:
            raise CheckpointError(f"trainer state: unexpected array dtype {value['dtype']!r}")
        return np.array(value["ndarray"], dtype=value["dtype"])
    if "tuple" in value:
        return tuple(_decode(item, tensors) for item in value["tuple"])
    return {_decode(key, tensors): _decode(item, tensors) for key, item in value["dict"]}


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

    `state` (tensors, optimizer state, RNG states) goes to state.safetensors plus its JSON
    structure; `summary` (must hold "step") and the file's sha256 go to state.json, written
    last: it marks the folder complete.
    """
    final = trainer_state_dir(out_dir, summary["step"])
    root = final.parent
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, set())
    with atomic_path(final) as temp:
        temp.mkdir(parents=True)
        save_file(tensors, temp / TRAINER_STATE_FILE)
        meta = {"format": TRAINER_STATE_FORMAT, "summary": summary, "structure": structure,
                "files_sha256": {TRAINER_STATE_FILE: sha256_file(temp / TRAINER_STATE_FILE)}}
        (temp / TRAINER_STATE_META).write_text(json.dumps(meta, sort_keys=True) + "\n")
    for older in root.glob("step_*"):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)
    return final


def latest_trainer_state(out_dir: str | Path) -> Path | None:
    """The newest complete trainer-state folder of a run, or None when the run has not saved one."""
    states = _complete_step_dirs(Path(out_dir) / TRAINER_STATE_DIR, TRAINER_STATE_META)
    return states[-1] if states else None


def load_trainer_state(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, summary) of a trainer-state folder written by `save_trainer_state`, after checking its sha256.

    Refuses (CheckpointError naming the file) a pickled state.pt, whoever wrote it: unpickling runs code.
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / TRAINER_STATE_META).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{folder / TRAINER_STATE_META}: not valid JSON ({error.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != TRAINER_STATE_FORMAT:
        found = [path.name for path in folder.iterdir() if path.is_file()]
        pickled = folder / PICKLED_TRAINER_STATE
        what = f"{pickled} is a pickled trainer state" if pickled.exists() else f"{folder} holds {found}"
        raise CheckpointError(
            f"{what} (format {meta.get('format') if isinstance(meta, dict) else None!r}, expected "
            f"{TRAINER_STATE_FORMAT}: {TRAINER_STATE_FILE} + {TRAINER_STATE_META}); it is not loaded, since unpickling "
            f"can run code. Delete {folder} to resume from an earlier state or start again"
        )
    _verify_files(folder, meta["files_sha256"], TRAINER_STATE_META)
    state = _decode(meta["structure"], load_file(folder / TRAINER_STATE_FILE, device="cpu"))
    return state, meta["summary"]
