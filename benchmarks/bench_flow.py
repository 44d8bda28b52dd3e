"""Wall time of a flow run, split into steps, and the orchestration overhead.

    python benchmarks/bench_flow.py                      # the default `cpu` preset, in a fresh temp folder
    python benchmarks/bench_flow.py --settings smoke     # any preset or YAML file
    python benchmarks/bench_flow.py --root DIR --run-id ID   # analyse a run that already exists under DIR

Per step: its wall time (first task created -> last task finished), the seconds its tasks
spent in total, and the seconds spent inside library calls (each step records the stages of
cocomix_core.stages it runs in its `library_seconds` artifact: prepare_data, obtain_teacher,
fit_sae, build_labels, train_branch, evaluate_checkpoint, write_report). Everything else a task spends is orchestration:
process start, imports, Metaflow's artifact persistence, MLflow bookkeeping, storage.

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

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FLOW = PROJECT_ROOT / "flows" / "cocomix_flow.py"


def run_flow(root: Path, settings: str) -> None:
    """Run the flow with its own MLflow store, datastore and storage root under `root`."""
    overrides = f"compute.storage_root={root / 'artifacts'}"
    started = time.perf_counter()
    subprocess.run([sys.executable, str(FLOW), "run", "--settings", settings, "--set", overrides], cwd=root, check=True,
                   env=os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns.db'}"})
    print(f"flow command: {time.perf_counter() - started:.1f} s (includes Python and Metaflow start-up)")


def step_table(run_id: str | None) -> None:
    """Print per-step wall, task and library seconds of a run, and the orchestration overhead."""
    from metaflow import Flow, namespace

    namespace(None)
    flow = Flow("CocomixFlow")
    run = flow[run_id] if run_id else flow.latest_run
    rows, task_total, library_total, library_critical = [], 0.0, 0.0, 0.0
    steps = sorted(run.steps(), key=lambda step: min(task.created_at for task in step.tasks()))
    for step in steps:
        tasks = list(step.tasks())
        durations = [(task.finished_at - task.created_at).total_seconds() for task in tasks]
        library = [
            sum(seconds for name, seconds in (task.data.library_seconds if "library_seconds" in task else {}).items()
                if name.startswith(f"{step.id}/"))
            for task in tasks
        ]
        wall = (max(task.finished_at for task in tasks) - min(task.created_at for task in tasks)).total_seconds()
        rows.append((step.id, len(tasks), wall, sum(durations), sum(library)))
        task_total += sum(durations)
        library_total += sum(library)
        library_critical += max(library)
    flow_wall = (run.finished_at - run.created_at).total_seconds()

    print(f"\nrun {run.pathspec}: {flow_wall:.1f} s wall")
    print(f"{'step':<18}{'tasks':>6}{'wall s':>9}{'task s':>9}{'library s':>11}{'overhead':>10}")
    for name, count, wall, task_seconds, library in rows:
        share = 1 - library / task_seconds if task_seconds else 0.0
        print(f"{name:<18}{count:>6}{wall:>9.1f}{task_seconds:>9.1f}{library:>11.1f}{share:>10.0%}")
    print(f"\ntask-seconds: {task_total:.1f}, inside library calls: {library_total:.1f}, "
          f"orchestration: {task_total - library_total:.1f} ({1 - library_total / task_total:.0%})")
    print(f"wall: {flow_wall:.1f} s, library on the critical path: {library_critical:.1f} s, "
          f"orchestration: {flow_wall - library_critical:.1f} s ({1 - library_critical / flow_wall:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="cpu", help="preset or YAML file (default: %(default)s)")
    parser.add_argument("--root", type=Path, help="folder holding the run (default: a fresh temporary folder)")
    parser.add_argument("--run-id", help="analyse this existing run under --root instead of running the flow")
    args = parser.parse_args()
    root = (args.root or Path(tempfile.mkdtemp(prefix="bench-flow-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # The Metaflow client reads the datastore location once, when it is imported below.
    os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = str(root)
    os.environ.setdefault("METAFLOW_USER", "cocomix")
    if not args.run_id:
        run_flow(root, args.settings)
    step_table(args.run_id)


if __name__ == "__main__":
    main()
