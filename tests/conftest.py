"""Shared fixtures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from cocomix_core.data.corpus import prepare_corpus
from settings import load_settings

# ----- running on several workers (pytest-xdist, `--dist loadgroup` in pyproject.toml) ------------
FLOW_RUNS_GROUP = "flow_runs"  # the modules whose fixtures are whole flow runs mark themselves with it


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the group marks into scheduling groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keep the tests of a module-scoped fixture on one worker, and queue the slow ones first.

    A module-scoped fixture is built once per worker that runs one of its tests, so its tests form one xdist
    group. The flow-run modules share one group: one worker runs those flows one after another while the other
    takes the remaining tests (two flow runs at once crowd two cores and both slow down). Slow tests go to the
    front of the queue, order otherwise kept: the longest work starts first and quick tests fill the gaps.
    """
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        definitions = getattr(item, "_fixtureinfo", None)
        module_scoped = definitions and any(
            fixture.scope == "module" for name in definitions.names_closure
            for fixture in definitions.name2fixturedefs.get(name, ()))
        if module_scoped:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, not _in_group(item, FLOW_RUNS_GROUP)))


def _in_group(item: pytest.Item, group: str) -> bool:
    marker = item.get_closest_marker("xdist_group")
    return marker is not None and group in (*marker.args, marker.kwargs.get("name"))


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke preset's real prepared corpus, shared by the training tests."""
    folder = tmp_path_factory.mktemp("smoke_data")
    prepare_corpus(load_settings("smoke").data, folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_gguf() -> tuple[Any, Any]:
    """(model in float32, tokenizer): the packaged SmolLM2 GGUF read once through transformers for the session.

    De-quantizing it costs ~20 s; tests that convert it hand this read to `teachers._load_gguf` instead
    of paying it again (test_teachers checks the conversion's logits against this very model).
    """
    from cocomix_core.concepts import teachers

    return teachers._load_gguf(teachers.packaged_gguf("smollm2-135m"))


@pytest.fixture(scope="session")
def smollm2_in_storage(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: tuple[Any, Any]) -> Path:
    """The `cpu` preset's teacher converted from the session's one read into a storage root of its own: the folder
    <root>/teacher/gguf-…, as the flow's steps find it."""
    from cocomix_core.concepts import teachers
    from cocomix_core.plumbing.storage import Storage

    root = tmp_path_factory.mktemp("smollm2_storage")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(teachers, "_load_gguf", lambda path: smollm2_gguf)
        return teachers.pretrained_folder("smollm2-135m", Storage(str(root)))


# ----- a real S3 endpoint: moto's server on a free local port ----------------------------------
@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        """Variables that point boto3, Metaflow and cocomix_core.plumbing.storage at this server."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "METAFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self) -> Any:
        """A boto3 S3 client on this server, with its test credentials."""
        import boto3

        env = self.env
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server for the whole session, with one bucket created. Tests apply `.env`
    themselves (e.g. with monkeypatch, or in a subprocess's environment)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(endpoint_url=f"http://{host}:{port}", bucket="cocomix-test")
    s3.client().create_bucket(Bucket=s3.bucket)
    yield s3
    server.stop()


@pytest.fixture()
def s3_root(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh s3:// prefix on the session's server, with the S3 variables set for this test."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return f"s3://{s3_server.bucket}/test-{uuid.uuid4().hex[:8]}"


# ----- a real MLflow tracking server: `mlflow server` on a free local port ------------------------
MLFLOW_SERVER_START_S = 180  # the server imports its whole UI stack; minutes on a loaded machine


@dataclass(frozen=True)
class MlflowServer:
    url: str  # the tracking URI clients use, http://127.0.0.1:<port>
    backend_store: Path  # its SQLite file
    artifacts: Path  # where the server puts artifacts that clients upload through it


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """An `mlflow server` process for the session: SQLite behind it, artifacts proxied (clients never
    see the artifact folder), as a cluster's tracking server is. Tests pass `.url` as the tracking URI."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    server = MlflowServer(f"http://127.0.0.1:{port}", folder / "mlflow.db", folder / "artifacts")
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--backend-store-uri", f"sqlite:///{server.backend_store}",
         "--serve-artifacts", "--artifacts-destination", str(server.artifacts)],
        stdout=log, stderr=subprocess.STDOUT,
        # No job runner: its seven huey consumer processes (~17 CPU-seconds per server) serve GenAI jobs, not runs.
        env=os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # its own process group: stopping it stops its uvicorn workers too
    )
    deadline = time.monotonic() + MLFLOW_SERVER_START_S
    while not _answers(server.url):
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield server
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()


def build_smoke_labels(data: Path, num_samples: int, out_dir: Path) -> Path:
    """Real concept labels (random smoke-sized teacher and SAE, seed 0) for the first samples of the smoke windows."""
    import torch

    from cocomix_core.concepts.labels import ConceptExtractor, build_label_cache
    from cocomix_core.concepts.sae import TopKSAE
    from cocomix_core.data.corpus import load_split
    from cocomix_core.data.windows import TrainWindows
    from cocomix_core.model.build import build_model

    settings = load_settings("smoke")
    teacher = build_model("ntp", settings.teacher.model, settings.data.block_size, seed=0)
    torch.manual_seed(0)
    sae = TopKSAE(settings.sae.num_latents, settings.teacher.model.width, settings.sae.k)
    windows = TrainWindows(load_split(data, "train"), settings.data.block_size, settings.data.window_seed)
    return build_label_cache(ConceptExtractor(teacher, sae, settings.sae.layer_index), windows, num_samples, 16,
                             settings.concepts.labels_per_token, out_dir, provenance={"teacher": "random smoke"})


@pytest.fixture(scope="session")
def smoke_label_cache(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real concept labels for the first 16 samples (4 smoke steps × batch 4) of the smoke windows."""
    return build_smoke_labels(smoke_data, 4 * 4, tmp_path_factory.mktemp("labels"))


def answer_ctrl_c() -> None:
    """In a child process: Ctrl-C raises KeyboardInterrupt, as in a terminal. A shell that starts pytest in the
    background (`pytest &` without job control) leaves SIGINT ignored, and children inherit that."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def smoke_trainer_args(arm: str, overrides: list[str], data: Path, out: Path, labels: Path | None) -> list[str]:
    """Arguments of `python -m cocomix_core.training.trainer` for one smoke-preset arm, one torch thread per process."""
    args = ["--settings", "smoke", "--arm", arm, "--data", str(data), "--out", str(out), "--threads", "1"]
    for override in overrides:
        args += ["--set", override]
    return args + (["--labels", str(labels)] if labels is not None else [])
