"""Blocks of work that settle their bookkeeping when they fail or are stopped.

Kept apart from `tracking`, and free of MLflow, so that a step whose work never touches MLflow does
not pay for importing it (about two seconds per Metaflow task): the caller hands in what settles
its runs, and that is called (and imports MLflow) only when the block does not finish.
`tracking.ended_on_failure` is the MLflow form.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler or an operator stopping the task); raised like KeyboardInterrupt."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def settled_on_failure(settle: Callable[[str], None]) -> Iterator[None]:
    """Run a block with SIGTERM raised as `Terminated`; if the block does not finish, call `settle` with the status
    its runs end with, then re-raise: "KILLED" when interrupted (Ctrl-C, SIGTERM), "FAILED" for anything else.

    SIGTERM is turned into `Terminated` only while the block runs in the main thread.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        yield
    except BaseException as error:
        settle("KILLED" if isinstance(error, (KeyboardInterrupt, Terminated)) else "FAILED")
        raise
    finally:
        if in_main_thread:  # None: the previous handler was not set from Python
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
