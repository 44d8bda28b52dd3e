"""Logs a person reads: progress of long work, and third-party noise hushed.

On a terminal (stderr is a tty) a long loop shows a tqdm bar. Anywhere else (Metaflow captures
the output, CI, a pipe) it prints a plain line to stderr every LINE_EVERY_PERCENT percent of the
work or every LINE_EVERY_S seconds, whichever comes first, and at the end; never a carriage return:

    [ntp] step 40/200 (20%) loss=4.123 tokens/s=12345 elapsed 0:00:12 ETA 0:00:48

Progress and notes go to stderr, as bars do, so stdout keeps only results (a command's JSON).

`quiet_third_party()` (a context manager and decorator) hushes what the user cannot act on:
transformers' and the hub's bars ("Writing model shards", "Loading weights"), every other
library's tqdm bar when not on a terminal (lm-eval's request bars, datasets' split bars),
lm-eval's warnings about being handed a model object, and transformers' `loss_type=None`
notice. lm-eval's "exceeds model's maximum length … Truncating" warnings are counted and
summarised in one line when the outermost block ends ("58 inputs truncated to the model's
32-token context"). Blocks nest; only the outermost one acts, so a task that wraps its whole
body gets one summary however many library calls inside wrap themselves.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
import sys
import time
from typing import Any, Iterable, Iterator, TypeVar

__all__ = ["LINE_EVERY_PERCENT", "LINE_EVERY_S", "Progress", "ThirdPartyNoise", "on_terminal", "quiet_third_party",
           "say", "track"]

# How often captured logs get a progress line: presentation, not part of the experiment's settings.
LINE_EVERY_PERCENT = 10
LINE_EVERY_S = 30.0
T = TypeVar("T")


def on_terminal() -> bool:
    """True when a person watches stderr live (a tty); False under Metaflow, CI or a pipe."""
    return sys.stderr.isatty()


def say(message: str) -> None:
    """Print one line for the person reading the log: to stderr, like every progress bar, so stdout keeps
    only results (a command's JSON); flushed at once so lines interleave in order."""
    print(message, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """Progress of `total` units of work (None: unknown): a tqdm bar on a terminal, else plain lines.

    `update(n)` counts work done; `set_values(loss=…)` sets what the next line or the bar shows.
    `enabled=False` (e.g. on every process but the main one) shows nothing.
    """

    def __init__(self, description: str, total: int | None = None, *, initial: int = 0, unit: str = "step",
                 enabled: bool = True, terminal: bool | None = None, every_percent: float = LINE_EVERY_PERCENT,
                 every_s: float = LINE_EVERY_S) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.initial = self.done = self.shown = initial
        self.every_percent, self.every_s = every_percent, every_s
        self.values: dict[str, Any] = {}
        self.enabled = enabled
        self.started = self.last_line = time.monotonic()
        self.next_percent = self._percent(initial) // every_percent * every_percent + every_percent
        self.bar = None
        if enabled and (on_terminal() if terminal is None else terminal):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=description, unit=unit, dynamic_ncols=True)

    def _percent(self, done: int) -> float:
        return 100.0 * done / self.total if self.total else 0.0

    def set_values(self, **values: Any) -> None:
        """Values shown with the progress from now on (floats to 4 significant digits)."""
        self.values.update(values)
        if self.bar is not None:
            self.bar.set_postfix({name: _value(value) for name, value in self.values.items()}, refresh=False)

    def update(self, count: int = 1) -> None:
        """`count` more units done; prints a line when the next percent mark or time mark is passed."""
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        if not self.enabled:
            return
        now = time.monotonic()
        percent_reached = self.total is not None and self._percent(self.done) >= self.next_percent
        if percent_reached or now - self.last_line >= self.every_s or self.done == self.total:
            self._line(now)

    def _line(self, now: float) -> None:
        if self.total:
            count = f"{self.unit} {self.done:,}/{self.total:,} ({self._percent(self.done):.0f}%)"
        else:
            count = f"{self.done:,} {self.unit}s"
        parts = [f"[{self.description}] {count}"]
        parts += [f"{name}={_value(value)}" for name, value in self.values.items()]
        elapsed = now - self.started
        parts.append(f"elapsed {_clock(elapsed)}")
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        if self.total and self.done < self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        elif not self.total and rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
        say(" ".join(parts))
        self.shown, self.last_line = self.done, now
        while self.total and self._percent(self.done) >= self.next_percent:
            self.next_percent += self.every_percent

    def close(self) -> None:
        """End the bar, or print the final line if the last one printed is behind."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done != self.shown:
            self._line(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "item") -> Iterator[T]:
    """Iterate `items`, showing progress as `Progress` does (total from len() when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(description, total, unit=unit) as progress:
        for item in items:
            yield item
            progress.update()


# ----- third-party noise ------------------------------------------------------------------------
# (logger, message fragment) of warnings a user cannot act on: dropped.
DROPPED_WARNINGS = (
    ("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`"),
    ("lm_eval.models.huggingface", "HF model type is neither marked as CausalLM"),
    ("lm_eval.models.huggingface", "Passed an already-initialized model through `pretrained`"),
    ("transformers.modeling_utils", "was set in the config but it is unrecognized"),
)
# Warnings repeated once per input: counted, then summarised in one line.
TRUNCATION_LOGGERS = ("lm_eval.models.huggingface", "lm_eval.models.utils")
TRUNCATION_PATTERN = re.compile(r"exceeds (?:model's )?max(?:imum)? length \((\d+)\)|Truncating context")


class ThirdPartyNoise(logging.Filter):
    """A logging filter that drops DROPPED_WARNINGS and counts truncation warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.truncated = 0
        self.context_lengths: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(record.name == name and fragment in message for name, fragment in DROPPED_WARNINGS):
            return False
        if record.name in TRUNCATION_LOGGERS and (match := TRUNCATION_PATTERN.search(message)):
            self.truncated += 1
            if match.group(1):
                self.context_lengths.add(int(match.group(1)))
            return False
        return True

    def summary(self) -> str | None:
        """One line about the truncated inputs, or None when there were none."""
        if not self.truncated:
            return None
        context = "/".join(str(length) for length in sorted(self.context_lengths))
        return f"{self.truncated} inputs truncated to the model's {context + '-token ' if context else ''}context"


def _force_disabled(init: Any) -> Any:
    def disabled_init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    return disabled_init


_active: ThirdPartyNoise | None = None


# transformers copies the hub's progress-bar switch when it is imported and keeps its own after (its switches set
# the hub's too). Both helpers read or set transformers' only if it is already imported: importing it costs ~0.4 s,
# which every flow task would pay, and most never use it.
def _progress_bars_on() -> bool:
    """Whether the hub's download bars and transformers' bars are on."""
    from huggingface_hub import utils as hub_utils

    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        return transformers_logging.is_progress_bar_enabled()
    return not hub_utils.are_progress_bars_disabled()


def _set_progress_bars(on: bool) -> None:
    """Turn the hub's download bars and transformers' bars on or off."""
    from huggingface_hub import utils as hub_utils

    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        (transformers_logging.enable_progress_bar if on else transformers_logging.disable_progress_bar)()
    else:
        (hub_utils.enable_progress_bars if on else hub_utils.disable_progress_bars)()


@contextlib.contextmanager
def quiet_third_party() -> Iterator[ThirdPartyNoise]:
    """Hush third-party bars and warnings for the block; summarise truncations once at its end (see module doc)."""
    global _active
    if _active is not None:  # an outer block already hushes and will summarise
        yield _active
        return
    import tqdm.std

    noise = _active = ThirdPartyNoise()
    loggers = [logging.getLogger(name) for name in {name for name, _ in DROPPED_WARNINGS} | set(TRUNCATION_LOGGERS)]
    for logger in loggers:
        logger.addFilter(noise)
    bars_were_on = _progress_bars_on()
    _set_progress_bars(False)
    original_init = tqdm.std.tqdm.__init__
    if not on_terminal():  # every bar in captured output is a pile of redraws: lm-eval's, datasets'
        tqdm.std.tqdm.__init__ = _force_disabled(original_init)
    try:
        yield noise
    finally:
        tqdm.std.tqdm.__init__ = original_init
        if bars_were_on:
            _set_progress_bars(True)
        for logger in loggers:
            logger.removeFilter(noise)
        _active = None
        if (line := noise.summary()) is not None:
            say(line)
