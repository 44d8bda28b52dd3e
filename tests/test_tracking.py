"""The tracker interface against a real MLflow store (SQLite in a temp folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.entities import LoggedModel
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from cocomix_core.plumbing import tracking


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


def test_default_store_is_an_absolute_sqlite_path_beside_the_datastore(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri()
    assert uri.startswith("sqlite:////") and uri.endswith("/mlruns.db")
    assert tracking.resolve_tracking_uri(home=tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/other.db")
    assert tracking.resolve_tracking_uri() == "sqlite:////tmp/other.db"


def test_parent_run_gets_every_branch_curve_at_the_token_step(store: str):
    experiment = tracking.ensure_experiment("exp", tracking_uri=store)
    parent = tracking.create_run(experiment, "parent", tracking_uri=store)
    curves = {
        "ntp": [(512, {"eval/val_ppl": 40.0, "eval/cocomix_choice/acc": 0.25}), (1024, {"eval/val_ppl": 30.0})],
        "cocomix": [(512, {"eval/val_ppl": 38.5}), (1024, {"eval/val_ppl": 28.25})],
    }
    tracking.log_branch_curves(parent, curves, tracking_uri=store)
    client = MlflowClient(store)
    assert set(client.get_run(parent).data.metrics) == {
        "ntp/eval/val_ppl", "ntp/eval/cocomix_choice/acc", "cocomix/eval/val_ppl"}
    history = {name: [(m.step, m.value) for m in client.get_metric_history(parent, name)]
               for name in ("ntp/eval/val_ppl", "cocomix/eval/val_ppl")}
    assert history == {"ntp/eval/val_ppl": [(512, 40.0), (1024, 30.0)],
                       "cocomix/eval/val_ppl": [(512, 38.5), (1024, 28.25)]}


def test_run_description_is_the_note_the_ui_shows(store: str):
    experiment = tracking.ensure_experiment("exp", tracking_uri=store)
    run_id = tracking.create_run(experiment, "parent", tracking_uri=store)
    text = "**cocomix** beats ntp\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    tracking.set_description(run_id, text, tracking_uri=store)
    assert MlflowClient(store).get_run(run_id).data.tags["mlflow.note.content"] == text
    with pytest.raises(ValueError, match="at most 8000 characters .* this one has 8001"):
        tracking.set_description(run_id, "x" * 8001, tracking_uri=store)


# ----- against a real `mlflow server` (the cluster's setup): parallel branches log at once ----------
BRANCH_LOGGER = """
import sys
from pathlib import Path
from cocomix_core.plumbing import tracking
experiment, parent, name, steps, scratch = sys.argv[1:]
with tracking.tracked_run(experiment, f"train/{name}", parent_run_id=parent, tags={"cocomix.branch": name}) as tracker:
    tracker.flush_every = 7  # many small batches interleaved with the other processes'
    for step in range(int(steps)):
        tracker.log_metrics({"train/loss": 10.0 - step / 100, "train/lr": float(step)}, step=step)
    note = Path(scratch) / f"{name}.txt"
    note.write_text(name)
    tracker.log_artifact(note, "notes")
"""


@pytest.mark.slow  # starting the server and four logging processes takes a minute or two
def test_parallel_branches_lose_no_points_through_a_tracking_server(mlflow_server, tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    experiment = tracking.ensure_experiment("server-exp", tracking_uri=mlflow_server.url)
    parent = tracking.create_run(experiment, "parent")
    branches, steps = ["ntp", "cocomix", "cocomix-seed1", "ntp-seed1"], 300
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    processes = [subprocess.Popen([sys.executable, "-c", BRANCH_LOGGER, experiment, parent, name, str(steps),
                                   str(tmp_path)], env=env) for name in branches]
    assert [process.wait(timeout=300) for process in processes] == [0] * len(branches)

    client = MlflowClient(mlflow_server.url)
    children = tracking.find_runs(experiment, f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(run.data.tags["cocomix.branch"] for run in children) == sorted(branches)
    for run in children:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [(m.step, m.value) for m in history] == [(s, 10.0 - s / 100) for s in range(steps)]
        assert len(client.get_metric_history(run.info.run_id, "train/lr")) == steps
        assert [f.path for f in client.list_artifacts(run.info.run_id, "notes")] == [
            f"notes/{run.data.tags['cocomix.branch']}.txt"]
    assert client.search_runs(["0"]) == []  # nothing landed in "Default"
    # artifacts went through the server into its own folder; the clients never wrote there
    assert sorted(p.name for p in mlflow_server.artifacts.rglob("*.txt")) == sorted(f"{b}.txt" for b in branches)


# The server case is slow: starting the session's `mlflow server` (and stopping it) is most of its time.
@pytest.mark.parametrize("where", ["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def test_checkpoints_are_logged_models_with_linked_metrics_and_the_best_final_one_is_registered(
    where: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Real checkpoints become external LoggedModels (no weights copied) in a SQLite store with local storage,
    and behind a real `mlflow server` with S3 storage (a server refuses local paths as model sources): searchable
    by tag, their eval metrics linked, the best final one registered at its storage URI."""
    import uuid

    from test_modeling import tiny_model
    from transformers import AutoModelForCausalLM

    from cocomix_core.plumbing.storage import Storage

    if where == "sqlite":
        uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", Storage(str(tmp_path / "storage"))
    else:
        uri, storage = request.getfixturevalue("mlflow_server").url, Storage(request.getfixturevalue("s3_root"))
    experiment = tracking.ensure_experiment(f"models-{uuid.uuid4().hex[:8]}", tracking_uri=uri)  # the server is shared
    parent = tracking.create_run(experiment, "CocomixFlow/1", tracking_uri=uri)
    for branch, ppl in {"ntp": 30.0, "cocomix": 20.0}.items():
        run = tracking.create_run(experiment, f"train/{branch}", parent_run_id=parent, tracking_uri=uri)
        for step in (4, 8):
            tiny_model(seed=step).save_pretrained(tmp_path / "written")
            checkpoint_uri = storage.publish(tmp_path / "written", f"runs/{branch}/step_{step:06d}")
            tags = {"branch": branch, "kind": branch, "seed": 0, "lambda": 0.1, "step": step, "tokens_seen": step * 128,
                    "experiment_run": parent}
            model_id = tracking.checkpoint_model(experiment, run, checkpoint_uri, tags, {"arm.kind": branch},
                                                 name=f"{branch}-step_{step:06d}", tracking_uri=uri)
            # A retried evaluation finds the model instead of making a second one.
            assert tracking.checkpoint_model(experiment, run, checkpoint_uri, tags, {}, name="x", tracking_uri=uri) == model_id
            tracker = tracking.MlflowTracker(run, uri)
            tracker.log_metrics({"eval/val_ppl": ppl + 8 - step}, step=step * 128, model_id=model_id)
            tracker.flush()

    client = MlflowClient(uri)
    (cocomix_final,) = tracking.find_checkpoint_models(experiment, {"cocomix.branch": "cocomix", "cocomix.step": "8"}, uri)
    assert cocomix_final.tags["cocomix.tokens_seen"] == "1024" and cocomix_final.params == {"arm.kind": "cocomix"}
    assert cocomix_final.tags[tracking.CHECKPOINT_URI_TAG] == storage.uri("runs/cocomix/step_000008")
    assert [(point.key, point.value, point.step) for point in client.get_logged_model(cocomix_final.model_id).metrics] == [
        ("eval/val_ppl", 20.0, 1024)]
    assert len(tracking.find_checkpoint_models(experiment, {"cocomix.experiment_run": parent}, uri)) == 4
    assert not any(path.name == "model.safetensors" for path in tmp_path.rglob("*") if "mlartifacts" in path.parts)

    version = tracking.register_best_checkpoint("cocomix-best", experiment, parent, "CoCoMix beats NTP",
                                                run_link="http://ui/#/runs/x", tracking_uri=uri)
    registered = client.get_model_version("cocomix-best", version.version)
    assert registered.source == storage.uri("runs/cocomix/step_000008")
    assert registered.tags["cocomix.model_id"] == cocomix_final.model_id and registered.run_id == cocomix_final.source_run_id
    assert json.loads(client.get_logged_model(cocomix_final.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "cocomix-best", "version": registered.version}]
    assert registered.description == "CoCoMix beats NTP" and registered.run_link == "http://ui/#/runs/x"
    loaded = AutoModelForCausalLM.from_pretrained(storage.materialize("runs/cocomix/step_000008"))
    assert loaded.config.model_type == "cocomix"
    # `models:/` URIs resolve in the default registry, as for a user (download_artifacts' registry_uri goes unused).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    check_the_weights_load_as_a_user_finds_them(uri, "cocomix-best", registered, cocomix_final, tmp_path / "user")

    # A resumed `end` registers again: the same version comes back, and no second one is made.
    again = tracking.register_best_checkpoint("cocomix-best", experiment, parent, "CoCoMix beats NTP",
                                              run_link="http://ui/#/runs/x", tracking_uri=uri)
    assert again.version == registered.version
    assert [v.version for v in client.search_model_versions("name = 'cocomix-best'")] == [registered.version]
    assert json.loads(client.get_logged_model(cocomix_final.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "cocomix-best", "version": registered.version}]


def check_the_weights_load_as_a_user_finds_them(
    uri: str, name: str, version: ModelVersion, model: LoggedModel, folder: Path
) -> None:
    """The registered version (`models:/<name>/<version>`) and the LoggedModel's `cocomix.checkpoint_uri` tag both
    lead to weights `from_pretrained` loads. The LoggedModel's own artifact location holds only MLflow's MLmodel
    stub: MLflow 3.17 places it under the experiment's artifact root and offers no way to point it elsewhere."""
    import mlflow
    from transformers import AutoModelForCausalLM

    client = MlflowClient(uri)
    registry = mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=str(folder / "registry"))
    tagged = mlflow.artifacts.download_artifacts(model.tags[tracking.CHECKPOINT_URI_TAG], dst_path=str(folder / "tag"))
    for path in (registry, tagged):
        assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "cocomix"
    if "://" not in version.source:  # a local storage root: the source is the folder itself
        assert AutoModelForCausalLM.from_pretrained(version.source).config.model_type == "cocomix"
    stub = client.get_logged_model(model.model_id)
    assert stub.artifact_location != version.source
    assert [item.path for item in client.list_logged_model_artifacts(model.model_id)] == ["MLmodel"]
