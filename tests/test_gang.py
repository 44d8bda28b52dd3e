"""Multi-node training gangs on one machine: two local "nodes" of one process each, joined over gloo.

Each node runs `training_command`'s real `accelerate launch` (torchrun underneath) with its own
node rank and the main node at 127.0.0.1, as the nodes of a Metaflow @parallel gang do.
"""

from __future__ import annotations

import contextlib
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
from cocomix_core.training.checkpoints import latest_trainer_state
from cocomix_core.training.trainer import final_checkpoint, train
from settings import load_settings, training_branches
from settings.schema import TrainResources

pytestmark = pytest.mark.slow  # each gang start costs ~10 s of process and rendezvous setup

REPO_ROOT = Path(__file__).resolve().parent.parent
# Long enough that a node can be killed between the first checkpoint and the end.
LONG = ["train.steps=64", "train.eval_every=64", "train.checkpoint_every=8", "train.log_every=8"]
GANG = TrainResources(nodes=2, cpu_processes=1)


def start_gang(arm: str, overrides: list[str], data: Path, out: Path, labels: Path | None, logs: Path
               ) -> list[subprocess.Popen]:
    """Both nodes of a 2-node gang, each in its own process group (so one node can be killed whole)."""
    resources = GANG.model_copy(update={"main_port": free_port()})
    args = smoke_trainer_args(arm, overrides, data, out, labels)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    logs.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(training_command(args, resources, node_rank=rank, main_ip="127.0.0.1"), cwd=REPO_ROOT,
                         env=env, stdout=(logs / f"node{rank}.log").open("w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
        for rank in range(GANG.nodes)
    ]


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from /proc): one node's launcher and the trainers it started.

    torchrun starts each trainer in a session of its own, so a process group does not hold them all.
    """
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        tree.append(pid)
        frontier += children.get(pid, [])
    return tree


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node's launcher and every process under it, as when the machine dies."""
    for pid in process_tree(node.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_all(nodes: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    """Exit codes of the nodes (negative: killed by that signal)."""
    return [node.wait(timeout=timeout) for node in nodes]


def accumulated_reference(arm: str, overrides: list[str], data: Path, out: Path, labels: Path | None) -> Path:
    """The same global batches in one process with 2 accumulation steps; its final model file."""
    settings = load_settings("smoke", [*overrides, "train.grad_accum_steps=2"])
    branch = next(b for b in training_branches(settings) if b.name == arm)
    source = LabelCache(labels) if labels is not None else None
    train(job_for_branch(settings, branch), data, out, labels=source, num_threads=1)
    return final_checkpoint(out) / "model.safetensors"


def assert_bitwise_equal(first: Path, second: Path) -> None:
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys()
    unequal = [name for name in a if not torch.equal(a[name], b[name])]
    assert not unequal, f"tensors differ: {unequal[:5]}"


def node_log(logs: Path, rank: int) -> str:
    return (logs / f"node{rank}.log").read_text()


def test_a_killed_gang_node_is_relaunched_and_continues_from_the_checkpoint(smoke_data, tmp_path):
    out, logs = tmp_path / "gang", tmp_path / "logs"
    nodes = start_gang("ntp", LONG, smoke_data, out, None, logs / "first")
    deadline = time.monotonic() + 300
    while latest_trainer_state(out) is None:  # trainer states appear whole (written aside, then renamed)
        assert time.monotonic() < deadline and all(node.poll() is None for node in nodes), "no checkpoint came"
        time.sleep(0.05)
    kill_node(nodes[1])  # node 1 dies mid-training, trainer and launcher alike
    try:
        codes = wait_all(nodes, timeout=120)
    finally:
        for node in nodes:  # a node that hangs must not outlive the test
            if node.poll() is None:
                kill_node(node)
    assert codes[1] == -signal.SIGKILL
    assert codes[0] != 0, "node 0 must fail when its peer dies (it cannot finish the collective ops)"
    assert not (out / "checkpoints" / "step_000064").exists(), "the gang finished before the kill: nothing tested"

    nodes = start_gang("ntp", LONG, smoke_data, out, None, logs / "retry")
    assert wait_all(nodes) == [0, 0], node_log(logs / "retry", 0)[-3000:]
    retried = node_log(logs / "retry", 0)
    assert "[ntp] step 8:" not in retried and "[ntp] step 64:" in retried, "the retry did not resume"
    assert "step 64:" not in node_log(logs / "retry", 1)  # global rank 0 (node 0) alone logs and saves

    # The relaunched gang ends with the weights of one process taking the same global batches in 2 accumulation
    # steps, bit for bit (the CoCoMix arm started whole: the flow's gang test, tests/test_flow_gang.py).
    reference = accumulated_reference("ntp", LONG, smoke_data, tmp_path / "accum", None)
    assert_bitwise_equal(final_checkpoint(out) / "model.safetensors", reference)
