"""FSDP training on CPUs: two processes sharding the model over gloo, launched by the project's `training_command`.

FSDP reduces gradients with a reduce-scatter whose summation order differs from one process's
accumulation, so the runs agree to float32 rounding, not bitwise (DDP's equality is bitwise:
test_gang.py). Tolerance: after 4 AdamW steps the weights differ by ~1e-6 (measured); 1e-5 is
allowed, while the last 2 of those steps alone move the weights by ~9e-4, ninety times more.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port, smoke_trainer_args
from safetensors.torch import load_file

from cocomix_core.concepts.labels import LabelCache
from cocomix_core.model.build import job_for_branch
from cocomix_core.plumbing.launch import training_command
from cocomix_core.training.checkpoints import latest_trainer_state, load_trainer_state
from cocomix_core.training.trainer import final_checkpoint, train
from settings import load_settings, training_branches
from settings.schema import TrainResources

pytestmark = pytest.mark.slow  # each launch costs ~10 s of process and process-group setup

REPO_ROOT = Path(__file__).resolve().parent.parent
SHORT = ["train.steps=4", "train.eval_every=2", "train.checkpoint_every=2", "train.lr=1e-3", "train.warmup_steps=1"]
# Long enough that the run can be stopped between its first checkpoint and its end.
LONG = ["train.steps=48", "train.eval_every=48", "train.checkpoint_every=8", "train.log_every=8"]
FSDP_PAIR = TrainResources(cpu_processes=2, strategy="fsdp")
TOLERANCE = 1e-5


def start_fsdp(arm: str, overrides: list[str], data: Path, out: Path, labels: Path | None, log: Path
               ) -> subprocess.Popen:
    """`accelerate launch` of 2 FSDP trainer processes on this node, in a process group of its own."""
    resources = FSDP_PAIR.model_copy(update={"main_port": free_port()})
    args = smoke_trainer_args(arm, overrides, data, out, labels)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(training_command(args, resources), cwd=REPO_ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def run_fsdp(arm: str, overrides: list[str], data: Path, out: Path, labels: Path | None, log: Path) -> None:
    launcher = start_fsdp(arm, overrides, data, out, labels, log)
    assert launcher.wait(timeout=300) == 0, log.read_text()[-4000:]
    assert f"[{arm}] FSDP: parameters, gradients and optimizer state sharded over 2 processes" in log.read_text()


def accumulated_reference(arm: str, overrides: list[str], data: Path, out: Path, labels: Path | None) -> Path:
    """The same global batches in one process with 2 accumulation steps; its run folder."""
    settings = load_settings("smoke", [*overrides, "train.grad_accum_steps=2"])
    branch = next(b for b in training_branches(settings) if b.name == arm)
    source = LabelCache(labels) if labels is not None else None
    train(job_for_branch(settings, branch), data, out, labels=source, num_threads=1)
    return out


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[name].double() - second[name].double()).abs().max().item() for name in first)


@pytest.mark.parametrize("arm", ["ntp", "cocomix"])
def test_two_fsdp_processes_equal_one_process_with_two_accumulation_steps(arm, smoke_data, smoke_label_cache, tmp_path):
    labels = smoke_label_cache if arm == "cocomix" else None
    run_fsdp(arm, SHORT, smoke_data, tmp_path / "fsdp", labels, tmp_path / "fsdp.log")
    reference = accumulated_reference(arm, SHORT, smoke_data, tmp_path / "accum", labels)

    # The checkpoint is the DDP path's: the same HF files, the same tensor names (tied head stored once).
    sharded_checkpoint, reference_checkpoint = final_checkpoint(tmp_path / "fsdp"), final_checkpoint(reference)
    assert sorted(p.name for p in sharded_checkpoint.iterdir()) == sorted(p.name for p in reference_checkpoint.iterdir())
    weights = load_file(sharded_checkpoint / "model.safetensors")
    reference_weights = load_file(reference_checkpoint / "model.safetensors")
    assert max_difference(weights, reference_weights) < TOLERANCE
    start = load_file(tmp_path / "accum" / "checkpoints" / "step_000002" / "model.safetensors")
    assert max_difference(reference_weights, start) > 50 * TOLERANCE, "the steps barely moved the weights"

    # The trainer state holds the full model and the full AdamW state, numbered as a plain optimizer numbers them.
    state, _ = load_trainer_state(latest_trainer_state(tmp_path / "fsdp"))
    reference_state, _ = load_trainer_state(latest_trainer_state(reference))
    assert max_difference(state["model"], reference_state["model"]) < TOLERANCE
    optimizer, reference_optimizer = state["optimizer"], reference_state["optimizer"]
    assert optimizer["param_groups"] == reference_optimizer["param_groups"]
    assert optimizer["state"].keys() == reference_optimizer["state"].keys()
    for index, moments in reference_optimizer["state"].items():
        assert torch.equal(optimizer["state"][index]["step"], moments["step"])
        for name in ("exp_avg", "exp_avg_sq"):
            scale = moments[name].abs().max().item()
            assert (optimizer["state"][index][name] - moments[name]).abs().max().item() <= 1e-3 * scale  # float32 rounding, relative to the largest moment


def test_an_fsdp_run_stopped_after_a_checkpoint_resumes_to_the_uninterrupted_weights(smoke_data, tmp_path):
    run_fsdp("ntp", LONG, smoke_data, tmp_path / "whole", None, tmp_path / "whole.log")

    out = tmp_path / "stopped"
    launcher = start_fsdp("ntp", LONG, smoke_data, out, None, tmp_path / "first.log")
    deadline = time.monotonic() + 300
    while latest_trainer_state(out) is None:  # trainer states appear whole (written aside, then renamed)
        assert time.monotonic() < deadline and launcher.poll() is None, "no checkpoint came"
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGTERM)  # the launcher and every trainer process it started
    launcher.wait(timeout=60)
    assert not (out / "checkpoints" / "step_000048").exists(), "the run finished before the stop: nothing tested"

    run_fsdp("ntp", LONG, smoke_data, out, None, tmp_path / "resumed.log")
    resumed_log = (tmp_path / "resumed.log").read_text()
    assert "[ntp] step 8:" not in resumed_log and "[ntp] step 48:" in resumed_log, "the second run did not resume"
    whole = load_file(final_checkpoint(tmp_path / "whole") / "model.safetensors")
    resumed = load_file(final_checkpoint(out) / "model.safetensors")
    unequal = [name for name in whole if not torch.equal(whole[name], resumed[name])]
    assert not unequal, f"resumed weights differ from the uninterrupted run: {unequal[:5]}"
