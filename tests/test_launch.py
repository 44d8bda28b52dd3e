"""cocomix_core.launch: the settings a flow process starts with, thread splitting, accelerate commands."""

from __future__ import annotations

import sys

import pytest

from cocomix_core.launch import (
    OVERRIDES_ENV,
    SETTINGS_ENV,
    cpu_threads,
    parse_overrides,
    settings_source,
    training_command,
)

TRAIN_ARGS = ["--settings", "/tmp/s.yaml", "--arm", "cocomix", "--data", "/d", "--out", "/o"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        (None, []),
        ("train.lr=3e-4", ["train.lr=3e-4"]),
        ("train.lr=3e-4; train.steps=10;", ["train.lr=3e-4", "train.steps=10"]),
        ("eval.tasks=[a, b]\ntrain.steps=10", ["eval.tasks=[a, b]", "train.steps=10"]),
        ('["eval.tasks=[a, b]", "train.steps=10"]', ["eval.tasks=[a, b]", "train.steps=10"]),
    ],
)
def test_overrides_split_on_semicolons_or_come_as_a_json_list(text, expected):
    assert parse_overrides(text) == expected


@pytest.mark.parametrize("text", ["[not json", "[1, 2]", '[{"a": 1}]'])
def test_a_bad_json_list_of_overrides_is_an_error(text):
    with pytest.raises(ValueError, match="--set"):
        parse_overrides(text)


def test_settings_come_from_the_command_line_before_the_environment():
    environ = {SETTINGS_ENV: "cpu", OVERRIDES_ENV: "train.steps=5"}
    argv = ["flow.py", "run", "--settings", "smoke", "--set=train.lr=1e-3"]
    assert settings_source(argv, environ) == ("smoke", "train.lr=1e-3")
    assert settings_source(["flow.py", "resume"], environ) == ("cpu", "train.steps=5")
    assert settings_source(["flow.py", "run"], {}) == ("cpu", "")


def test_threads_split_the_cores_between_parallel_tasks():
    assert cpu_threads(2, cpu_count=2) == 1
    assert cpu_threads(3, cpu_count=2) == 1  # never zero
    assert cpu_threads(1, cpu_count=16) == 16
    assert cpu_threads(2, cpu_count=96, reserved=32) == 32  # a pod sees the node's cores
    assert cpu_threads(2, cpu_count=2, configured=4) == 4


def test_one_gpu_runs_one_process_without_ddp():
    command = training_command(TRAIN_ARGS, gpus=1)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "1"
    assert "--multi_gpu" not in command and "--num_machines" not in command
    assert command[-len(TRAIN_ARGS) - 2 :] == ["-m", "cocomix_core.train", *TRAIN_ARGS]


@pytest.mark.parametrize("gpus", [4, 8])
def test_several_gpus_run_one_ddp_process_each(gpus):
    command = training_command(TRAIN_ARGS, gpus=gpus)
    assert command[command.index("--num_processes") + 1] == str(gpus)
    assert "--multi_gpu" in command
    # The trainer applies the settings' precision itself; accelerate must not add a second autocast.
    assert command[command.index("--mixed_precision") + 1] == "no"


def test_multi_node_launch_counts_every_process_and_names_the_main_node():
    command = training_command(TRAIN_ARGS, gpus=8, nodes=4, node_rank=2, main_ip="10.0.0.1", main_port=1234)
    value = {flag: command[command.index(flag) + 1] for flag in
             ("--num_processes", "--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port")}
    assert value == {"--num_processes": "32", "--num_machines": "4", "--machine_rank": "2",
                     "--main_process_ip": "10.0.0.1", "--main_process_port": "1234"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"gpus": 0}, "at least one GPU"), ({"gpus": 8, "nodes": 2}, "main_ip"),
     ({"gpus": 8, "nodes": 2, "node_rank": 2, "main_ip": "h"}, "node_rank")],
)
def test_impossible_launches_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        training_command(TRAIN_ARGS, **kwargs)
