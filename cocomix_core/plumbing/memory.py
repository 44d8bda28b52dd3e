"""Tasks that share one machine take turns by the memory they declare, so parallel branches never run it out.

Metaflow's local runtime starts up to `--max-workers` tasks at once (16 by default) whatever they
need: twelve `cpu_study` branches of ~3 GB each on a 24 GiB machine end with the kernel killing a
trainer. On a cluster the scheduler admits pods by `@resources(memory=...)`; here each heavy task
does the same for itself. It writes its declared megabytes to a ledger folder shared by the
machine's tasks and waits while the live reservations and its own would exceed the machine's
memory. One task is always admitted, so a declaration larger than the machine still runs (alone).
Reservations of processes that died are dropped, so a killed task never blocks the others. The nodes of
a gang do not take turns: each must start for the gang to meet at its rendezvous.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Callable, Iterator

# One per machine and user (another user's folder would not be writable), at a fixed place rather than under
# $TMPDIR: runs with private temp folders share the machine's memory all the same.
DEFAULT_LEDGER = Path("/tmp") / f"cocomix-memory-ledger-{os.getuid()}"


def machine_memory_mb() -> int:
    """This machine's physical memory in MB (MiB)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _live_reservations(ledger: Path) -> dict[int, int]:
    """{pid: megabytes} of the ledger's reservations whose process is alive; dead ones are removed."""
    live = {}
    for entry in ledger.glob("*.mb"):
        pid = int(entry.stem)
        if not _alive(pid):
            entry.unlink(missing_ok=True)
            continue
        with contextlib.suppress(FileNotFoundError):  # its task just ended
            live[pid] = int(entry.read_text() or 0)
    return live


def _try_reserve(ledger: Path, memory_mb: int, capacity_mb: int) -> bool:
    """Record this process's reservation if it fits beside the live ones (or none is live); under the ledger's lock."""
    with open(ledger / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held = _live_reservations(ledger)
        held.pop(os.getpid(), None)
        if held and sum(held.values()) + memory_mb > capacity_mb:
            return False
        (ledger / f"{os.getpid()}.mb").write_text(str(memory_mb))
        return True


@contextlib.contextmanager
def memory_reserved(memory_mb: int, ledger: Path = DEFAULT_LEDGER, capacity_mb: int | None = None,
                    poll_s: float = 2.0, on_wait: Callable[[int, int], None] | None = None) -> Iterator[None]:
    """Hold `memory_mb` of this machine's memory (its physical memory, or `capacity_mb`) for the block's duration.

    Waits, polling every `poll_s` seconds, while other live reservations leave too little; calls
    `on_wait(held_mb, capacity_mb)` once when it has to wait, so the task can say why it is idle.
    """
    capacity_mb = capacity_mb or machine_memory_mb()
    ledger.mkdir(parents=True, exist_ok=True)
    waited = False
    while not _try_reserve(ledger, memory_mb, capacity_mb):
        if not waited and on_wait is not None:
            on_wait(sum(_live_reservations(ledger).values()), capacity_mb)
        waited = True
        time.sleep(poll_s)
    try:
        yield
    finally:
        (ledger / f"{os.getpid()}.mb").unlink(missing_ok=True)
