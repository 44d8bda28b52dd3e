"""How the flow launches work: which settings a process was started with, threads, launch commands.

Nothing here imports Metaflow, so the same rules hold in a notebook, a test or a flow step.

Settings at import time. Metaflow evaluates step decorators (`@resources`, `@retry`) when
the flow file is imported, before any Parameter has a value, and each step runs in a new
process whose command line carries no Parameters. So the flow reads its `--settings` and
`--set` values from the command line itself (`settings_source`) and exports them in
`SETTINGS_ENV` / `OVERRIDES_ENV`; child step processes inherit them and compute the same
decorator values. Commands without those options (`resume`, `argo-workflows create`) read
the variables, so `COCOMIX_SETTINGS=gpt2_69m python flows/cocomix_flow.py --with kubernetes
argo-workflows create` deploys with that preset's resources.

`--set` syntax. Metaflow Parameters cannot repeat, so one string carries every override:
either a JSON list (`'["train.lr=3e-4", "train.steps=100"]'`) or `;`-separated items
(`'train.lr=3e-4; train.steps=100'`). Commas are not separators because YAML values
contain them (`eval.tasks=[a, b]`).

Gangs. With compute.train.nodes = N > 1 a training branch runs on N nodes (a Metaflow
`@parallel` step); every node runs `training_command(..., node_rank=i, main_ip=...)`, and
accelerate's launcher (torchrun underneath, static rendezvous at the main node) joins the
processes of all nodes into one DDP or FSDP process group. The trainer's global rank 0 alone
logs and writes checkpoints; every node must see the same run folder when it starts, so that
a retried gang resumes all of its processes from the same trainer state.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Mapping, Sequence

from settings.loader import DEFAULT_PRESET
from settings.schema import ExperimentSettings, TrainResources

SETTINGS_ENV = "COCOMIX_SETTINGS"
OVERRIDES_ENV = "COCOMIX_SET"
DEFAULT_MAIN_PORT = 29500


def parse_overrides(text: str | None) -> list[str]:
    """The dotted overrides in one `--set` string: a JSON list, or items separated by `;` or newlines."""
    text = (text or "").strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--set {text!r} starts with '[' but is not a JSON list of strings: {error}") from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError(f"--set {text!r}: expected a JSON list of 'dotted.key=value' strings")
        return [item.strip() for item in items if item.strip()]
    return [item.strip() for item in text.replace("\n", ";").split(";") if item.strip()]


def _option_value(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in argv (the last one wins, as with click)."""
    value = None
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value


def settings_source(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """(preset name or YAML path, `--set` string) a flow process was started with.

    The command line wins over `SETTINGS_ENV` / `OVERRIDES_ENV`, which win over the default preset.
    """
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    source = _option_value(argv, "--settings") or environ.get(SETTINGS_ENV) or DEFAULT_PRESET
    overrides = _option_value(argv, "--set")
    return source, overrides if overrides is not None else environ.get(OVERRIDES_ENV, "")


def cpu_threads(
    parallel_tasks: int, *, configured: int | None = None, reserved: int | None = None, cpu_count: int | None = None
) -> int:
    """Torch threads for one of `parallel_tasks` processes sharing this machine's cores.

    `configured` (the settings' explicit choice) wins. Otherwise the cores are split between
    the tasks, never shared: oversubscribing hurts badly on small machines (two 2-thread
    trainers on 2 cores run about 2x slower each than two 1-thread ones). `reserved` (the
    step's @resources CPUs) caps the share, because on a cluster node `os.cpu_count()` counts
    the whole node, not the task's reservation.
    """
    if configured is not None:
        return configured
    share = max(1, (cpu_count or os.cpu_count() or 1) // max(1, parallel_tasks))
    return min(share, reserved) if reserved else share


# The trainer's module holds the model's blocks in this class (GPT-2 and CoCoMix alike): FSDP wraps each one.
FSDP_WRAPPED_BLOCK = "GPT2Block"


def training_command(
    module_args: Sequence[str],
    resources: TrainResources,
    *,
    node_rank: int = 0,
    main_ip: str | None = None,
    module: str = "cocomix_core.training.trainer",
) -> list[str]:
    """The `accelerate launch` command one node of a training gang runs: `python -m <module> <module_args>` per process.

    `resources.processes_per_node` processes on each of `resources.nodes` nodes (one per GPU,
    or `cpu_processes` on CPU nodes, where the trainer picks gloo); accelerate's launcher
    (torchrun underneath) joins them into one process group. A gang needs the main node's
    address (Metaflow's `current.parallel.main_ip`) and each node its own `node_rank`
    (`current.parallel.node_index`). strategy=fsdp adds accelerate's FSDP options.
    Mixed precision stays "no": the trainer autocasts to the settings' precision itself, and
    FSDP then keeps fp32 parameter shards and optimizer state (bf16 compute, fp32 master weights).
    """
    nodes, per_node = resources.nodes, resources.processes_per_node
    if not 0 <= node_rank < nodes:
        raise ValueError(f"node_rank={node_rank} must lie in [0, compute.train.nodes={nodes})")
    if nodes > 1 and not main_ip:
        raise ValueError(f"a gang of compute.train.nodes={nodes} needs the main node's address (main_ip)")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(per_node * nodes)]
    if resources.strategy == "fsdp":
        command += fsdp_arguments(resources)  # instead of --multi_gpu: accelerate allows one of the two
    elif per_node * nodes > 1:
        command.append("--multi_gpu")  # accelerate's name for torchrun's launcher; on CPU-only nodes it runs gloo
    if nodes > 1:
        command += [
            "--num_machines", str(nodes),
            "--machine_rank", str(node_rank),
            "--main_process_ip", str(main_ip),
            "--main_process_port", str(resources.main_port),
        ]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", module, *module_args]
    return command


def fsdp_arguments(resources: TrainResources) -> list[str]:
    """accelerate launch options for FSDP: the settings' sharding, one FSDP unit per transformer block.

    The full (unsharded) state dict is what checkpoints hold, so a checkpoint loads anywhere;
    use_orig_params keeps the parameters' names for the optimizer and the gradient norm.
    No sync_module_states nor cpu_ram_efficient_loading (rank 0 loads, the others receive):
    every process builds the same seeded model or loads the same trainer state, so there is
    nothing to broadcast, and accelerate refuses sync_module_states on CPU-only nodes.
    """
    return [
        "--use_fsdp",
        "--fsdp_version", "1",
        "--fsdp_sharding_strategy", resources.fsdp_sharding,
        "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap", FSDP_WRAPPED_BLOCK,
        "--fsdp_state_dict_type", "FULL_STATE_DICT",
        "--fsdp_use_orig_params", "true",
        "--fsdp_sync_module_states", "false",
        "--fsdp_cpu_ram_efficient_loading", "false",
        "--fsdp_offload_params", "false",
        "--fsdp_backward_prefetch", "BACKWARD_PRE",
    ]


def threads_for(settings: ExperimentSettings, kind: str, parallel_tasks: int) -> int:
    """Torch threads for one of `parallel_tasks` tasks of one kind of step sharing this machine."""
    return cpu_threads(parallel_tasks, configured=settings.train.cpu_threads,
                       reserved=getattr(settings.compute, kind).cpus)
