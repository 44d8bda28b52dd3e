"""Experiment tracking: the one module that talks to MLflow.

Training and evaluation log through the small `Tracker` protocol, so the same
code logs to MLflow in the flow, to the console from the command line, and to
memory in tests. The flow owns the run hierarchy: it creates runs here and hands
their ids to the trackers.

Metric names (stable; the flow's report and MLflow comparisons rely on them):
    train/loss, train/ntp_loss, train/concept_loss, train/lr, train/grad_norm,
    train/tokens_seen, train/tokens_per_s, train/mfu      (step = optimizer step)
    val/loss, val/ppl                                     (step = optimizer step)
    eval/val_loss, eval/val_ppl, eval/tokens_seen,
    eval/<task>/<metric>                                  (step = checkpoint step)
    <branch>/eval/...  in the parent run                  (step = training tokens; `log_branch_curves`)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, TypeVar

# Keep MLflow quiet and local: no usage telemetry leaves the machine.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# MLflow's own defaults (120 s per request, 7 retries with doubling backoff) make a server that
# does not answer hold a step for many minutes; these bound it to about a minute and a half.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")

import mlflow  # noqa: E402
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL, MLFLOW_MODEL_VERSIONS  # noqa: E402

from cocomix_core import PROJECT_ROOT  # noqa: E402
from cocomix_core.plumbing.errors import CocomixError  # noqa: E402
from cocomix_core.plumbing.files import exclusive_lock  # noqa: E402
from cocomix_core.plumbing.interrupts import settled_on_failure  # noqa: E402
from cocomix_core.plumbing.keys import EXPERIMENT_RUN_TAG  # noqa: E402
from cocomix_core.plumbing.storage import local_datastore_home  # noqa: E402

DEFAULT_STORE_NAME = "mlruns.db"  # the default store's file, beside Metaflow's local datastore
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_TAG_VALUE_CHARS = 8000  # MLflow's limit on a tag value, the run description included
NOTE_TAG = "mlflow.note.content"  # the tag the MLflow UI shows (and edits) as a run's description
LOCKED_RETRIES = 10  # SQLite allows one writer; parallel flow tasks wait their turn
LOCKED_FIRST_WAIT_S = 0.05
PROBE_TIMEOUT_S = 5.0  # a tracking store that does not answer a probe in this time is reported unreachable
T = TypeVar("T")
# Stores MLflow opens: SQLite files, tracking servers, file stores, and the databases SQLAlchemy reaches.
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql")


class TrackingError(CocomixError, RuntimeError):
    """The tracking store cannot be used (unreachable, unwritable, unknown run), naming the URI or run."""


def when_unlocked(call: Callable[[], T], attempts: int = LOCKED_RETRIES) -> T:
    """Run a store call, retrying with exponential backoff while SQLite says "database is locked".

    Several flow tasks write to one SQLite store at once; SQLite serialises writers and
    gives up after its busy timeout, so a write can fail for a moment and succeed later.
    """
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:  # MLflow wraps SQLAlchemy's OperationalError in its own types
            if "database is locked" not in str(error) or attempt == attempts - 1:
                raise
            time.sleep(LOCKED_FIRST_WAIT_S * 2**attempt)
    raise AssertionError("unreachable")


class Tracker(Protocol):
    """What training and evaluation need from a tracker."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_params(self, params: dict[str, str]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def logged_points(self) -> set[tuple[str, int]]:
        """(metric, step) pairs already in the store, so a resumed or retried run logs none of them twice."""
        ...


class ConsoleTracker:
    """Prints metrics as one compact line per step; for command-line runs."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        shown = " ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items()))
        print(f"{self.prefix}step {step}: {shown}", flush=True)

    def log_params(self, params: dict[str, str]) -> None:
        pass  # parameters are the settings, printed by the caller if wanted

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        print(f"{self.prefix}artifact: {path}", flush=True)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def logged_points(self) -> set[tuple[str, int]]:
        return set()  # the console keeps nothing: a resumed run prints its steps again


class MemoryTracker:
    """Keeps every call in lists; lets tests and notebooks inspect what was logged."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, str, float]] = []
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[str, str | None]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.extend((step, name, float(value)) for name, value in metrics.items())

    def log_params(self, params: dict[str, str]) -> None:
        self.params.update(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def history(self, name: str) -> list[tuple[int, float]]:
        """(step, value) pairs logged under `name`, in logging order."""
        return [(step, value) for step, metric, value in self.metrics if metric == name]

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def logged_points(self) -> set[tuple[str, int]]:
        return {(name, step) for step, name, _ in self.metrics}


class JsonlTracker:
    """Appends one JSON line per metric record to a file; lets subprocess runs be compared exactly."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "metrics": metrics}, sort_keys=True) + "\n")

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def logged_points(self) -> set[tuple[str, int]]:
        if not self.path.is_file():
            return set()
        records = (json.loads(line) for line in self.path.read_text().splitlines() if line.strip())
        return {(name, record["step"]) for record in records for name in record["metrics"]}


class MlflowTracker:
    """Logs to an existing MLflow run in batches; the run is created and ended by the caller."""

    def __init__(self, run_id: str, tracking_uri: str | None = None, flush_every: int = 200) -> None:
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
        self.flush_every = flush_every
        self._pending: list[Metric] = []

    def log_metrics(self, metrics: dict[str, float], step: int, model_id: str | None = None) -> None:
        """Queue metrics at `step`; with `model_id`, MLflow also lists them as that LoggedModel's metrics."""
        timestamp = int(time.time() * 1000)
        self._pending.extend(Metric(name, float(value), timestamp, step, model_id=model_id)
                             for name, value in metrics.items())
        if len(self._pending) >= self.flush_every:
            self.flush()

    def log_params(self, params: dict[str, str]) -> None:
        entries = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(entries), MAX_PARAMS_PER_BATCH):
            batch = entries[start : start + MAX_PARAMS_PER_BATCH]
            when_unlocked(lambda: self.client.log_batch(self.run_id, params=batch))

    def set_tags(self, tags: dict[str, str]) -> None:
        entries = [RunTag(key, str(value)) for key, value in tags.items()]
        for start in range(0, len(entries), MAX_TAGS_PER_BATCH):
            batch = entries[start : start + MAX_TAGS_PER_BATCH]
            when_unlocked(lambda: self.client.log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        when_unlocked(lambda: log(self.run_id, str(path), artifact_path))

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_METRICS_PER_BATCH], self._pending[MAX_METRICS_PER_BATCH:]
            when_unlocked(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def close(self) -> None:
        self.flush()

    def logged_points(self) -> set[tuple[str, int]]:
        self.flush()
        names = when_unlocked(lambda: self.client.get_run(self.run_id)).data.metrics
        return {
            (name, point.step) for name in names
            for point in when_unlocked(lambda: self.client.get_metric_history(self.run_id, name))
        }


# ---------------------------------------------------------------- run hierarchy


def resolve_tracking_uri(uri: str | None = None, home: str | os.PathLike | None = None) -> str:
    """The store to use: `uri`, else $MLFLOW_TRACKING_URI, else a SQLite file in `home`: the folder holding the
    run's local Metaflow datastore (default: found as Metaflow finds it), as the storage root's default is."""
    if uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return uri or os.environ["MLFLOW_TRACKING_URI"]
    folder = Path(home).resolve() if home is not None else local_datastore_home()
    return f"sqlite:///{folder / DEFAULT_STORE_NAME}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for new experiments: next to a SQLite store, else the server's default."""
    if tracking_uri.startswith("sqlite:///"):
        store = Path(tracking_uri.removeprefix("sqlite:///"))
        return (store.parent / "mlartifacts").resolve().as_uri()
    return None


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    return Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_creation_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise store-schema and experiment creation across processes on one machine.

    Two flows started together on a fresh SQLite file both run MLflow's schema migration;
    the loser dies in alembic ("expected to match one row ... 0 found"). An exclusive flock on
    `<store>.lock` makes the second wait until the first has created schema and experiment.
    Servers serialise creation themselves: no lock for them.
    """
    store = sqlite_path(tracking_uri)
    if store is None:
        yield
        return
    with exclusive_lock(store.with_name(store.name + ".lock")):
        yield


def ensure_experiment(name: str, tracking_uri: str | None = None) -> str:
    """Create the experiment (and the store's schema) once, or return the existing one's id.

    Safe to call from several processes at once on one SQLite store (see `store_creation_lock`).
    """
    uri = resolve_tracking_uri(uri=tracking_uri)
    with store_creation_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        existing = client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        return client.create_experiment(name, artifact_location=default_artifact_location(uri))


def check_tracking_store(tracking_uri: str | None = None, timeout_s: float | None = None) -> str:
    """Raise TrackingError unless the store answers within `timeout_s` and can be written; returns the URI.

    Cheap enough to run before any work: a SQLite store's folder must be writable (and an existing
    file a SQLite database); a server must accept a connection and answer its /health page.
    """
    uri = resolve_tracking_uri(tracking_uri)
    _check_scheme(uri)
    store = sqlite_path(uri)
    if store is not None:
        _check_sqlite_store(uri, store)
    elif uri.startswith(("http://", "https://")):
        _check_server(uri, PROBE_TIMEOUT_S if timeout_s is None else timeout_s)
    return uri


def _check_scheme(uri: str) -> None:
    """Refuse a URI whose scheme MLflow has no store for (it would fail deep in its registry code)."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in TRACKING_SCHEMES or not scheme:  # no scheme: a local folder, MLflow's file store
        return
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") == uri else "tracking.mlflow_uri"
    raise TrackingError(f"tracking store {uri} (from {source}): unknown scheme {scheme!r}; expected one of "
                        f"{', '.join(f'{name}://' for name in TRACKING_SCHEMES)} or a local folder")


def _check_sqlite_store(uri: str, store: Path) -> None:
    folder = store.parent
    existing = next((path for path in (folder, *folder.parents) if path.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise TrackingError(f"tracking store {uri}: folder {existing or folder} is not a writable folder")
    if not store.exists():
        return
    if not os.access(store, os.R_OK | os.W_OK):
        raise TrackingError(f"tracking store {uri}: {store} is not readable and writable")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as error:
        raise TrackingError(f"tracking store {uri}: {store} is not a SQLite database ({error})") from None


def _check_server(uri: str, timeout_s: float) -> None:
    parsed = urllib.parse.urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as error:
        raise TrackingError(f"tracking server {uri} is unreachable ({error}); check tracking.mlflow_uri / MLFLOW_TRACKING_URI") from None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            response.read(64)
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            return  # the server answers; credentials are MLflow's business
        raise TrackingError(f"tracking server {uri} answered /health with HTTP {error.code}; is it an MLflow server?") from None
    except OSError as error:  # includes timeouts of a server that accepts connections but never answers
        raise TrackingError(f"tracking server {uri} did not answer within {timeout_s:g} s ({error})") from None


def check_run(run_id: str, tracking_uri: str | None = None) -> None:
    """Raise TrackingError unless `run_id` is a run of the store (which must answer within a few seconds)."""
    uri = check_tracking_store(tracking_uri)
    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrackingError(f"MLflow run {run_id!r} not found in {uri} ({first_line})") from None


def create_run(
    experiment_id: str,
    run_name: str,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Create a run (a child when `parent_run_id` is given) and return its id; it stays open until `end_run`."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = when_unlocked(lambda: client.create_run(experiment_id, run_name=run_name, tags=all_tags))
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED", tracking_uri: str | None = None) -> None:
    """Mark a run FINISHED, FAILED or KILLED."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    when_unlocked(lambda: client.set_terminated(run_id, status=status))


def run_status(run_id: str, tracking_uri: str | None = None) -> str:
    """RUNNING, FINISHED, FAILED, KILLED or SCHEDULED."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    return when_unlocked(lambda: client.get_run(run_id)).info.status


def reopen_ended_runs(run_ids: list[str], tracking_uri: str | None = None) -> None:
    """Set runs a previous attempt ended FAILED or KILLED back to RUNNING (a retry or a resume continues them)."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    for run_id in run_ids:
        if run_status(run_id, tracking_uri) in ("FAILED", "KILLED"):
            when_unlocked(lambda: client.update_run(run_id, status="RUNNING"))


def end_running_runs(run_ids: list[str], status: str, tracking_uri: str | None = None) -> None:
    """End those of `run_ids` still RUNNING with `status` (FAILED or KILLED); ended ones keep theirs."""
    for run_id in run_ids:
        if run_status(run_id, tracking_uri) == "RUNNING":
            end_run(run_id, status, tracking_uri)


@contextlib.contextmanager
def ended_on_failure(run_ids: list[str], tracking_uri: str | None = None, reopen: bool = True) -> Iterator[None]:
    """Keep runs honest about a block of work: reopen them, and end them KILLED or FAILED if the block does not finish.

    On entry (with `reopen`), runs a previous attempt ended FAILED or KILLED are set RUNNING again (a
    retry or a resume continues them). If the block is interrupted (Ctrl-C, or SIGTERM: see
    `interrupts.settled_on_failure`) the runs still RUNNING end KILLED; if it raises anything else,
    FAILED. A block that succeeds leaves them RUNNING: their owner ends them.
    """
    if reopen:
        reopen_ended_runs(run_ids, tracking_uri)
    with settled_on_failure(lambda status: end_running_runs(run_ids, status, tracking_uri)):
        yield


def log_dataset_input(
    run_id: str,
    *,
    name: str,
    digest: str,
    source: str,
    profile: dict[str, Any],
    context: str = "training",
    tracking_uri: str | None = None,
) -> None:
    """Record prepared data as an MLflow dataset input of a run, identified by its digest."""
    dataset = Dataset(
        name=name,
        digest=digest[:36],  # MLflow caps dataset digests at 36 characters
        source_type="local" if "://" not in source else source.split("://", 1)[0],
        source=json.dumps({"uri": source}),
        schema=json.dumps({"format": "uint16 GPT-2 token ids"}),
        profile=json.dumps(profile, sort_keys=True),
    )
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
    when_unlocked(lambda: client.log_inputs(run_id, datasets=inputs))


def find_runs(experiment_id: str, filter_string: str, tracking_uri: str | None = None) -> list[mlflow.entities.Run]:
    """Runs of an experiment matching an MLflow search filter, oldest first."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    return list(client.search_runs([experiment_id], filter_string=filter_string, order_by=["attributes.start_time ASC"]))


# ---------------------------------------------------------------- lineage

LINEAGE_PREFIX = "metaflow."


def git_commit(path: str | os.PathLike = PROJECT_ROOT) -> str:
    """HEAD's commit hash of the checkout holding `path`, or "unknown" outside git (or before the first commit)."""
    try:
        result = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def lineage_tags(
    *,
    flow: str,
    run_id: str,
    step: str,
    task_pathspec: str,
    settings_digest: str,
    origin_run_id: str | None = None,
    commit: str | None = None,
) -> dict[str, str]:
    """Tags that tie an MLflow run to the orchestrator's task, the code and the settings that made it."""
    tags = {
        f"{LINEAGE_PREFIX}flow": flow,
        f"{LINEAGE_PREFIX}run_id": run_id,
        f"{LINEAGE_PREFIX}step": step,
        f"{LINEAGE_PREFIX}task_pathspec": task_pathspec,
        "git.commit": commit or git_commit(),
        "settings.digest": settings_digest,
    }
    if origin_run_id:
        tags[f"{LINEAGE_PREFIX}origin_run_id"] = origin_run_id
    return tags


@contextlib.contextmanager
def active_run(run_id: str, tracking_uri: str | None = None) -> Iterator[MlflowTracker]:
    """Log to an existing run for the length of a block; end it FINISHED, or as `ended_on_failure` does."""
    tracker = MlflowTracker(run_id, tracking_uri)
    with ended_on_failure([run_id], tracking_uri):
        try:
            yield tracker
        finally:
            tracker.close()  # what was logged before a failure is kept; a retry skips those points
    end_run(run_id, "FINISHED", tracking_uri)


@contextlib.contextmanager
def tracked_run(
    experiment_id: str,
    run_name: str,
    *,
    parent_run_id: str | None,
    tags: dict[str, str],
    params: dict[str, str] | None = None,
    tracking_uri: str | None = None,
) -> Iterator[MlflowTracker]:
    """Create a (child) run for one piece of work and log to it as `active_run` does."""
    run_id = create_run(experiment_id, run_name, parent_run_id=parent_run_id, tags=tags, tracking_uri=tracking_uri)
    with active_run(run_id, tracking_uri) as tracker:
        if params:
            tracker.log_params(params)
        yield tracker


def log_checkpoints(tracker: Tracker, checkpoints: list[dict[str, Any]], artifact_dir: str | os.PathLike) -> None:
    """Record each checkpoint at its step (metric `checkpoint/tokens_seen`) and their URIs as `checkpoints.json`.

    Each entry needs `step`, `tokens_seen` and `uri`; the JSON list lets anyone go from an
    MLflow run to the weights it produced.
    """
    for checkpoint in checkpoints:
        tracker.log_metrics({"checkpoint/tokens_seen": float(checkpoint["tokens_seen"])}, step=int(checkpoint["step"]))
    listing = Path(artifact_dir) / "checkpoints.json"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text(json.dumps(checkpoints, indent=2, sort_keys=True) + "\n")
    tracker.flush()
    tracker.log_artifact(listing)


# ---------------------------------------------------------------- what the parent run shows first


def log_branch_curves(
    run_id: str, curves: Mapping[str, Iterable[tuple[int, Mapping[str, float]]]], tracking_uri: str | None = None
) -> None:
    """Log each branch's (training tokens, metrics) points into one run as `<branch>/<metric>` at step = tokens.

    Given the parent run, its chart view then holds every branch's curve against the same
    token axis (`ntp/eval/val_ppl`, `cocomix/eval/val_ppl`, ...) without opening the branch runs.
    """
    tracker = MlflowTracker(run_id, tracking_uri)
    for branch, points in curves.items():
        for tokens, metrics in points:
            tracker.log_metrics({f"{branch}/{name}": value for name, value in metrics.items()}, step=int(tokens))
    tracker.close()


def set_description(run_id: str, markdown: str, tracking_uri: str | None = None) -> None:
    """Set a run's description (the note the MLflow UI shows on the run page), in Markdown."""
    if len(markdown) > MAX_TAG_VALUE_CHARS:
        raise ValueError(
            f"a run description holds at most {MAX_TAG_VALUE_CHARS} characters (MLflow's tag limit); "
            f"this one has {len(markdown)}"
        )
    MlflowTracker(run_id, tracking_uri).set_tags({NOTE_TAG: markdown})


# ---------------------------------------------------------------- checkpoints as MLflow LoggedModels

MODEL_TAG_PREFIX = "cocomix."
CHECKPOINT_URI_TAG = "cocomix.checkpoint_uri"


def checkpoint_model(
    experiment_id: str, source_run_id: str, checkpoint_uri: str, tags: Mapping[str, Any], params: Mapping[str, str],
    name: str, tracking_uri: str | None = None,
) -> str:
    """The external LoggedModel of a published checkpoint; returns its model id.

    External: MLflow keeps only a stub MLmodel file; the weights stay at `checkpoint_uri` (tag
    `cocomix.checkpoint_uri`, and the source of a registered version). `tags` (branch, kind, seed, λ, step,
    tokens seen) are prefixed `cocomix.`. Created once: a retried task finds the model by its URI and run.
    The model's artifact location is not `checkpoint_uri`: MLflow 3.17's stores set it to
    `<experiment artifact location>/models/<new model id>/artifacts` and no API (client, REST, flavor) takes one.
    """
    from mlflow.entities import LoggedModelStatus
    from mlflow.models.utils import get_external_mlflow_model_spec

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    found = find_checkpoint_models(experiment_id, {CHECKPOINT_URI_TAG: checkpoint_uri}, tracking_uri)
    found = [model for model in found if model.source_run_id == source_run_id]
    if found:
        return found[0].model_id
    model_tags = {f"{MODEL_TAG_PREFIX}{key}": str(value) for key, value in tags.items()}
    model_tags |= {CHECKPOINT_URI_TAG: checkpoint_uri, MLFLOW_MODEL_IS_EXTERNAL: "true"}
    model = when_unlocked(lambda: client.create_logged_model(
        experiment_id, name=name, source_run_id=source_run_id, tags=model_tags, params=dict(params),
        model_type="checkpoint"))
    # As mlflow.create_external_model does: an MLmodel stub lets the registry take the model; no weights move.
    with tempfile.TemporaryDirectory(prefix="cocomix-mlmodel-") as folder:
        get_external_mlflow_model_spec(model).save(str(Path(folder) / "MLmodel"))
        when_unlocked(lambda: client.log_model_artifacts(model.model_id, folder))
    when_unlocked(lambda: client.finalize_logged_model(model.model_id, LoggedModelStatus.READY))
    return model.model_id


def find_checkpoint_models(
    experiment_id: str, tags: Mapping[str, str], tracking_uri: str | None = None
) -> list[mlflow.entities.LoggedModel]:
    """The experiment's LoggedModels whose tags (full names, e.g. `cocomix.branch`) have these values."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    where = " AND ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items()) or None
    return list(when_unlocked(lambda: client.search_logged_models([experiment_id], filter_string=where)))


def register_best_checkpoint(
    registered_name: str, experiment_id: str, parent_run_id: str, description: str, run_link: str,
    tracking_uri: str | None = None, metric: str = "eval/val_ppl",
) -> mlflow.entities.model_registry.ModelVersion:
    """Register the final checkpoint (the last step of its branch) with the lowest `metric` among the flow run's
    branches as a version of `registered_name`: its source is the checkpoint's storage URI, its run the branch's,
    its description `description` (the verdict), its run link `run_link`.

    Idempotent: when `registered_name` already has a version of that LoggedModel at that source (a resumed `end`,
    a retried task), that version is returned and no second one is made.
    """
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    best = best_final_checkpoint_model(experiment_id, parent_run_id, metric, tracking_uri)
    source = best.tags[CHECKPOINT_URI_TAG]
    version = registered_version_of(registered_name, best, source, tracking_uri)
    if version is None:
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # it already exists: add a version
            when_unlocked(lambda: client.create_registered_model(registered_name))
        tags = {key: value for key, value in best.tags.items() if key.startswith(MODEL_TAG_PREFIX)}
        version = when_unlocked(lambda: client.create_model_version(
            registered_name, source=source, run_id=best.source_run_id, run_link=run_link, description=description,
            model_id=best.model_id, tags=tags | {f"{MODEL_TAG_PREFIX}model_id": best.model_id}))
    # The open-source registry does not keep the model id on the version; as mlflow.register_model does, the
    # LoggedModel lists its versions, so the UI's model page links to the registry.
    listed = json.loads(best.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    if not any((item["name"], str(item["version"])) == (version.name, str(version.version)) for item in listed):
        tag = {MLFLOW_MODEL_VERSIONS: json.dumps(listed + [{"name": version.name, "version": version.version}])}
        when_unlocked(lambda: client.set_logged_model_tags(best.model_id, tag))
    return version


def best_final_checkpoint_model(
    experiment_id: str, parent_run_id: str, metric: str = "eval/val_ppl", tracking_uri: str | None = None
) -> mlflow.entities.LoggedModel:
    """Among the flow run's checkpoint models, the final one of each branch with the lowest `metric` logged against it."""
    models = find_checkpoint_models(experiment_id, {EXPERIMENT_RUN_TAG: parent_run_id}, tracking_uri)
    finals: dict[str, Any] = {}
    for model in models:
        branch, step = model.tags[f"{MODEL_TAG_PREFIX}branch"], int(model.tags[f"{MODEL_TAG_PREFIX}step"])
        if branch not in finals or step > int(finals[branch].tags[f"{MODEL_TAG_PREFIX}step"]):
            finals[branch] = model
    scored = [(values[metric], model) for model in finals.values()
              if metric in (values := {point.key: point.value for point in model.metrics or []})]
    if not scored:
        raise TrackingError(f"no final checkpoint of run {parent_run_id} has {metric} logged against its model")
    return min(scored, key=lambda pair: pair[0])[1]


def registered_version_of(
    registered_name: str, model: mlflow.entities.LoggedModel, source: str, tracking_uri: str | None = None
) -> mlflow.entities.model_registry.ModelVersion | None:
    """The oldest version of `registered_name` made from `model` (its run, its id) at `source`, else None."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    # By run id (hex, safe in a filter), not by name: a registered name may hold quotes MLflow's filter cannot escape.
    found = when_unlocked(lambda: client.search_model_versions(f"run_id = '{model.source_run_id}'"))
    matching = [version for version in found if (version.name, version.source) == (registered_name, source)
                and version.tags.get(f"{MODEL_TAG_PREFIX}model_id") == model.model_id]
    return min(matching, key=lambda version: int(version.version), default=None)
