"""Atomic file and folder writes, and content digests.

Every output of the pipeline is written under a temporary name and renamed into
place at the end, so an interrupted write never leaves a valid-looking file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

PARTIAL_MARKER = ".partial"


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so memory stays flat."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of an object's canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f"{path.name}{PARTIAL_MARKER}-{uuid.uuid4().hex[:8]}")


def _replace_folder(new: Path, final: Path) -> None:
    """Swap a complete folder in for an existing one.

    Folders cannot be renamed over each other, so the old one is first moved
    aside under a partial name (never deleted before the new one is in place).
    """
    retired = _temp_sibling(final)
    os.replace(final, retired)
    os.replace(new, final)
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    Works for files and folders. On error the temporary is removed and `path`
    keeps whatever it held before.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(final)
    try:
        yield temp
        if final.is_dir() and temp.is_dir():
            _replace_folder(temp, final)
        else:
            os.replace(temp, final)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        elif temp.exists():
            temp.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON under a temporary name, then rename it into place."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def is_partial(path: str | os.PathLike) -> bool:
    """True for leftovers of an interrupted atomic write."""
    return PARTIAL_MARKER in Path(path).name
