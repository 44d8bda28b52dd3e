"""Where a run's time went, step by step: the end-of-run text and the flow benchmark read the same rows.

The flow records the seconds spent inside each library call of a task ("<step>/<call>" in its
`library_seconds` artifact); the orchestrator records when each task started and finished. A step's
wall time runs from its first task's start to its last task's end, so the foreach steps of parallel
branches overlap one another: the spans explain the run's length, they do not add up to it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable, Mapping


@dataclass(frozen=True)
class TaskTime:
    """One finished task: its step, when it ran, and the seconds it spent in each library call."""

    step: str
    started: datetime
    finished: datetime
    library: Mapping[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return (self.finished - self.started).total_seconds()


@dataclass(frozen=True)
class StepTime:
    """One step of a run: its task count, wall span, summed task time and summed seconds per library call."""

    step: str
    tasks: int
    started: datetime
    wall_s: float
    task_s: float
    library: dict[str, float]

    @property
    def library_s(self) -> float:
        return sum(self.library.values())


def own_library_seconds(recorded: Mapping[str, float], step: str) -> dict[str, float]:
    """A task's own library calls from its `library_seconds` artifact, whose "<step>/<call>" keys include the
    entries it inherited from the tasks before it."""
    return {key.split("/", 1)[1]: seconds for key, seconds in recorded.items() if key.startswith(f"{step}/")}


def step_times(tasks: Iterable[TaskTime]) -> list[StepTime]:
    """The tasks grouped by step, in the order the steps started."""
    by_step: dict[str, list[TaskTime]] = defaultdict(list)
    for task in tasks:
        by_step[task.step].append(task)
    steps = []
    for name, members in by_step.items():
        library: dict[str, float] = defaultdict(float)
        for task in members:
            for call, seconds in task.library.items():
                library[call] += seconds
        started = min(task.started for task in members)
        wall = (max(task.finished for task in members) - started).total_seconds()
        steps.append(StepTime(name, len(members), started, wall, sum(task.seconds for task in members), dict(library)))
    return sorted(steps, key=lambda step: step.started)


def duration_text(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min': as a person reads a duration."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def step_time_lines(steps: list[StepTime], total_s: float) -> list[str]:
    """The end-of-run table: each step's wall span and, where it called the library, its calls' summed seconds."""
    lines = [f"Where the time went ({duration_text(total_s)} from the first task's start; steps of parallel "
             "branches overlap):"]
    width = max((len(step.step) for step in steps), default=0)
    for step in steps:
        tasks = f"{step.tasks} tasks, {duration_text(step.task_s)} of task time" if step.tasks > 1 else "1 task"
        calls = ", ".join(f"{call} {duration_text(seconds)}" for call, seconds in step.library.items())
        inside = f"; inside the library: {calls}" + (" (summed over tasks)" if step.tasks > 1 else "") if calls else ""
        lines.append(f"  {step.step:<{width}}  {duration_text(step.wall_s):>12}  {tasks}{inside}")
    return lines
