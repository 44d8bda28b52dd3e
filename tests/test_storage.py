"""Storage of large folders: a local root, and S3 for real against a local moto server."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from cocomix_core.plumbing.files import is_local_only
from cocomix_core.plumbing.storage import (
    MARKER,
    RESUMABLE_MARKER,
    IncompleteError,
    IntegrityError,
    LocalStorage,
    S3Storage,
    Storage,
    default_storage_root,
)

UPLOAD_CALLS = ("PutObject", "CreateMultipartUpload", "UploadPart")
BIG_FILE_BYTES = 9 * 1024 * 1024  # above boto3's 8 MiB multipart threshold


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    for relative, content in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
    return folder


def read_files(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*") if path.is_file() and path.name not in (MARKER, RESUMABLE_MARKER) and not is_local_only(path)
    }


def count_s3_calls(storage: S3Storage) -> Counter:
    """Counts the S3 API calls the storage's client makes from now on, by operation name."""
    calls: Counter = Counter()
    storage.client.meta.events.register("before-call.s3.*", lambda model, **_: calls.update([model.name]))
    return calls


TRAINING_FOLDER = {
    "checkpoints/step_000050/model.safetensors": b"weights-50" * 100,
    "checkpoints/step_000050/checkpoint.json": b'{"step": 50}',
    "trainer_state/step_000050/state.pt": b"optimizer-50" * 100,
}


# ----- local root ------------------------------------------------------------------------------
def test_local_round_trip_publishes_in_place(tmp_path: Path):
    storage = Storage(f"file://{tmp_path / 'store'}")
    assert isinstance(storage, LocalStorage)
    workdir = storage.local_workdir("runs/r1/ntp/")
    write_files(workdir, TRAINING_FOLDER)
    assert not storage.exists("runs/r1/ntp")
    with pytest.raises(IncompleteError, match=MARKER):
        storage.materialize("runs/r1/ntp")

    uri = storage.publish(workdir, "runs/r1/ntp")
    assert uri == str(tmp_path / "store" / "runs" / "r1" / "ntp") == storage.uri("runs/r1/ntp")
    assert storage.exists("runs/r1/ntp")
    assert storage.materialize("runs/r1/ntp") == workdir
    assert read_files(workdir) == TRAINING_FOLDER

    storage.write_json("data/manifest.json", {"tokens": 123})
    assert storage.read_json("data/manifest.json") == {"tokens": 123}
    with pytest.raises(FileNotFoundError):
        storage.read_json("data/absent.json")


def test_local_publish_copies_a_folder_from_elsewhere_and_detects_missing_files(tmp_path: Path):
    storage = Storage(str(tmp_path / "store"))
    source = write_files(tmp_path / "elsewhere", {"a.bin": b"a", "sub/b.bin": b"bb"})
    storage.publish(source, "data/x")
    folder = storage.materialize("data/x")
    assert folder != source and read_files(folder) == {"a.bin": b"a", "sub/b.bin": b"bb"}

    (folder / "sub" / "b.bin").write_bytes(b"\0\0")  # zeroed in place: same size, other content
    with pytest.raises(IntegrityError, match="sub/b.bin"):
        storage.materialize("data/x")
    (folder / "sub" / "b.bin").unlink()
    with pytest.raises(IncompleteError, match="sub/b.bin"):
        storage.materialize("data/x")


def test_a_failed_step_publishes_a_resumable_folder_that_never_counts_as_complete(tmp_path: Path):
    storage = Storage(str(tmp_path / "store"))
    with pytest.raises(OSError, match="No space"):
        with storage.stored_folder("runs/r1/ntp", resumable=True) as folder:
            write_files(folder, {"checkpoints/step_000004/model.safetensors": b"w4"})
            raise OSError(28, "No space left on device")
    assert not (folder / MARKER).exists() and (folder / RESUMABLE_MARKER).exists()
    assert not storage.exists("runs/r1/ntp") and storage.exists("runs/r1/ntp", resumable=True)
    with pytest.raises(IncompleteError, match="resumable state of a step that did not finish"):
        storage.materialize("runs/r1/ntp")

    with storage.stored_folder("runs/r1/ntp", resumable=True) as retry:  # the retry continues from it
        assert read_files(retry) == {"checkpoints/step_000004/model.safetensors": b"w4"}
        write_files(retry, {"checkpoints/step_000008/model.safetensors": b"w8"})
    assert storage.exists("runs/r1/ntp") and not (retry / RESUMABLE_MARKER).exists()
    assert len(read_files(storage.materialize("runs/r1/ntp"))) == 2


def test_a_corrupted_complete_folder_is_withdrawn_and_rebuilt(tmp_path: Path):
    storage = Storage(str(tmp_path / "store"))
    with storage.stored_folder("data/x") as folder:
        write_files(folder, {"train.bin": b"tokens"})
    (folder / "train.bin").write_bytes(b"\0" * 6)
    with pytest.raises(RuntimeError, match="rebuild failed"):
        with storage.stored_folder("data/x") as rebuilding:
            assert not storage.exists("data/x")  # withdrawn before the step runs: nobody trusts it meanwhile
            raise RuntimeError("rebuild failed")
    assert not storage.exists("data/x", resumable=True)
    with storage.stored_folder("data/x") as rebuilding:
        write_files(rebuilding, {"train.bin": b"tokens"})
    assert read_files(storage.materialize("data/x")) == {"train.bin": b"tokens"}


def test_failed_local_publish_leaves_no_valid_looking_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    storage = Storage(str(tmp_path / "store"))
    source = write_files(tmp_path / "src", {"1.bin": b"1", "2.bin": b"2", "3.bin": b"3"})
    real_copy, copied = shutil.copyfile, []

    def copy_then_crash(src, dst, **kwargs):
        if copied:
            raise OSError("disk full")
        copied.append(src)
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copy_then_crash)
    with pytest.raises(OSError, match="disk full"):
        storage.publish(source, "data/x")
    assert not storage.exists("data/x")
    assert not (tmp_path / "store" / "data" / "x").exists()
    assert list((tmp_path / "store" / "data").iterdir()) == []  # no temporary left behind


BUILD_ONCE = """
import json, logging, os, sys, time
from cocomix_core.plumbing.storage import Storage

logging.basicConfig(level=logging.INFO, format="%(message)s")
with Storage(sys.argv[1]).stored_folder("teacher/t") as folder:
    built = not (folder / "weights").exists()
    if built:  # a slow build, in two writes: a second builder must not start meanwhile
        (folder / "started").write_text(str(os.getpid()))
        time.sleep(2)
        (folder / "weights").write_text(str(os.getpid()))
print(json.dumps({"pid": os.getpid(), "built": built, "weights": (folder / "weights").read_text()}))
"""


def test_two_processes_building_one_key_take_turns(tmp_path: Path):
    """Two flows sharing a storage root once wrote one teacher folder at once (one lost its trainer state)."""
    root = tmp_path / "store"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def builder() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", BUILD_ONCE, str(root)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    first = builder()
    deadline = time.monotonic() + 60
    while not (root / "teacher" / "t" / "started").exists():
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = builder()
    (first_out, _), (second_out, second_log) = first.communicate(timeout=60), second.communicate(timeout=60)
    first_result, second_result = json.loads(first_out), json.loads(second_out)
    assert first_result["built"] and not second_result["built"]
    assert second_result["weights"] == str(first_result["pid"])  # the second found the first one's folder
    assert "waiting for it" in second_log
    assert Storage(str(root)).exists("teacher/t")


def test_keys_cannot_escape_the_root(tmp_path: Path):
    storage = Storage(str(tmp_path))
    for bad_key in ("", "/", "a/../../b"):
        with pytest.raises(ValueError):
            storage.uri(bad_key)


def test_default_storage_root():
    assert default_storage_root("s3://bucket/metaflow/") == "s3://bucket/metaflow/cocomix-storage"
    assert default_storage_root("/home/me/.metaflow") == "/home/me/artifacts"


def test_a_clone_run_with_the_package_installed_elsewhere_keeps_storage_and_store_beside_its_datastore(tmp_path):
    """The package imports from this checkout (as an editable install of another checkout would); the run
    starts in a subfolder of a clone whose `.metaflow` sits at its root: Metaflow's datastore, the storage root
    and the MLflow store must all land in the clone, none beside the package."""
    package_home = Path(__file__).resolve().parent.parent
    clone = tmp_path / "clone"
    (clone / ".metaflow").mkdir(parents=True)
    (clone / "flows").mkdir()
    script = ("from cocomix_core.plumbing.storage import default_storage_root\n"
              "from cocomix_core.plumbing import tracking\n"
              "import cocomix_core\n"
              "print(cocomix_core.__file__)\nprint(default_storage_root(None))\nprint(tracking.resolve_tracking_uri())")
    env = {name: value for name, value in os.environ.items()
           if name not in ("METAFLOW_DATASTORE_SYSROOT_LOCAL", "MLFLOW_TRACKING_URI")} | {"PYTHONPATH": str(package_home)}
    result = subprocess.run([sys.executable, "-c", script], cwd=clone / "flows", env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    imported, storage_root, store = result.stdout.strip().splitlines()[-3:]
    assert Path(imported).is_relative_to(package_home)
    assert storage_root == str(clone.resolve() / "artifacts")
    assert store == f"sqlite:///{clone.resolve() / 'mlruns.db'}"
    # Metaflow's own setting of where its local datastore lives moves both with it.
    env["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = str(tmp_path / "elsewhere")
    result = subprocess.run([sys.executable, "-c", script], cwd=clone / "flows", env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-2:] == [str(tmp_path / "elsewhere" / "artifacts"),
                                                       f"sqlite:///{tmp_path / 'elsewhere' / 'mlruns.db'}"]


# ----- S3 (moto server) ------------------------------------------------------------------------
def test_s3_publish_then_materialize_elsewhere_gives_identical_bytes(s3_root: str, tmp_path: Path):
    storage = Storage(s3_root)
    assert isinstance(storage, S3Storage)
    files = {**TRAINING_FOLDER, "train.bin": os.urandom(BIG_FILE_BYTES)}
    source = write_files(tmp_path / "writer", files)
    calls = count_s3_calls(storage)

    assert storage.publish(source, "runs/r1/ntp") == f"{s3_root}/runs/r1/ntp"
    assert calls["CreateMultipartUpload"] == 1  # the big file went up in parts

    reader = Storage(s3_root)  # another process, on another node
    folder = reader.materialize("runs/r1/ntp", cache_dir=tmp_path / "reader-cache")
    assert folder.is_relative_to(tmp_path / "reader-cache")
    assert read_files(folder) == files
    assert reader.exists("runs/r1/ntp") and not reader.exists("runs/r1/cocomix")


def test_s3_folder_without_marker_is_rejected(s3_root: str, tmp_path: Path):
    storage = Storage(s3_root)
    object_key = storage._object_key("runs/r1/ntp/model.safetensors")
    storage.client.put_object(Bucket=storage.bucket, Key=object_key, Body=b"half an upload")
    assert not storage.exists("runs/r1/ntp")
    with pytest.raises(IncompleteError, match=f"{MARKER} marker is missing"):
        storage.materialize("runs/r1/ntp", cache_dir=tmp_path)


def test_s3_interrupted_publish_is_invalid_and_a_retry_resumes(s3_root: str, tmp_path: Path, monkeypatch):
    storage = Storage(s3_root)
    source = write_files(tmp_path / "src", TRAINING_FOLDER)
    real_upload, uploaded = storage.client.upload_file, []

    def upload_then_crash(*args, **kwargs):
        if uploaded:
            raise ConnectionError("node preempted")
        uploaded.append(args)
        return real_upload(*args, **kwargs)

    monkeypatch.setattr(storage.client, "upload_file", upload_then_crash)
    with pytest.raises(ConnectionError):
        storage.publish(source, "runs/r1/ntp")
    assert not storage.exists("runs/r1/ntp")

    retry = Storage(s3_root)
    calls = count_s3_calls(retry)
    retry.publish(source, "runs/r1/ntp")
    assert calls["PutObject"] == len(TRAINING_FOLDER) - 1 + 1  # the rest, then the marker
    assert read_files(retry.materialize("runs/r1/ntp", cache_dir=tmp_path / "cache")) == TRAINING_FOLDER


def test_s3_republish_uploads_only_changed_files(s3_root: str, tmp_path: Path):
    storage = Storage(s3_root)
    source = write_files(tmp_path / "src", TRAINING_FOLDER)
    storage.publish(source, "runs/r1/ntp")

    calls = count_s3_calls(storage)
    storage.publish(source, "runs/r1/ntp")
    assert not any(calls[name] for name in UPLOAD_CALLS)  # nothing changed: nothing sent

    write_files(source, {"checkpoints/step_000050/checkpoint.json": b'{"step": 50, "edited": true}',
                         "checkpoints/step_000100/model.safetensors": b"weights-100"})
    storage.publish(source, "runs/r1/ntp")
    assert calls["PutObject"] == 2 + 1  # the two changed files, then the marker
    assert not calls["CreateMultipartUpload"]
    fresh = Storage(s3_root).materialize("runs/r1/ntp", cache_dir=tmp_path / "cache")
    assert read_files(fresh) == read_files(source)


def test_s3_materialize_skips_intact_files_and_repairs_damaged_ones(s3_root: str, tmp_path: Path):
    storage = Storage(s3_root)
    storage.publish(write_files(tmp_path / "src", TRAINING_FOLDER), "runs/r1/ntp")
    reader = Storage(s3_root)
    folder = reader.materialize("runs/r1/ntp", cache_dir=tmp_path / "cache")

    calls = count_s3_calls(reader)
    reader.materialize("runs/r1/ntp", cache_dir=tmp_path / "cache")
    assert calls["GetObject"] == 1  # only the marker

    damaged = folder / "trainer_state/step_000050/state.pt"
    damaged.write_bytes(b"X" * damaged.stat().st_size)  # same size, other bytes
    (folder / MARKER).unlink()
    calls.clear()
    reader.materialize("runs/r1/ntp", cache_dir=tmp_path / "cache")
    assert calls["GetObject"] == 1 + 1  # the marker and the damaged file
    assert read_files(folder) == TRAINING_FOLDER


def test_s3_resumed_training_on_a_fresh_node(s3_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COCOMIX_CACHE", str(tmp_path / "node-1"))
    first_node = Storage(s3_root)
    workdir = first_node.local_workdir("runs/r1/ntp")
    assert workdir.is_relative_to(tmp_path / "node-1")
    first_node.publish(write_files(workdir, TRAINING_FOLDER), "runs/r1/ntp")

    monkeypatch.setenv("COCOMIX_CACHE", str(tmp_path / "node-2"))
    second_node = Storage(s3_root)
    resumed = second_node.materialize("runs/r1/ntp")
    assert resumed == second_node.local_workdir("runs/r1/ntp")  # resume writes where it downloaded
    assert read_files(resumed) == TRAINING_FOLDER

    shutil.rmtree(resumed / "trainer_state/step_000050")  # superseded by the new state
    write_files(resumed, {"checkpoints/step_000100/model.safetensors": b"weights-100",
                          "trainer_state/step_000100/state.pt": b"optimizer-100"})
    second_node.publish(resumed, "runs/r1/ntp")

    listed = second_node.client.list_objects_v2(Bucket=second_node.bucket, Prefix=second_node._object_key("runs"))
    stored = sorted(item["Key"].split("runs/r1/ntp/")[1] for item in listed["Contents"])
    assert stored == sorted([MARKER, *read_files(resumed)])  # the old trainer state is gone
    third = Storage(s3_root).materialize("runs/r1/ntp", cache_dir=tmp_path / "node-3")
    assert read_files(third) == read_files(resumed)


def test_s3_json_and_pickling(s3_root: str):
    storage = Storage(s3_root)
    storage.write_json("data/abc/manifest.json", {"sha256": "abc"})
    clone = pickle.loads(pickle.dumps(storage))
    assert isinstance(clone, S3Storage) and clone.read_json("data/abc/manifest.json") == {"sha256": "abc"}
    with pytest.raises(FileNotFoundError):
        clone.read_json("data/absent.json")
    assert json.loads(json.dumps(clone.uri("data/abc"))) == f"{s3_root}/data/abc"


def test_s3_resumable_publish_withdraws_completion_until_the_folder_is_complete(s3_root: str, tmp_path: Path):
    writer = Storage(s3_root)
    folder = write_files(tmp_path / "node-1", TRAINING_FOLDER)
    writer.publish(folder, "runs/r1/ntp")
    writer.publish(folder, "runs/r1/ntp", complete=False)  # a retry failed after the earlier success
    reader = Storage(s3_root)
    assert not reader.exists("runs/r1/ntp") and reader.exists("runs/r1/ntp", resumable=True)
    with pytest.raises(IncompleteError, match="resumable state"):
        reader.materialize("runs/r1/ntp", cache_dir=tmp_path / "node-2")
    mirror = reader.materialize("runs/r1/ntp", cache_dir=tmp_path / "node-2", resumable=True)
    assert read_files(mirror) == TRAINING_FOLDER and (mirror / RESUMABLE_MARKER).exists()

    writer.publish(folder, "runs/r1/ntp")
    assert reader.exists("runs/r1/ntp")
    assert reader._read_marker("runs/r1/ntp", RESUMABLE_MARKER) is None
    complete = reader.materialize("runs/r1/ntp", cache_dir=tmp_path / "node-2")
    assert (complete / MARKER).exists() and not (complete / RESUMABLE_MARKER).exists()
