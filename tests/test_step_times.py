"""Where a run's time went: steps grouped from task spans and library seconds, as the end of a run prints them."""

from __future__ import annotations

from datetime import datetime, timedelta

from cocomix_core.reporting.step_times import (
    TaskTime,
    duration_text,
    own_library_seconds,
    step_time_lines,
    step_times,
)

T0 = datetime(2026, 1, 1, 12, 0, 0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# concepts: one task, 0-600 s; train: two overlapping tasks, 600-900 and 610-1000 s.
TASKS = [
    TaskTime("train", at(610), at(1000), {"train_branch": 380.0}),
    TaskTime("concepts", at(0), at(600), {"fit_sae": 100.0, "build_labels": 450.5}),
    TaskTime("train", at(600), at(900), {"train_branch": 290.0}),
]


def test_steps_come_in_start_order_with_their_wall_span_task_time_and_library_seconds_per_call():
    concepts, train = step_times(TASKS)
    assert (concepts.step, concepts.tasks, concepts.wall_s, concepts.task_s) == ("concepts", 1, 600.0, 600.0)
    assert concepts.library == {"fit_sae": 100.0, "build_labels": 450.5} and concepts.library_s == 550.5
    # the span runs from the first start (600) to the last end (1000); task time adds both tasks (300 + 390)
    assert (train.step, train.tasks, train.wall_s, train.task_s) == ("train", 2, 400.0, 690.0)
    assert train.library == {"train_branch": 670.0}


def test_durations_read_as_seconds_minutes_or_hours():
    assert [duration_text(s) for s in (0.4, 59.4, 60, 185, 3600, 3725)] == [
        "0 s", "59 s", "1 min 00 s", "3 min 05 s", "1 h 00 min", "1 h 02 min"]


def test_the_table_names_every_step_its_span_and_where_the_library_spent_it():
    header, concepts, train = step_time_lines(step_times(TASKS), total_s=1000)
    assert "16 min 40 s" in header
    assert concepts.split()[:3] == ["concepts", "10", "min"]
    assert "fit_sae 1 min 40 s" in concepts and "build_labels 7 min 30 s" in concepts and "summed" not in concepts
    assert "2 tasks, 11 min 30 s of task time" in train and "train_branch 11 min 10 s (summed over tasks)" in train
    assert step_time_lines([], total_s=0) == [header.replace("16 min 40 s", "0 s")]


def test_a_task_keeps_only_its_own_steps_library_calls_not_those_it_inherited():
    recorded = {"concepts/fit_sae": 5.0, "train_one_node/train_branch": 7.0, "train_one_node/other": 1.0}
    assert own_library_seconds(recorded, "train_one_node") == {"train_branch": 7.0, "other": 1.0}
    assert own_library_seconds(recorded, "evaluate") == {}
