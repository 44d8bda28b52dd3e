"""Storage for large folders (token shards, checkpoints, SAE, label caches), addressed by URI.

Big things never travel as Metaflow artifacts, and steps on Kubernetes/Batch share no
filesystem, so every large folder is published under a key of one storage root: a local
folder by default, or object storage (`s3://bucket/prefix`) when steps run remotely.

    storage = Storage(root_uri)
    workdir = storage.local_workdir("runs/r1/ntp")   # write the folder here...
    storage.publish(workdir, "runs/r1/ntp")          # ...then make it available at its key
    folder = storage.materialize("runs/r1/ntp")      # any other step, on any node

A folder is valid only once its `_COMPLETE` marker exists. The marker is written last and
lists every file with its size and sha256, so an interrupted publish is never mistaken for
a finished one, and a download can be verified file by file. A step that failed halfway may
publish what it has with `complete=False` (a trainer's run folder, whose checkpoints are each
written atomically): the folder then carries a `_RESUMABLE` marker instead, which only
`resumable=True` readers accept, so a retry continues from it and no later step takes it for
finished. `stored_folder` wraps this round trip for a step.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import boto3
import botocore.config
from botocore.exceptions import ClientError

from cocomix_core.plumbing.errors import CocomixError
from cocomix_core.plumbing.files import (
    atomic_path,
    cached_sha256,
    exclusive_lock,
    is_local_only,
    is_partial,
    sha256_file,
    write_json_atomic,
)
from cocomix_core.plumbing.progress import say

MARKER = "_COMPLETE"
RESUMABLE_MARKER = "_RESUMABLE"
MARKERS = (MARKER, RESUMABLE_MARKER)
MARKER_FORMAT = 1
LOCKS_FOLDER = ".locks"  # lock files of folders being built (empty files; the kernel holds the locks)

# {relative posix path: {"size": bytes, "sha256": hex}}
FileTable = dict[str, dict[str, Any]]

log = logging.getLogger(__name__)


class IncompleteError(CocomixError, FileNotFoundError):
    """A key holds no complete folder: never published, or its publish was interrupted."""


class IntegrityError(CocomixError, RuntimeError):
    """Stored bytes disagree with the sha256 their `_COMPLETE` marker vouches for."""


METAFLOW_LOCAL_FOLDER = ".metaflow"  # the folder of Metaflow's local datastore


def local_datastore_home(cwd: str | os.PathLike | None = None) -> Path:
    """The folder that holds (or will hold) Metaflow's local datastore, found as Metaflow finds it.

    $METAFLOW_DATASTORE_SYSROOT_LOCAL if set, else the nearest folder from `cwd` (default: the working
    directory) upwards that has a `.metaflow` folder, else `cwd` itself. The library never imports Metaflow,
    so its command lines and the flow agree by following the same rule, not by asking Metaflow.
    """
    configured = os.environ.get("METAFLOW_DATASTORE_SYSROOT_LOCAL")
    if configured:
        return Path(configured).resolve()
    start = Path(cwd if cwd is not None else os.getcwd()).resolve()
    return next((folder for folder in (start, *start.parents) if (folder / METAFLOW_LOCAL_FOLDER).is_dir()), start)


def default_storage_root(datastore_root: str | None) -> str:
    """The storage root beside Metaflow's datastore: `<datastore_root>/cocomix-storage` on S3, else the
    `artifacts` folder beside the local `.metaflow` (`datastore_root`, or found by `local_datastore_home`).

    Never beside the installed package: a run from one clone must not write into another checkout (an
    editable install) or into site-packages.
    """
    if datastore_root and datastore_root.startswith("s3://"):
        return f"{datastore_root.rstrip('/')}/cocomix-storage"
    if datastore_root and Path(datastore_root).name == METAFLOW_LOCAL_FOLDER:
        return str(Path(datastore_root).resolve().parent / "artifacts")
    return str(local_datastore_home() / "artifacts")


def _normalize_key(key: str) -> str:
    """'a/b/' -> 'a/b'; refuses empty keys and '..' so a key can never escape its root."""
    parts = [part for part in key.strip("/").split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"invalid storage key: {key!r}")
    return "/".join(parts)


def _unpublished(name: str) -> bool:
    """Markers, leftovers of interrupted writes and this machine's digest caches are never published."""
    return name in MARKERS or is_partial(name) or is_local_only(name)


def _publishable_files(folder: Path) -> list[str]:
    """Relative paths of the files under `folder`, minus what `_unpublished` names."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder to publish at {folder}")
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not any(_unpublished(part) for part in relative.parts):
            found.append(relative.as_posix())
    return sorted(found)


def _unpublished_names(directory: str, names: list[str]) -> list[str]:
    """`shutil.copytree` filter with the same rule as `_publishable_files`."""
    return [name for name in names if _unpublished(name)]


def _marker_name(complete: bool) -> str:
    return MARKER if complete else RESUMABLE_MARKER


def _read_local_marker(folder: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((folder / name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _damaged(folder: Path, files: FileTable) -> list[str]:
    """Files of the table that are absent under `folder` or whose content differs from their sha256.

    Digests are cached beside the files by (size, mtime, inode): checking an unchanged folder
    again costs a stat per file.
    """
    return [
        relative for relative, entry in files.items()
        if not (folder / relative).is_file() or (folder / relative).stat().st_size != entry["size"]
        or cached_sha256(folder / relative) != entry["sha256"]
    ]


class _DigestCache:
    """sha256 of local files, remembered by (path, size, mtime), so publishing a growing
    training folder after every checkpoint hashes only the new files."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}

    def entry(self, path: Path) -> dict[str, Any]:
        stat = path.stat()
        cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if cache_key not in self._known:
            self._known[cache_key] = sha256_file(path)
        return {"size": stat.st_size, "sha256": self._known[cache_key]}

    def table(self, folder: Path) -> FileTable:
        return {relative: self.entry(folder / relative) for relative in _publishable_files(folder)}


class Storage(abc.ABC):
    """Large folders under one root URI: `Storage("/some/dir")`, `Storage("file:///some/dir")`
    or `Storage("s3://bucket/prefix")` (this returns the matching subclass)."""

    def __new__(cls, root_uri: str) -> "Storage":
        if cls is Storage:
            cls = S3Storage if root_uri.startswith("s3://") else LocalStorage
        return super().__new__(cls)

    def __init__(self, root_uri: str) -> None:
        self.root_uri = root_uri
        self._digests = _DigestCache()

    def __reduce__(self) -> tuple:
        # Rebuilt from the URI alone: clients and caches are per process (Metaflow pickles artifacts).
        return (Storage, (self.root_uri,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"

    @abc.abstractmethod
    def uri(self, key: str) -> str:
        """The address of `key` under this root (a local path or an s3:// URI)."""

    @abc.abstractmethod
    def local_workdir(self, key: str) -> Path:
        """The local folder a step should write into before calling `publish(folder, key)`."""

    @abc.abstractmethod
    def publish(self, local_dir: str | os.PathLike, key: str, complete: bool = True) -> str:
        """Make `local_dir` available at `key` and mark it complete, or only resumable (idempotent); returns its URI."""

    @abc.abstractmethod
    def materialize(self, key: str, cache_dir: str | os.PathLike | None = None, resumable: bool = False) -> Path:
        """A local folder holding the verified contents published at `key`: complete ones, or resumable ones too."""

    @abc.abstractmethod
    def withdraw(self, key: str) -> None:
        """Remove `key`'s markers, so nothing trusts its files any more (they stay, for a rebuild to reuse)."""

    @abc.abstractmethod
    def read_json(self, key: str) -> Any:
        """Load a small JSON object stored at `key` (FileNotFoundError when absent)."""

    @abc.abstractmethod
    def write_json(self, key: str, obj: Any) -> str:
        """Store a small JSON object at `key` in one atomic write; returns its URI."""

    def exists(self, key: str, resumable: bool = False) -> bool:
        """True when `key` holds a completely published folder (or, with `resumable`, a resumable one)."""
        return self._find_marker(key, resumable) is not None

    @contextlib.contextmanager
    def stored_folder(self, key: str, resumable: bool = False) -> Iterator[Path]:
        """A local folder holding what `key` has (if anything) for a step to complete; published when the block succeeds.

        With `resumable` (a folder whose files are each written atomically, like a trainer's), a
        block that fails or is interrupted publishes what it has without the completion marker, so
        a retry on any node continues from it. A complete folder whose content no longer matches
        its marker is withdrawn and handed over to be rebuilt.

        Processes on one machine take turns on a key (two flows sharing a storage root would otherwise
        write one folder at once): a second one waits, then finds the first one's folder complete.
        """
        def say_waiting() -> None:
            say(f"{self.uri(key)} is being built by another process on this machine; waiting for it")

        with exclusive_lock(self._lock_file(key), on_wait=say_waiting):
            try:
                found = self.exists(key, resumable)
                folder = self.materialize(key, resumable=resumable) if found else self.local_workdir(key)
            except (IntegrityError, IncompleteError) as error:
                log.warning("%s: withdrawn, the step rebuilds it", error)
                self.withdraw(key)
                folder = self.local_workdir(key)
            try:
                yield folder
            except BaseException as error:
                if resumable:
                    try:
                        self.publish(folder, key, complete=False)
                    except Exception as publish_error:  # e.g. the same full disk: the original error matters more
                        error.add_note(f"publishing the resumable state of {self.uri(key)} failed too: {publish_error}")
                raise
            self.publish(folder, key)

    def _lock_file(self, key: str) -> Path:
        """This machine's lock file for building `key`: beside the local root, or in the cache for object storage."""
        name = _normalize_key(key).replace("/", "%") + ".lock"
        return self._lock_folder() / name

    @abc.abstractmethod
    def _lock_folder(self) -> Path:
        """Where this machine keeps the lock files of `stored_folder`."""

    def _read_marker(self, key: str, name: str = MARKER) -> dict[str, Any] | None:
        try:
            return self.read_json(f"{_normalize_key(key)}/{name}")
        except FileNotFoundError:
            return None

    def _find_marker(self, key: str, resumable: bool) -> tuple[str, dict[str, Any]] | None:
        """(marker name, marker) of `key`: the completion marker, else (when accepted) the resumable one."""
        for name in MARKERS if resumable else (MARKER,):
            marker = self._read_marker(key, name)
            if marker is not None:
                return name, marker
        return None

    def _require_marker(self, key: str, resumable: bool = False) -> tuple[str, dict[str, Any]]:
        found = self._find_marker(key, resumable)
        if found is None:
            resumable_only = not resumable and self._read_marker(key, RESUMABLE_MARKER) is not None
            why = ("it holds only the resumable state of a step that did not finish" if resumable_only
                   else "never published, or the publish was interrupted")
            raise IncompleteError(f"{self.uri(key)} is not a complete folder: its {MARKER} marker is missing ({why})")
        return found

    def _marker_for(self, folder: Path) -> dict[str, Any]:
        return {"format": MARKER_FORMAT, "files": self._digests.table(folder)}


class LocalStorage(Storage):
    """Folders under a local root; a step that writes into `local_workdir(key)` publishes without a copy."""

    def __init__(self, root_uri: str) -> None:
        super().__init__(root_uri)
        path = urlparse(root_uri).path if root_uri.startswith("file://") else root_uri
        self.root = Path(path).expanduser().resolve()

    def _path(self, key: str) -> Path:
        return self.root / _normalize_key(key)

    def _lock_folder(self) -> Path:
        return self.root / LOCKS_FOLDER

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def local_workdir(self, key: str) -> Path:
        path = self._path(key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, local_dir: str | os.PathLike, key: str, complete: bool = True) -> str:
        source, target = Path(local_dir).resolve(), self._path(key)
        name = _marker_name(complete)
        if source == target:
            if not complete:
                (target / MARKER).unlink(missing_ok=True)  # withdraw the claim of completeness first
            write_json_atomic(target / name, self._marker_for(target))
            if complete:
                (target / RESUMABLE_MARKER).unlink(missing_ok=True)
        else:
            # Built under a temporary name and renamed: a failed copy leaves nothing at `key`.
            with atomic_path(target) as temp:
                shutil.copytree(source, temp, ignore=_unpublished_names)
                write_json_atomic(temp / name, self._marker_for(temp))
        return self.uri(key)

    def materialize(self, key: str, cache_dir: str | os.PathLike | None = None, resumable: bool = False) -> Path:
        """The folder itself (already local; `cache_dir` is ignored), after checking its content against its marker."""
        folder = self._path(key)
        name, marker = self._require_marker(key, resumable)
        damaged = _damaged(folder, marker["files"])
        missing = [relative for relative in damaged if not (folder / relative).is_file()]
        if missing:
            raise IncompleteError(f"{folder} lacks files its {name} marker lists: {missing[:5]}")
        if damaged:
            raise IntegrityError(
                f"{folder}: {damaged[:5]} missing or not matching the sha256 in its {name} marker "
                "(changed after publishing); the step that writes it must run again"
            )
        return folder

    def withdraw(self, key: str) -> None:
        for name in MARKERS:
            (self._path(key) / name).unlink(missing_ok=True)

    def read_json(self, key: str) -> Any:
        return json.loads(self._path(key).read_text())

    def write_json(self, key: str, obj: Any) -> str:
        write_json_atomic(self._path(key), obj)
        return self.uri(key)


def _s3_endpoint_url() -> str | None:
    """Endpoint of a non-AWS object store (MinIO, moto, ...), from boto3's or Metaflow's variables."""
    for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "METAFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(variable):
            return os.environ[variable]
    return None


# Bounds on every S3 call: an endpoint that refuses or never answers fails in well under a
# minute instead of botocore's default 60 s per read times several retries.
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 3


def s3_client(connect_timeout_s: float = S3_CONNECT_TIMEOUT_S, read_timeout_s: float = S3_READ_TIMEOUT_S,
              max_attempts: int = S3_MAX_ATTEMPTS) -> Any:
    """A boto3 S3 client on the configured endpoint, with bounded timeouts and retries."""
    config = botocore.config.Config(
        connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
        retries={"max_attempts": max_attempts, "mode": "standard"},
    )
    return boto3.client("s3", endpoint_url=_s3_endpoint_url(), config=config)


def _default_cache_dir() -> Path:
    return Path(os.environ.get("COCOMIX_CACHE") or Path.home() / ".cache" / "cocomix")


class S3Storage(Storage):
    """Folders under `s3://bucket/prefix`, mirrored locally in a cache folder per key.

    A key's local mirror (`<cache>/<bucket>/<prefix>/<key>`) is both where `materialize`
    downloads to and where `local_workdir` lets a step write, so a resumed training step
    materializes its folder, keeps writing into it, and publishes it again.
    """

    def __init__(self, root_uri: str) -> None:
        super().__init__(root_uri)
        parsed = urlparse(root_uri)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.client = s3_client()

    def _object_key(self, key: str) -> str:
        return "/".join(part for part in (self.prefix, _normalize_key(key)) if part)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def _mirror(self, key: str, cache_dir: str | os.PathLike | None) -> Path:
        base = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        return base / self.bucket / self.prefix / _normalize_key(key)

    def _lock_folder(self) -> Path:
        return _default_cache_dir() / LOCKS_FOLDER / self.bucket / self.prefix

    def local_workdir(self, key: str) -> Path:
        path = self._mirror(key, None)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, local_dir: str | os.PathLike, key: str, complete: bool = True) -> str:
        """Upload new and changed files, then write the marker last; remove files no longer present."""
        local_dir, key = Path(local_dir), _normalize_key(key)
        marker, name = self._marker_for(local_dir), _marker_name(complete)
        previous = self._find_marker(key, resumable=True)
        previous_files: FileTable = previous[1]["files"] if previous else {}
        if previous == (name, marker):
            return self.uri(key)
        changed = [relative for relative, entry in marker["files"].items() if previous_files.get(relative) != entry]
        if not complete or any(relative in previous_files for relative in changed):
            # An object a marker vouches for is about to change, or the folder stops being complete:
            # withdraw the markers first, so no reader trusts a mix of old and new files.
            self.withdraw(key)
        for relative in changed:
            self._upload(local_dir / relative, self._object_key(f"{key}/{relative}"), marker["files"][relative])
        self.write_json(f"{key}/{name}", marker)
        self._delete(f"{key}/{_marker_name(not complete)}")
        for relative in set(previous_files) - set(marker["files"]):
            self._delete(f"{key}/{relative}")
        write_json_atomic(local_dir / name, marker)
        (local_dir / _marker_name(not complete)).unlink(missing_ok=True)
        return self.uri(key)

    def withdraw(self, key: str) -> None:
        for name in MARKERS:
            self._delete(f"{_normalize_key(key)}/{name}")

    def _delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))

    def _upload(self, path: Path, object_key: str, entry: dict[str, Any]) -> None:
        """Upload one file (multipart when large), unless the object already holds these bytes.

        The check makes a retried, interrupted publish resume where it stopped.
        """
        if self._stored_sha256(object_key) == entry["sha256"]:
            return
        self.client.upload_file(str(path), self.bucket, object_key, ExtraArgs={"Metadata": {"sha256": entry["sha256"]}})

    def _stored_sha256(self, object_key: str) -> str | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=object_key)
        except ClientError as error:
            if error.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return head.get("Metadata", {}).get("sha256")

    def materialize(self, key: str, cache_dir: str | os.PathLike | None = None, resumable: bool = False) -> Path:
        """Download into the key's mirror under `cache_dir` (default `$COCOMIX_CACHE` or
        `~/.cache/cocomix`), skipping files already there with the right size and sha256.

        Each file is downloaded under a temporary name, verified and renamed, and the local
        marker is written last. Files are replaced one by one rather than the whole folder,
        so parallel tasks on one node can share the mirror while another task reads it.
        """
        key = _normalize_key(key)
        name, marker = self._require_marker(key, resumable)
        folder = self._mirror(key, cache_dir)
        damaged = _damaged(folder, marker["files"])
        if _read_local_marker(folder, name) == marker and not damaged:
            return folder
        for stale in MARKERS:
            (folder / stale).unlink(missing_ok=True)
        for relative in damaged:
            self._download(self._object_key(f"{key}/{relative}"), folder / relative, marker["files"][relative])
        write_json_atomic(folder / name, marker)
        return folder

    def _download(self, object_key: str, path: Path, entry: dict[str, Any]) -> None:
        with atomic_path(path) as temp:
            self.client.download_file(self.bucket, object_key, str(temp))
            if sha256_file(temp) != entry["sha256"]:
                raise IntegrityError(
                    f"s3://{self.bucket}/{object_key} does not match the sha256 in its {MARKER} marker "
                    "(changed after publishing?); publish the folder again"
                )

    def read_json(self, key: str) -> Any:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
        except self.client.exceptions.NoSuchKey as error:
            raise FileNotFoundError(self.uri(key)) from error
        return json.loads(response["Body"].read())

    def write_json(self, key: str, obj: Any) -> str:
        body = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        self.client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=body, ContentType="application/json")
        return self.uri(key)
