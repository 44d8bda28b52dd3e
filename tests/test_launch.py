"""cocomix_core.plumbing.launch: the settings a flow process starts with, thread splitting, accelerate commands."""

from __future__ import annotations

import sys

import pytest

from cocomix_core.model.build import job_for_branch
from cocomix_core.plumbing.launch import (
    OVERRIDES_ENV,
    SETTINGS_ENV,
    cpu_threads,
    parse_overrides,
    settings_source,
    training_command,
)
from settings import load_settings, training_branches
from settings.schema import TrainResources

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


def resources(**fields) -> TrainResources:
    return TrainResources(**fields)


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_one_gpu_runs_one_process_without_ddp():
    command = training_command(TRAIN_ARGS, resources(gpus=1))
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert option(command, "--num_processes") == "1"
    assert "--multi_gpu" not in command and "--num_machines" not in command and "--use_fsdp" not in command
    assert command[-len(TRAIN_ARGS) - 2 :] == ["-m", "cocomix_core.training.trainer", *TRAIN_ARGS]


@pytest.mark.parametrize("gpus", [4, 8])
def test_several_gpus_run_one_ddp_process_each(gpus):
    command = training_command(TRAIN_ARGS, resources(gpus=gpus, cpu_processes=3))
    assert option(command, "--num_processes") == str(gpus)  # cpu_processes counts only on CPU nodes
    assert "--multi_gpu" in command
    # The trainer applies the settings' precision itself; accelerate must not add a second autocast.
    assert option(command, "--mixed_precision") == "no"


def test_cpu_nodes_run_cpu_processes_each():
    command = training_command(TRAIN_ARGS, resources(gpus=0, cpu_processes=2, nodes=2), node_rank=1, main_ip="h")
    assert option(command, "--num_processes") == "4" and option(command, "--num_machines") == "2"
    assert "--multi_gpu" in command


def test_gang_node_counts_every_process_and_names_the_main_node():
    command = training_command(TRAIN_ARGS, resources(gpus=8, nodes=4, main_port=1234), node_rank=2, main_ip="10.0.0.1")
    value = {flag: option(command, flag) for flag in
             ("--num_processes", "--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port")}
    assert value == {"--num_processes": "32", "--num_machines": "4", "--machine_rank": "2",
                     "--main_process_ip": "10.0.0.1", "--main_process_port": "1234"}


def test_fsdp_shards_each_transformer_block_and_saves_full_state():
    command = training_command(TRAIN_ARGS, resources(gpus=8, nodes=2, strategy="fsdp"), node_rank=0, main_ip="h")
    assert "--use_fsdp" in command and "--multi_gpu" not in command  # accelerate refuses both
    assert option(command, "--fsdp_sharding_strategy") == "FULL_SHARD"
    assert option(command, "--fsdp_auto_wrap_policy") == "TRANSFORMER_BASED_WRAP"
    # The class name must be the block class the models really hold, or FSDP wraps nothing but the root.
    block_classes = {type(block).__name__ for kind in ("ntp", "cocomix")
                     for block in branch_model(kind).transformer.h}
    assert block_classes == {option(command, "--fsdp_transformer_layer_cls_to_wrap")}
    assert option(command, "--fsdp_state_dict_type") == "FULL_STATE_DICT"
    hybrid = training_command(TRAIN_ARGS, resources(gpus=8, strategy="fsdp", fsdp_sharding="HYBRID_SHARD"))
    assert option(hybrid, "--fsdp_sharding_strategy") == "HYBRID_SHARD"


def test_accelerate_parses_the_fsdp_options_into_its_fsdp_plugin_environment():
    """accelerate's own parser and environment builder accept every option (a typo would fail the launch)."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
        prepare_multi_gpu_env,
    )

    command = training_command(TRAIN_ARGS, resources(gpus=2, strategy="fsdp"))
    args = launch_command_parser().parse_args(command[command.index("--num_processes"):])
    args, *_ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "GPT2Block"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["FSDP_USE_ORIG_PARAMS"] == "true"


def branch_model(kind: str):
    settings = load_settings("smoke")
    return job_for_branch(settings, next(b for b in training_branches(settings) if b.kind == kind)).build_model()


@pytest.mark.parametrize(
    ("fields", "node_rank", "main_ip", "message"),
    [({"gpus": 8, "nodes": 2}, 0, None, "main_ip"), ({"gpus": 8, "nodes": 2}, 2, "h", "node_rank")],
)
def test_impossible_launches_are_refused(fields, node_rank, main_ip, message):
    with pytest.raises(ValueError, match=message):
        training_command(TRAIN_ARGS, resources(**fields), node_rank=node_rank, main_ip=main_ip)


def test_fsdp_over_one_process_is_refused_by_the_settings():
    with pytest.raises(ValueError, match="strategy=fsdp"):
        resources(gpus=1, strategy="fsdp")


def test_the_fsdp_environment_builds_accelerates_plugin_on_cpu_only_nodes(monkeypatch):
    """sync_module_states (or cpu_ram_efficient_loading, which forces it) makes accelerate's plugin demand a GPU."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
        prepare_multi_gpu_env,
    )
    from accelerate.utils import FullyShardedDataParallelPlugin

    command = training_command(TRAIN_ARGS, resources(cpu_processes=2, strategy="fsdp"))
    args, *_ = _validate_launch_command(launch_command_parser().parse_args(command[command.index("--num_processes"):]))
    for name, value in prepare_multi_gpu_env(args).items():
        if name.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()  # what the trainer's shard_model reads
    assert plugin.fsdp_version == 1 and plugin.sharding_strategy.name == "FULL_SHARD"
    assert not plugin.sync_module_states and not plugin.cpu_ram_efficient_loading
    assert plugin.use_orig_params and plugin.mixed_precision_policy is None  # fp32 shards; the trainer autocasts


def test_the_1b_preset_trains_with_fsdp_full_shard_in_bf16():
    settings = load_settings("gpt2_1b")
    command = training_command(TRAIN_ARGS, settings.compute.train)
    assert "--use_fsdp" in command and option(command, "--fsdp_sharding_strategy") == "FULL_SHARD"
    assert option(command, "--num_processes") == "8"
    assert option(command, "--mixed_precision") == "no" and settings.train.precision == "bf16"
