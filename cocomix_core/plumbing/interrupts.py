"""Blocks of work that leave their MLflow runs honest when they fail or are stopped.

Kept apart from `tracking` so that a step whose work never touches MLflow does not pay for
importing it (about two seconds per Metaflow task): MLflow is imported only when runs must be
reopened or ended.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler or an operator stopping the task); raised like KeyboardInterrupt."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def ended_on_failure(run_ids: list[str], tracking_uri: str | None = None, reopen: bool = True) -> Iterator[None]:
    """Keep runs honest about a block of work: reopen them, and end them KILLED or FAILED if the block does not finish.

    On entry (with `reopen`), runs a previous attempt ended FAILED or KILLED are set RUNNING again (a
    retry or a resume continues them). If the block is interrupted (Ctrl-C, or SIGTERM, which this turns
    into `Terminated` while the block runs in the main thread) the runs still RUNNING end KILLED; if it
    raises anything else, FAILED. A block that succeeds leaves them RUNNING: their owner ends them.
    """
    if reopen:
        from cocomix_core.plumbing.tracking import reopen_ended_runs

        reopen_ended_runs(run_ids, tracking_uri)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        yield
    except BaseException as error:
        from cocomix_core.plumbing.tracking import end_running_runs

        end_running_runs(run_ids, "KILLED" if isinstance(error, (KeyboardInterrupt, Terminated)) else "FAILED",
                         tracking_uri)
        raise
    finally:
        if in_main_thread:  # None: the previous handler was not set from Python
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
