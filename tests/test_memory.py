"""Tasks on one machine take turns by declared memory: real processes and a real ledger folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from cocomix_core.plumbing.memory import memory_reserved

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cocomix_core.plumbing.memory import memory_reserved
    ledger, out, hold = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    with memory_reserved(600, ledger, capacity_mb=1000, poll_s=0.05):
        out.write_text(f"{time.time()}")
        time.sleep(hold)
        Path(f"{out}.end").write_text(f"{time.time()}")
""")


def holder(ledger: Path, out: Path, hold_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(ledger), str(out), str(hold_s)])


def wait_for(path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_task_that_does_not_fit_waits_until_the_running_one_ends(tmp_path: Path):
    ledger = tmp_path / "ledger"
    first = holder(ledger, tmp_path / "first", hold_s=1.5)
    wait_for(tmp_path / "first")
    second = holder(ledger, tmp_path / "second", hold_s=0)  # 600 + 600 > 1000: it must wait
    assert first.wait(60) == 0 and second.wait(60) == 0
    first_end = float((tmp_path / "first.end").read_text())
    assert float((tmp_path / "second").read_text()) >= first_end
    assert not list(ledger.glob("*.mb"))  # both reservations were released


def test_tasks_that_fit_together_run_together(tmp_path: Path):
    ledger = tmp_path / "ledger"
    with memory_reserved(300, ledger, capacity_mb=1000):
        child = holder(ledger, tmp_path / "child", hold_s=0)  # 300 + 600 <= 1000: it runs while this one holds
        assert child.wait(30) == 0  # had it waited for this block to end, it would time out here
        assert (tmp_path / "child.end").exists() and [path.name for path in ledger.glob("*.mb")] == [f"{os.getpid()}.mb"]


def test_a_dead_tasks_reservation_is_dropped_and_a_lone_oversized_task_still_runs(tmp_path: Path):
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ledger / f"{dead.pid}.mb").write_text("900")  # a task killed before it could release its memory
    waits = []
    with memory_reserved(5000, ledger, capacity_mb=1000, on_wait=lambda held, capacity: waits.append(held)):
        assert [(path.name, path.read_text()) for path in ledger.glob("*.mb")] == [(f"{os.getpid()}.mb", "5000")]
    assert waits == []


def test_a_waiting_task_says_how_much_the_others_hold(tmp_path: Path):
    ledger = tmp_path / "ledger"
    running = holder(ledger, tmp_path / "running", hold_s=1.0)
    wait_for(tmp_path / "running")
    waits = []
    with memory_reserved(700, ledger, capacity_mb=1000, poll_s=0.05,
                         on_wait=lambda held, capacity: waits.append((held, capacity))):
        assert (tmp_path / "running.end").exists()
    assert running.wait(60) == 0
    assert waits == [(600, 1000)]  # said once, with the holder's 600 MB
