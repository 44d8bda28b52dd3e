"""Exact resume: a run killed with SIGKILL (mid-run, or mid-save) and restarted matches an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cocomix_core.model.build import job_for_branch
from cocomix_core.plumbing.files import is_partial
from cocomix_core.training.checkpoints import CheckpointError, latest_trainer_state
from cocomix_core.training.trainer import final_checkpoint, list_checkpoints, train
from settings import load_settings, training_branches

REPO_ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["train.steps=8", "train.log_every=1", "train.eval_every=3", "train.checkpoint_every=4"]
WALL_CLOCK_METRICS = {"train/tokens_per_s", "train/mfu"}

# Runs one training job in a fresh process. Modes:
#   run    plain run
#   slow   sleeps after each logged step, so the test can kill it between checkpoints
#   hang   blocks forever inside the save of the step-8 (final) checkpoint, so it can be killed mid-save
DRIVER = """
import sys, time
from pathlib import Path
from typing import Callable
import cocomix_core.training.checkpoints as checkpoints
from cocomix_core.model.build import job_for_branch
from cocomix_core.plumbing.tracking import JsonlTracker
from cocomix_core.training.trainer import train
from settings import load_settings, training_branches

data_dir, out_dir, metrics_path, mode, *overrides = sys.argv[1:]
settings = load_settings("smoke", overrides)
job = job_for_branch(settings, next(b for b in training_branches(settings) if b.name == "ntp"))

class SlowTracker(JsonlTracker):
    def log_metrics(self, metrics, step):
        super().log_metrics(metrics, step)
        time.sleep(0.3)

def hanging_tokenizer_save(directory, original=checkpoints.save_hf_tokenizer):
    original(directory)
    if "step_000008" in str(directory):
        (Path(out_dir) / "hanging").touch()
        time.sleep(3600)

if mode == "hang":
    checkpoints.save_hf_tokenizer = hanging_tokenizer_save
tracker = SlowTracker(metrics_path) if mode == "slow" else JsonlTracker(metrics_path)
train(job, data_dir, out_dir, tracker=tracker, num_threads=1)
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER)
    return path


def start(driver: Path, data: Path, out: Path, mode: str) -> subprocess.Popen:
    command = [sys.executable, str(driver), str(data), str(out), str(out / "metrics.jsonl"), mode, *OVERRIDES]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr.decode()[-3000:]


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> None:
    """SIGKILL the process as soon as `ready()` holds; fail if it ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"run ended too early: {process.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, f"not ready within {timeout}s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def logged_values(out: Path) -> dict[tuple[int, str], list[float]]:
    """(step, metric) -> every value logged for it, in order; wall-clock metrics left out."""
    values = defaultdict(list)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name, value in record["metrics"].items():
            if name not in WALL_CLOCK_METRICS:
                values[(record["step"], name)].append(value)
    return values


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(final_checkpoint(out) / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(driver: Path, smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    finish(start(driver, smoke_data, out, "run"))
    return out


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Bitwise-equal final weights; every metric logged exactly once per step, with the reference's value."""
    expected, got = final_weights(reference), final_weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    reference_values, resumed_values = logged_values(reference), logged_values(resumed)
    assert reference_values.keys() == resumed_values.keys()
    for key, values in resumed_values.items():
        assert values == reference_values[key] and len(values) == 1, key


def test_sigkill_mid_run_then_restart_matches_an_uninterrupted_run(driver, smoke_data, uninterrupted, tmp_path):
    killed = start(driver, smoke_data, tmp_path, "slow")
    # Killed after the step-4 trainer state and after steps 5-6 were logged, before the step-8 save.
    kill_when(killed, lambda: latest_trainer_state(tmp_path) is not None and (6, "train/loss") in logged_values(tmp_path))
    assert latest_trainer_state(tmp_path).name == "step_000004"

    finish(start(driver, smoke_data, tmp_path, "run"))
    assert_same_run(tmp_path, uninterrupted)
    # Steps 5-6 were logged before the kill and trained again after it: the restart skipped logging them.
    assert len(logged_values(tmp_path)[(6, "train/loss")]) == 1


def test_sigkill_while_saving_keeps_the_previous_checkpoint(driver, smoke_data, uninterrupted, tmp_path):
    hanging = start(driver, smoke_data, tmp_path, "hang")
    kill_when(hanging, (tmp_path / "hanging").exists)

    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004"]
    leftovers = [p for p in (tmp_path / "checkpoints").iterdir() if is_partial(p)]
    assert leftovers and not any((p / "checkpoint.json").exists() for p in leftovers)
    assert latest_trainer_state(tmp_path).name == "step_000004"
    AutoModelForCausalLM.from_pretrained(list_checkpoints(tmp_path)[-1])

    finish(start(driver, smoke_data, tmp_path, "run"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000008"]
    assert not any(is_partial(p) for p in (tmp_path / "checkpoints").iterdir())
    assert_same_run(tmp_path, uninterrupted)


def test_resume_refuses_trainer_state_of_another_job(smoke_data, uninterrupted):
    settings = load_settings("smoke", OVERRIDES + ["train.lr=1e-3"])
    job = job_for_branch(settings, next(b for b in training_branches(settings) if b.name == "ntp"))
    with pytest.raises(CheckpointError, match="different job"):
        train(job, smoke_data, uninterrupted, num_threads=1)


def test_calling_train_again_after_the_end_trains_nothing(smoke_data, uninterrupted):
    settings = load_settings("smoke", OVERRIDES)
    job = job_for_branch(settings, next(b for b in training_branches(settings) if b.name == "ntp"))
    before = final_weights(uninterrupted)
    result = train(job, smoke_data, uninterrupted, num_threads=1)
    assert result.resumed_from_step == 8 and result.final_step == 8
    assert all(torch.equal(before[name], final_weights(uninterrupted)[name]) for name in before)
