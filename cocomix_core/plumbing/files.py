"""Atomic file and folder writes, content digests, and scratch folders.

Every output of the pipeline is written under a temporary name and renamed into
place at the end, so an interrupted write never leaves a valid-looking file.
Content is verified by sha256; `cached_sha256` remembers a file's digest in a
small sidecar next to it, keyed by (size, mtime, inode), so verifying a reused
folder costs one hash per file once, then a stat per file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

PARTIAL_MARKER = ".partial"
LOCAL_ONLY_PREFIX = ".local-"  # files about this machine's copy (digest caches): never published
DIGEST_SIDECAR = f"{LOCAL_ONLY_PREFIX}sha256.json"


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


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on the file `path` (created if absent) for the block; other processes wait.

    `on_wait` runs once when another process holds the lock, before waiting for it. The kernel drops the
    lock when its holder dies, so a killed process never leaves the others waiting forever.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON under a temporary name, then rename it into place."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def is_partial(path: str | os.PathLike) -> bool:
    """True for leftovers of an interrupted atomic write."""
    return PARTIAL_MARKER in Path(path).name


def is_local_only(path: str | os.PathLike) -> bool:
    """True for files that describe this machine's copy of a folder (e.g. the digest sidecar), not its content."""
    return Path(path).name.startswith(LOCAL_ONLY_PREFIX)


def _stat_key(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, hashed again only when its size, mtime or inode changed since the last call.

    Digests live in `.local-sha256.json` beside the file. An in-place overwrite (even of the
    same size) changes the mtime, so it is hashed again; the sidecar is only a cache.
    """
    path = Path(path)
    sidecar = path.parent / DIGEST_SIDECAR
    try:
        known = json.loads(sidecar.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        known = {}
    entry = known.get(path.name, {})
    stat_key = _stat_key(path)
    if entry.get("stat") == stat_key:
        return entry["sha256"]
    digest = sha256_file(path)
    if _stat_key(path) == stat_key:  # unchanged while hashing: safe to remember
        known[path.name] = {"stat": stat_key, "sha256": digest}
        with contextlib.suppress(OSError):  # a read-only folder just stays uncached
            write_json_atomic(sidecar, known)
    return digest


@contextlib.contextmanager
def scratch_folder(name: str) -> Iterator[Path]:
    """A fresh folder under $TMPDIR (named cocomix-<name>-*) for a task's small files, removed when the block ends."""
    folder = Path(tempfile.mkdtemp(prefix=f"cocomix-{name}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
