"""The tracker interface against a real MLflow store (SQLite in a temp folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cocomix_core import tracking


@pytest.fixture()
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_experiment_is_created_once_with_artifacts_beside_the_store(store: str, tmp_path: Path):
    first = tracking.ensure_experiment("exp", tracking_uri=store)
    assert tracking.ensure_experiment("exp", tracking_uri=store) == first
    experiment = MlflowClient(store).get_experiment(first)
    assert experiment.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()


def test_child_run_is_linked_to_its_parent(store: str):
    experiment = tracking.ensure_experiment("exp", tracking_uri=store)
    parent = tracking.create_run(experiment, "parent", tracking_uri=store)
    child = tracking.create_run(experiment, "child", parent_run_id=parent, tags={"a": "1"}, tracking_uri=store)
    run = MlflowClient(store).get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["a"] == "1"
    tracking.end_run(child, "FAILED", tracking_uri=store)
    assert MlflowClient(store).get_run(child).info.status == "FAILED"
    found = tracking.find_runs(experiment, f"tags.mlflow.parentRunId = '{parent}'", tracking_uri=store)
    assert [r.info.run_id for r in found] == [child]


def test_mlflow_tracker_batches_metrics_until_flush(store: str, tmp_path: Path):
    experiment = tracking.ensure_experiment("exp", tracking_uri=store)
    run_id = tracking.create_run(experiment, "r", tracking_uri=store)
    tracker = tracking.MlflowTracker(run_id, tracking_uri=store, flush_every=1000)
    client = MlflowClient(store)
    for step in range(5):
        tracker.log_metrics({"train/loss": 10.0 - step, "train/lr": 0.1}, step=step)
    assert client.get_metric_history(run_id, "train/loss") == []  # still buffered
    tracker.flush()
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 10.0 - s) for s in range(5)]
    params = {f"p{i}": str(i) for i in range(150)}  # more than one log_batch of params
    tracker.log_params(params)
    tracker.set_tags({"k": "v"})
    artifact = tmp_path / "table.md"
    artifact.write_text("| a |\n")
    tracker.log_artifact(artifact, "report")
    tracker.close()
    run = client.get_run(run_id)
    assert run.data.params == params and run.data.tags["k"] == "v"
    assert [f.path for f in client.list_artifacts(run_id, "report")] == ["report/table.md"]


def test_dataset_input_carries_the_digest(store: str):
    experiment = tracking.ensure_experiment("exp", tracking_uri=store)
    run_id = tracking.create_run(experiment, "prepare", tracking_uri=store)
    tracking.log_dataset_input(
        run_id, name="sotu", digest="ab" * 32, source="/data/x", profile={"train_tokens": 10}, tracking_uri=store
    )
    inputs = MlflowClient(store).get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    assert inputs[0].dataset.name == "sotu" and inputs[0].dataset.digest == ("ab" * 32)[:36]
    assert '"train_tokens": 10' in inputs[0].dataset.profile


def test_memory_and_jsonl_trackers_keep_what_was_logged(tmp_path: Path):
    memory = tracking.MemoryTracker()
    memory.log_metrics({"val/ppl": 3.0}, step=2)
    memory.log_metrics({"val/ppl": 2.5}, step=4)
    assert memory.history("val/ppl") == [(2, 3.0), (4, 2.5)]
    path = tmp_path / "m.jsonl"
    jsonl = tracking.JsonlTracker(path)
    jsonl.log_metrics({"train/loss": 1.5}, step=1)
    assert path.read_text().strip() == '{"metrics": {"train/loss": 1.5}, "step": 1}'


def test_default_store_is_an_absolute_sqlite_path(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri()
    assert uri.startswith("sqlite:////") and uri.endswith("/mlruns.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/other.db")
    assert tracking.resolve_tracking_uri() == "sqlite:////tmp/other.db"
