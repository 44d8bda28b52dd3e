"""Hugging Face model folders (teachers, checkpoints) checked cheaply, from their headers.

    config = check_model_folder(folder)   # config.json parsed; every safetensors file's header against its size

Used before transformers sees a folder, so a broken one is refused with the file named instead of a
traceback from deep inside the loading code.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from cocomix_core.plumbing.errors import CocomixError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ModelFolderError(CocomixError, ValueError):
    """A model folder whose config.json or weight files are unusable, naming the file."""


def read_model_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a Hugging Face model folder, checked to be a JSON object with a model_type."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelFolderError(f"{path} does not exist: {folder} is not a model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelFolderError(f"{path}: expected a JSON object with a 'model_type' (a transformers config)")
    return config


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise ModelFolderError unless the file's header parses and its tensors end exactly at the file's end."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise ModelFolderError(f"{path}: not a safetensors file (header length {header_len}, file {size} bytes)")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelFolderError(f"{path}: safetensors header is not valid JSON: the file is corrupted") from None
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise ModelFolderError(f"{path} is {size} bytes, its header describes {expected}: truncated or corrupted")


def check_model_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """Check config.json and every safetensors weight file of a model folder; return the config."""
    folder = Path(folder)
    config = read_model_config(folder)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelFolderError(f"{folder} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(path)
    return config
