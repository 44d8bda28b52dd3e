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
"""

from __future__ import annotations

import json
import os
import sys
from typing import Mapping, Sequence

from settings.loader import DEFAULT_PRESET

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


def training_command(
    module_args: Sequence[str],
    *,
    gpus: int,
    nodes: int = 1,
    node_rank: int = 0,
    main_ip: str | None = None,
    main_port: int = DEFAULT_MAIN_PORT,
    mixed_precision: str = "no",
    module: str = "cocomix_core.train",
) -> list[str]:
    """The `accelerate launch` command that runs `python -m <module> <module_args>` on every GPU.

    One process per GPU on each of `nodes` machines; accelerate's DDP spans them all. A
    multi-node launch needs the main node's address (Metaflow's `@parallel` exposes it as
    `current.parallel.main_ip`), and each node passes its own `node_rank`. Mixed precision
    defaults to "no" because the trainer applies the settings' precision itself.
    """
    if gpus < 1:
        raise ValueError(f"accelerate launch needs at least one GPU per node, got gpus={gpus}")
    if nodes < 1 or not 0 <= node_rank < nodes:
        raise ValueError(f"node_rank={node_rank} must lie in [0, nodes={nodes})")
    if nodes > 1 and not main_ip:
        raise ValueError(f"a launch over nodes={nodes} needs the main node's address (main_ip)")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus * nodes)]
    if gpus * nodes > 1:
        command.append("--multi_gpu")
    if nodes > 1:
        command += [
            "--num_machines", str(nodes),
            "--machine_rank", str(node_rank),
            "--main_process_ip", str(main_ip),
            "--main_process_port", str(main_port),
        ]
    command += ["--mixed_precision", mixed_precision, "--dynamo_backend", "no", "-m", module, *module_args]
    return command
