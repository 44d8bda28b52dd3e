"""Wall time of flow runs, split into steps; the training share; the tokens each branch saw; orchestration overhead.

    python benchmarks/bench_flow.py                      # the default `cpu` run, then `cpu_study`, in a fresh temp folder
    python benchmarks/bench_flow.py --settings smoke     # any presets or YAML files, one run each
    python benchmarks/bench_flow.py --root DIR --run-id ID [ID ...]   # analyse runs that already exist under DIR

Per step: its wall time (first task created -> last task finished), the seconds its tasks
spent in total, and the seconds spent inside library calls (each step records the stages of
cocomix_core.stages it runs in its `library_seconds` artifact: prepare_data, obtain_teacher,
fit_sae, build_labels, train_branch, evaluate_checkpoint, write_report). Everything else a task spends is orchestration:
process start, imports, Metaflow's artifact persistence, MLflow bookkeeping, storage.

Training share: the wall time from the first training task's start to the last one's end (the
steps whose tasks record `train_branch`), over the flow's wall time; and training task-seconds over all
task-seconds. Tokens per branch: the last checkpoint's training tokens of every branch.

Overhead is reported two ways: in task-seconds (all tasks' time minus all library time) and in
wall time (flow wall minus the library time on the critical path, where a foreach step
counts with its slowest task).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cocomix_core.reporting.step_times import (
    TaskTime,
    own_library_seconds,
    step_time_lines,
    step_times,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FLOW = PROJECT_ROOT / "flows" / "cocomix_flow.py"


def run_flow(root: Path, settings: str) -> None:
    """Run the flow with its own MLflow store, datastore and storage root under `root`."""
    overrides = f"compute.storage_root={root / 'artifacts'}"
    started = time.perf_counter()
    subprocess.run([sys.executable, str(FLOW), "run", "--settings", settings, "--set", overrides], cwd=root, check=True,
                   env=os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns.db'}"})
    print(f"{settings}: flow command {time.perf_counter() - started:.1f} s (includes Python and Metaflow start-up)")


def _library(task: Any, step: str) -> dict[str, float]:
    """The library seconds a task recorded in this step (`library_seconds`: {"<step>/<stage>": seconds})."""
    return own_library_seconds(task.data.library_seconds if "library_seconds" in task else {}, step)


def _branch_tokens(tasks: list[Any]) -> dict[str, int]:
    """Training tokens of each branch's last checkpoint, from the tasks that carry `branch` and `checkpoints`."""
    tokens: dict[str, int] = {}
    for task in tasks:
        if "checkpoints" in task and "branch" in task and task.data.checkpoints:
            seen = max(checkpoint.tokens_seen for checkpoint in task.data.checkpoints.values())
            tokens[task.data.branch["name"]] = max(seen, tokens.get(task.data.branch["name"], 0))
    return tokens


def step_table(run: Any) -> None:
    """Print per-step wall, task and library seconds of a run, the training share, each branch's tokens and the
    orchestration overhead."""
    all_tasks = [task for step in run.steps() for task in step.tasks()]
    timed = [TaskTime(task.parent.id, task.created_at, task.finished_at, _library(task, task.parent.id))
             for task in all_tasks]
    steps = step_times(timed)
    task_total = sum(step.task_s for step in steps)
    library_total = sum(step.library_s for step in steps)
    # a foreach step counts with its slowest task on the critical path
    library_critical = sum(max((sum(task.library.values()) for task in timed if task.step == step.step), default=0.0)
                           for step in steps)
    flow_wall = (run.finished_at - run.created_at).total_seconds()

    print(f"\nrun {run.pathspec}: {flow_wall:.1f} s wall")
    print(f"{'step':<18}{'tasks':>6}{'wall s':>9}{'task s':>9}{'library s':>11}{'overhead':>10}")
    for step in steps:
        share = 1 - step.library_s / step.task_s if step.task_s else 0.0
        print(f"{step.step:<18}{step.tasks:>6}{step.wall_s:>9.1f}{step.task_s:>9.1f}{step.library_s:>11.1f}{share:>10.0%}")
    training = [task for task in timed if "train_branch" in task.library]
    if training:
        training_wall = (max(task.finished for task in training) - min(task.started for task in training)).total_seconds()
        training_task_s = sum(task.seconds for task in training)
        print(f"\ntraining: {training_wall:.1f} s wall = {training_wall / flow_wall:.0%} of the run; "
              f"{training_task_s:.1f} task-seconds = {training_task_s / task_total:.0%} of all task-seconds")
    for branch, tokens in sorted(_branch_tokens(all_tasks).items()):
        print(f"  {branch:<24}{tokens:>12,} training tokens")
    print(f"task-seconds: {task_total:.1f}, inside library calls: {library_total:.1f}, "
          f"orchestration: {task_total - library_total:.1f} ({1 - library_total / task_total:.0%})")
    print(f"wall: {flow_wall:.1f} s, library on the critical path: {library_critical:.1f} s, "
          f"orchestration: {flow_wall - library_critical:.1f} s ({1 - library_critical / flow_wall:.0%})")
    print("\n".join(["", *step_time_lines(steps, flow_wall)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["cpu", "cpu_study"],
                        help="presets or YAML files, one run each (default: %(default)s)")
    parser.add_argument("--root", type=Path, help="folder holding the runs (default: a fresh temporary folder)")
    parser.add_argument("--run-id", nargs="+", help="analyse these existing runs under --root instead of running")
    args = parser.parse_args()
    root = (args.root or Path(tempfile.mkdtemp(prefix="bench-flow-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # The Metaflow client reads the datastore location once, when it is imported below.
    os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = str(root)
    os.environ.setdefault("METAFLOW_USER", "cocomix")
    if not args.run_id:
        for settings in args.settings:
            run_flow(root, settings)
    from metaflow import Flow, namespace

    namespace(None)
    flow = Flow("CocomixFlow")
    # the runs just made are the newest ones, newest first
    runs = [flow[run_id] for run_id in args.run_id] if args.run_id else list(flow.runs())[:len(args.settings)][::-1]
    for run in runs:
        step_table(run)


if __name__ == "__main__":
    main()
