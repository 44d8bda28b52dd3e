"""Does the link a run prints show every branch on one chart in the MLflow UI? A screenshot from a real browser.

    python benchmarks/mlflow_ui_check.py --store sqlite:////tmp/.../mlruns.db --out ui.png [--experiment cocomix-flow]

Starts `mlflow ui` on the store (a free local port), takes the newest flow run of the experiment, opens the
chart link `end` prints (cocomix_core/reporting/end_of_run.py: `branch_chart_url`) in headless Chromium
(Debian package `chromium`) and saves a screenshot; a second one of the run's LoggedModels (the Models tab)
goes beside it. Look at the PNGs: the charts should show `by_tokens/eval/val_ppl` with one line per branch.
Not a test: it needs Chromium, and what it checks is a picture.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from cocomix_core.reporting import end_of_run

UI_START_S = 180  # the UI imports its whole server stack: minutes on a loaded machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ui(store: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow ui` on the store, in its own process group; returns once it answers /health."""
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
                           "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                          env=os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"}, start_new_session=True)
    deadline = time.monotonic() + UI_START_S
    while time.monotonic() < deadline and ui.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return ui
        except OSError:
            time.sleep(0.5)
    os.killpg(ui.pid, signal.SIGKILL)
    raise RuntimeError(f"mlflow ui did not start: {log.read_text()[-2000:]}")


def screenshot(url: str, out: Path, budget_ms: int) -> None:
    """Chromium's own headless screenshot of `url` after `budget_ms` of virtual time (the UI's fetches settle)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("mlflow_ui_check: no chromium on PATH (apt-get install -y chromium)")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={out}", "--window-size=1600,1400", f"--virtual-time-budget={budget_ms}", url],
                   check=True, capture_output=True, timeout=300)


def newest_links(client: MlflowClient, experiment_name: str, base: str) -> end_of_run.RunLinks:
    """The printed links of the experiment's newest flow run, pointed at this UI."""
    experiment = client.get_experiment_by_name(experiment_name)
    parents = client.search_runs([experiment.experiment_id], "attributes.run_name LIKE 'CocomixFlow/%'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        sys.exit(f"mlflow_ui_check: no flow run in experiment {experiment_name!r}")
    return end_of_run.RunLinks(base, experiment.experiment_id, parents[0].info.run_id, {}, "flows/cocomix_flow.py",
                               "1/report")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="the flow run's tracking URI (sqlite:///...)")
    parser.add_argument("--experiment", default="cocomix-flow")
    parser.add_argument("--out", type=Path, default=Path("mlflow_ui.png"))
    parser.add_argument("--budget-ms", type=int, default=60000, help="virtual time the page gets to render")
    args = parser.parse_args()
    port = free_port()
    ui = start_ui(args.store, port, args.out.with_suffix(".log"))
    try:
        base = f"http://127.0.0.1:{port}"
        links = newest_links(MlflowClient(args.store), args.experiment, base)
        chart = end_of_run.branch_chart_url(links)
        started = time.perf_counter()
        screenshot(chart, args.out, args.budget_ms)
        print(f"{chart}\n  -> {args.out} ({time.perf_counter() - started:.1f} s)")
        models = f"{base}/#/experiments/{links.experiment_id}/models?workflowType=machine_learning"
        screenshot(models, args.out.with_name(f"{args.out.stem}_models.png"), args.budget_ms)
        print(f"{models}\n  -> {args.out.with_name(f'{args.out.stem}_models.png')}")
    finally:
        os.killpg(ui.pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
