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
a finished one, and a download can be verified file by file.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import boto3
from botocore.exceptions import ClientError

from cocomix_core import PROJECT_ROOT
from cocomix_core.fileio import atomic_path, is_partial, sha256_file, write_json_atomic

MARKER = "_COMPLETE"
MARKER_FORMAT = 1

# {relative posix path: {"size": bytes, "sha256": hex}}
FileTable = dict[str, dict[str, Any]]


class IncompleteError(FileNotFoundError):
    """A key holds no complete folder: never published, or its publish was interrupted."""


class IntegrityError(RuntimeError):
    """Stored bytes disagree with the sha256 their `_COMPLETE` marker vouches for."""


def default_storage_root(datastore_root: str | None) -> str:
    """`<datastore_root>/cocomix-storage` when Metaflow's datastore is on S3, else `<project>/artifacts`."""
    if datastore_root and datastore_root.startswith("s3://"):
        return f"{datastore_root.rstrip('/')}/cocomix-storage"
    return str(PROJECT_ROOT / "artifacts")


def _normalize_key(key: str) -> str:
    """'a/b/' -> 'a/b'; refuses empty keys and '..' so a key can never escape its root."""
    parts = [part for part in key.strip("/").split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"invalid storage key: {key!r}")
    return "/".join(parts)


def _publishable_files(folder: Path) -> list[str]:
    """Relative paths of the files under `folder`, minus markers and leftovers of interrupted writes."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder to publish at {folder}")
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and relative.name != MARKER and not any(is_partial(part) for part in relative.parts):
            found.append(relative.as_posix())
    return sorted(found)


def _unpublished_names(directory: str, names: list[str]) -> list[str]:
    """`shutil.copytree` filter with the same rule as `_publishable_files`."""
    return [name for name in names if name == MARKER or is_partial(name)]


def _read_local_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _missing_or_resized(folder: Path, files: FileTable) -> list[str]:
    """Files of the table that are absent under `folder` or have another size (a cheap check)."""
    return [
        relative for relative, entry in files.items()
        if not (folder / relative).is_file() or (folder / relative).stat().st_size != entry["size"]
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

    def is_intact(self, path: Path, entry: dict[str, Any]) -> bool:
        return path.is_file() and path.stat().st_size == entry["size"] and self.entry(path) == entry


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
    def publish(self, local_dir: str | os.PathLike, key: str) -> str:
        """Make `local_dir` available at `key` and mark it complete (idempotent); returns its URI."""

    @abc.abstractmethod
    def materialize(self, key: str, cache_dir: str | os.PathLike | None = None) -> Path:
        """A local folder holding the complete, verified contents published at `key`."""

    @abc.abstractmethod
    def read_json(self, key: str) -> Any:
        """Load a small JSON object stored at `key` (FileNotFoundError when absent)."""

    @abc.abstractmethod
    def write_json(self, key: str, obj: Any) -> str:
        """Store a small JSON object at `key` in one atomic write; returns its URI."""

    def exists(self, key: str) -> bool:
        """True when `key` holds a completely published folder."""
        return self._read_marker(key) is not None

    def _read_marker(self, key: str) -> dict[str, Any] | None:
        try:
            return self.read_json(f"{_normalize_key(key)}/{MARKER}")
        except FileNotFoundError:
            return None

    def _require_marker(self, key: str) -> dict[str, Any]:
        marker = self._read_marker(key)
        if marker is None:
            raise IncompleteError(
                f"{self.uri(key)} is not a complete folder: its {MARKER} marker is missing "
                "(never published, or the publish was interrupted)"
            )
        return marker

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

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def local_workdir(self, key: str) -> Path:
        path = self._path(key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, local_dir: str | os.PathLike, key: str) -> str:
        source, target = Path(local_dir).resolve(), self._path(key)
        if source == target:
            write_json_atomic(target / MARKER, self._marker_for(target))
        else:
            # Built under a temporary name and renamed: a failed copy leaves nothing at `key`.
            with atomic_path(target) as temp:
                shutil.copytree(source, temp, ignore=_unpublished_names)
                write_json_atomic(temp / MARKER, self._marker_for(temp))
        return self.uri(key)

    def materialize(self, key: str, cache_dir: str | os.PathLike | None = None) -> Path:
        """The folder itself (already local; `cache_dir` is ignored), after checking it is complete."""
        folder = self._path(key)
        missing = _missing_or_resized(folder, self._require_marker(key)["files"])
        if missing:
            raise IncompleteError(f"{folder} lacks files its {MARKER} marker lists: {missing[:5]}")
        return folder

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
        self.client = boto3.client("s3", endpoint_url=_s3_endpoint_url())

    def _object_key(self, key: str) -> str:
        return "/".join(part for part in (self.prefix, _normalize_key(key)) if part)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def _mirror(self, key: str, cache_dir: str | os.PathLike | None) -> Path:
        base = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        return base / self.bucket / self.prefix / _normalize_key(key)

    def local_workdir(self, key: str) -> Path:
        path = self._mirror(key, None)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, local_dir: str | os.PathLike, key: str) -> str:
        """Upload new and changed files, then write the marker last; remove files no longer present."""
        local_dir, key = Path(local_dir), _normalize_key(key)
        marker = self._marker_for(local_dir)
        previous = self._read_marker(key)
        previous_files: FileTable = previous["files"] if previous else {}
        if previous is not None and previous_files == marker["files"]:
            return self.uri(key)
        changed = [relative for relative, entry in marker["files"].items() if previous_files.get(relative) != entry]
        if any(relative in previous_files for relative in changed):
            # An object the current marker vouches for is about to change: withdraw the marker
            # first, so no reader trusts a mix of old and new files.
            self.client.delete_object(Bucket=self.bucket, Key=self._object_key(f"{key}/{MARKER}"))
        for relative in changed:
            self._upload(local_dir / relative, self._object_key(f"{key}/{relative}"), marker["files"][relative])
        self.write_json(f"{key}/{MARKER}", marker)
        for relative in set(previous_files) - set(marker["files"]):
            self.client.delete_object(Bucket=self.bucket, Key=self._object_key(f"{key}/{relative}"))
        write_json_atomic(local_dir / MARKER, marker)
        return self.uri(key)

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

    def materialize(self, key: str, cache_dir: str | os.PathLike | None = None) -> Path:
        """Download into the key's mirror under `cache_dir` (default `$COCOMIX_CACHE` or
        `~/.cache/cocomix`), skipping files already there with the right size and sha256.

        Each file is downloaded under a temporary name, verified and renamed, and the local
        marker is written last. Files are replaced one by one rather than the whole folder,
        so parallel tasks on one node can share the mirror while another task reads it.
        """
        key = _normalize_key(key)
        marker = self._require_marker(key)
        folder = self._mirror(key, cache_dir)
        if _read_local_marker(folder) == marker and not _missing_or_resized(folder, marker["files"]):
            return folder
        (folder / MARKER).unlink(missing_ok=True)
        for relative, entry in marker["files"].items():
            if not self._digests.is_intact(folder / relative, entry):
                self._download(self._object_key(f"{key}/{relative}"), folder / relative, entry)
        write_json_atomic(folder / MARKER, marker)
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


@contextlib.contextmanager
def stored_folder(storage: Storage, key: str, resumable: bool = False) -> Iterator[Path]:
    """A local folder holding what `storage` has at `key` (if anything), published back when the block succeeds.

    `resumable` folders (a trainer's: every checkpoint in them is written atomically) are
    published even when the block fails, so a retry on another node continues from them.
    """
    folder = storage.materialize(key) if storage.exists(key) else storage.local_workdir(key)
    try:
        yield folder
    except Exception:
        if resumable:
            storage.publish(folder, key)
        raise
    storage.publish(folder, key)
