"""Faults injected the way they happen in practice, each checked by the state it leaves behind.

A planted pickle in a run folder, Ctrl-C during a save, a full disk, zeroed shards and
checkpoints: after each, no planted code has run, every metric has one point per step, MLflow
runs say KILLED or FAILED rather than RUNNING, no failed folder claims to be complete, and
corrupted files are refused or rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import answer_ctrl_c
from mlflow.tracking import MlflowClient

from cocomix_core.model.build import job_for_branch
from cocomix_core.plumbing import interrupts, tracking
from cocomix_core.plumbing.storage import MARKER, Storage
from cocomix_core.training.checkpoints import (
    CheckpointError,
    latest_trainer_state,
    list_checkpoints,
    load_trainer_state,
    verify_checkpoint,
)
from cocomix_core.training.trainer import train
from settings import load_settings, training_branches

REPO_ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["train.steps=8", "train.log_every=1", "train.eval_every=3", "train.checkpoint_every=4"]


def ntp_job(overrides: list[str] = OVERRIDES):
    settings = load_settings("smoke", overrides)
    return job_for_branch(settings, next(b for b in training_branches(settings) if b.name == "ntp"))


def zero_in_place(path: Path) -> None:
    """Overwrite a file with zeros, keeping its size (what a bad disk or a careless copy leaves)."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.write(bytes(size))


@pytest.fixture(scope="module")
def trained(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 8-step NTP run folder (checkpoints at 4 and 8); tests damage copies of it."""
    out = tmp_path_factory.mktemp("trained")
    train(ntp_job(), smoke_data, out, num_threads=1)
    return out


# ----- a planted pickle ------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates `marker`: the stand-in for code an attacker wants to run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "x"))


def test_a_planted_pickled_trainer_state_is_refused_and_never_runs(smoke_data, tmp_path):
    job = ntp_job()
    folder = tmp_path / "run" / "trainer_state" / "step_000004"
    folder.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    torch.save({"model": _Payload(marker), "optimizer": {}, "rng": {}}, folder / "state.pt")
    # The metadata an older version wrote beside its state.pt, so the folder looks like a resumable state.
    (folder / "state.json").write_text(json.dumps({"step": 4, "job_digest": job.digest(), "val_loss": 1.0}))

    with pytest.raises(CheckpointError, match=re.escape(str(folder / "state.pt"))):
        train(job, smoke_data, tmp_path / "run", num_threads=1)
    assert not marker.exists()

    # The payload is live: the loader this replaced (torch.load, weights_only=False) runs it.
    torch.load(folder / "state.pt", weights_only=False)
    assert marker.exists()


# ----- zeroed checkpoints and trainer states ---------------------------------------------------
def test_a_zeroed_checkpoint_is_detected(trained, tmp_path):
    run = shutil.copytree(trained, tmp_path / "run")
    first, last = list_checkpoints(run)
    verify_checkpoint(first)
    verify_checkpoint(last)  # twice: the second check reads the digest cache
    verify_checkpoint(last)
    zero_in_place(last / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(str(last / "model.safetensors"))):
        verify_checkpoint(last)
    verify_checkpoint(first)


def test_a_zeroed_trainer_state_is_refused_on_resume(trained, smoke_data, tmp_path):
    run = shutil.copytree(trained, tmp_path / "run")
    state_file = latest_trainer_state(run) / "state.safetensors"
    zero_in_place(state_file)
    with pytest.raises(CheckpointError, match=re.escape(str(state_file))):
        load_trainer_state(state_file.parent)
    with pytest.raises(CheckpointError, match="corrupted"):
        train(ntp_job(), smoke_data, run, num_threads=1)


# ----- Ctrl-C during a save, then resume, through the library's command line -----------------
# Runs `cocomix_core.training.trainer`'s command line; with HANG_AT set, the save of that step's checkpoint blocks
# (after touching <out>/hanging) so the test can interrupt it mid-save.
CLI_DRIVER = """
import os, sys, time
from pathlib import Path
import cocomix_core.training.checkpoints as checkpoints
from cocomix_core.training.trainer import main

def hanging_tokenizer_save(directory, original=checkpoints.save_hf_tokenizer):
    original(directory)
    if f"step_{int(os.environ['HANG_AT']):06d}" in str(directory):
        (Path(os.environ["OUT"]) / "hanging").touch()
        time.sleep(3600)

if os.environ.get("HANG_AT"):
    checkpoints.save_hf_tokenizer = hanging_tokenizer_save
main(sys.argv[1:])
"""


# Slow: two trainer processes, each paying MLflow's and torch's imports. The quick loop still covers each part:
# a kill during a save and the resume (test_resume), runs ended KILLED and reopened (the test below).
@pytest.mark.slow
def test_ctrl_c_during_a_save_then_resume_logs_each_point_once(smoke_data, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment("faults", tracking_uri=store)
    run_id = tracking.create_run(experiment, "train/ntp", tracking_uri=store)
    out = tmp_path / "run"
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(CLI_DRIVER)
    args = [sys.executable, str(driver), "--settings", "smoke", "--arm", "ntp", "--data", str(smoke_data),
            "--out", str(out), "--threads", "1", "--mlflow-run-id", run_id]
    args += [item for override in OVERRIDES for item in ("--set", override)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MLFLOW_TRACKING_URI=store, OUT=str(out))

    interrupted = subprocess.Popen(args, env=env | {"HANG_AT": "8"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   preexec_fn=answer_ctrl_c)
    deadline = time.monotonic() + 300
    while not (out / "hanging").exists():
        assert interrupted.poll() is None, interrupted.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the step-8 save never started"
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGINT)
    _, stderr = interrupted.communicate(timeout=120)
    assert interrupted.returncode != 0 and b"KeyboardInterrupt" in stderr, stderr.decode()[-3000:]
    assert tracking.run_status(run_id, store) == "KILLED"
    assert latest_trainer_state(out).name == "step_000004"  # the interrupted step-8 save left nothing valid

    resumed = subprocess.run(args, env=env, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert tracking.run_status(run_id, store) == "RUNNING"  # reopened; its owner ends it

    client = MlflowClient(tracking_uri=store)
    expected_steps = {"train/loss": list(range(1, 9)), "val/loss": [3, 6, 8], "val/ppl": [3, 6, 8]}
    for name in client.get_run(run_id).data.metrics:
        steps = Counter(point.step for point in client.get_metric_history(run_id, name))
        assert set(steps.values()) == {1}, f"{name}: points per step {dict(steps)}"
        if name in expected_steps:
            assert sorted(steps) == expected_steps[name], name


def test_a_block_that_fails_ends_its_runs_failed_and_a_retry_reopens_them(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment("faults", tracking_uri=store)
    parent, finished = (tracking.create_run(experiment, name, tracking_uri=store) for name in ("parent", "done"))
    tracking.end_run(finished, "FINISHED", store)
    handler_before = signal.getsignal(signal.SIGTERM)

    with pytest.raises(OSError):
        with tracking.ended_on_failure([parent, finished], store):
            raise OSError(28, "No space left on device")
    assert tracking.run_status(parent, store) == "FAILED"
    assert tracking.run_status(finished, store) == "FINISHED"  # a finished run is never reopened or failed

    with pytest.raises(interrupts.Terminated):
        with tracking.ended_on_failure([parent], store):
            assert tracking.run_status(parent, store) == "RUNNING"
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
    assert tracking.run_status(parent, store) == "KILLED"
    assert signal.getsignal(signal.SIGTERM) == handler_before

    # A first attempt (no retry, no resume) does not reopen: only its own failure changes the runs.
    with tracking.ended_on_failure([parent], store, reopen=False):
        assert tracking.run_status(parent, store) == "KILLED"
    assert tracking.run_status(parent, store) == "KILLED"


# ----- a full disk -----------------------------------------------------------------------------
@pytest.fixture()
def tiny_disk(tmp_path: Path):
    """A 400 KiB tmpfs: smaller than one checkpoint of the smoke model, so the first save fails."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_fails_each_retry_honestly(smoke_data, tiny_disk, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.create_run(tracking.ensure_experiment("faults", tracking_uri=store), "train/ntp", tracking_uri=store)
    storage = Storage(str(tiny_disk))
    for attempt in range(3):  # the flow's retries: each one continues the same MLflow run and run folder
        with pytest.raises(Exception, match="No space left on device"):
            with tracking.active_run(run_id, store) as tracker, storage.stored_folder("runs/r1/ntp", resumable=True) as out:
                train(ntp_job(), smoke_data, out, tracker=tracker, num_threads=1)
        assert tracking.run_status(run_id, store) == "FAILED", attempt

    assert not list(tiny_disk.rglob(MARKER)) and not storage.exists("runs/r1/ntp")
    assert storage.exists("runs/r1/ntp", resumable=True)
    client = MlflowClient(tracking_uri=store)
    for name in client.get_run(run_id).data.metrics:
        steps = Counter(point.step for point in client.get_metric_history(run_id, name))
        assert set(steps.values()) == {1}, f"{name}: points per step {dict(steps)}"
    assert sorted(point.step for point in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3, 4]


# ----- a zeroed shard --------------------------------------------------------------------------
def test_the_data_command_prepares_a_zeroed_shard_again(smoke_data, tmp_path):
    folder = shutil.copytree(smoke_data, tmp_path / "data")
    original = (folder / "train.bin").read_bytes()
    zero_in_place(folder / "train.bin")
    result = subprocess.run(
        [sys.executable, "-m", "cocomix_core.data", "--settings", "smoke", "--out", str(folder)],
        cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "does not match the sha256 in manifest.json: preparing the data again" in result.stderr
    assert "skipped" not in result.stderr
    assert (folder / "train.bin").read_bytes() == original


def test_digest_cache_sees_a_same_size_overwrite(tmp_path):
    from cocomix_core.plumbing.files import cached_sha256, sha256_file

    path = tmp_path / "shard.bin"
    path.write_bytes(b"tokens" * 1000)
    assert cached_sha256(path) == sha256_file(path)
    zero_in_place(path)  # same size, new mtime
    assert cached_sha256(path) == sha256_file(path) == hashlib.sha256(bytes(6000)).hexdigest()


# ----- temporary folders -----------------------------------------------------------------------
def test_scratch_folders_are_removed_when_the_task_ends(tmp_path):
    from cocomix_core.plumbing.files import scratch_folder

    with pytest.raises(RuntimeError):
        with scratch_folder("report") as folder:
            (folder / "report.md").write_text("half")
            assert folder.name.startswith("cocomix-report-")
            raise RuntimeError("the step failed")
    assert not folder.exists()
    with scratch_folder("checkpoints") as folder:
        (folder / "checkpoints.json").write_text("[]")
    assert not folder.exists()


def test_evaluation_refuses_a_checkpoint_zeroed_after_it_was_published(trained, tmp_path):
    from cocomix_core import stages
    from cocomix_core.training import stage as training_stage

    storage = Storage(str(tmp_path / "storage"))
    run = shutil.copytree(trained, tmp_path / "run")
    checkpoint = training_stage.publish_checkpoints(run, "runs/1/ntp", storage)[-1]
    weights = storage.materialize(checkpoint.key) / "model.safetensors"
    zero_in_place(weights)
    data = stages.PreparedData(key="data/unused", uri="", digest="", source="", splits={}, note="", unigram_ppl=1.0)
    with pytest.raises(Exception, match=re.escape(str(weights.parent))) as refused:  # the storage's or the
        stages.evaluate_checkpoint_job(load_settings("smoke"), storage, data, checkpoint, parallel_tasks=1)
    assert "model.safetensors" in str(refused.value)  # checkpoint's own digest check, whichever sees it first


# ----- the flow: start fails after creating its runs ----------------------------------------------
@pytest.mark.slow
def test_a_start_that_fails_after_creating_its_runs_ends_them_failed(tmp_path):
    """Nothing after `start` would end the parent, branch and evaluation runs it made: it ends them itself."""
    from test_flow import flow_env, run_flow

    env = flow_env(tmp_path, COCOMIX_FAIL_ONCE="start")
    result = run_flow(["run", "--settings", "smoke", "--set", f"compute.storage_root={tmp_path / 'artifacts'}"],
                      env, cwd=tmp_path, timeout=300)
    assert result.returncode != 0 and "COCOMIX_FAIL_ONCE=start" in result.stdout + result.stderr
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("cocomix-flow").experiment_id])
    assert sorted(run.info.run_name.split("/")[0] for run in runs) == sorted(
        ["CocomixFlow", "train", "train", "evaluation"])
    assert {run.info.status for run in runs} == {"FAILED"}, {run.info.run_name: run.info.status for run in runs}
