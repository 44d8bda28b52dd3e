"""CoCoMix against next-token prediction, as one traceable experiment.

    python flows/cocomix_flow.py run                               # the `cpu` preset, ~10 min on 2 cores
    python flows/cocomix_flow.py run --settings smoke --set 'train.steps=8; eval.limit=4'
    python flows/cocomix_flow.py resume                            # after a failed step
    python flows/cocomix_flow.py card server                       # the report card
    mlflow ui --backend-store-uri sqlite:///<project>/mlruns.db    # every run, metric and artifact

Graph: start -> prepare -> concepts -> train (a foreach over branches: arm × seed × λ, in parallel)
       -> evaluate (a nested foreach over that branch's checkpoints) -> join_checkpoints -> report -> end
A branch's checkpoints are evaluated as soon as it finishes, while other branches still train.

Settings. `--settings` names a preset or a YAML file; `--set` holds dotted overrides, either
`;`-separated (`'train.lr=3e-4; train.steps=100'`) or a JSON list. Both are validated when
this file is imported, so a bad value fails before any step runs. Step decorators take their
resources from these settings; commands that carry no `--settings` (`resume`,
`argo-workflows create`) read $COCOMIX_SETTINGS / $COCOMIX_SET instead (cocomix_core/launch.py).

Lineage. `start` creates the MLflow experiment (once: tasks creating a SQLite store's schema
or an experiment side by side corrupt it), the parent run, one child run per training
branch (so a retried or resumed branch keeps logging into one run, and evaluation adds its
metrics there at each checkpoint's step) and the `evaluation` run; the `prepare`, `teacher`
and `sae` runs are created by the steps doing that work. Runs carry the lineage tags of the
task that created them (a branch's run: of the task that trained it); every step keeps the
MLflow run ids as artifacts. A `resume` clones the steps that finished (their code does not
run, so they log nothing twice) and, with them, the run ids: resumed steps log into the
origin's parent, branch and evaluation runs; runs they create or train into are tagged
`metaflow.origin_run_id`, and `end` tags the parent with both ids. Metaflow
links the two runs itself (the resumed run's origin-run-id).

Storage. Shards, checkpoints and caches live under a storage root (`compute.storage_root`;
default: <project>/artifacts, or next to an S3 datastore) at keys derived from what they
contain, so a rerun skips work already done: data/<data settings>, teacher/…, sae/…,
labels/…; training folders live at runs/<origin run id>/<branch>, so a retried or resumed
branch continues from its own last checkpoint. Metaflow artifacts hold only URIs, digests,
run ids and metric summaries.

Test hook. COCOMIX_FAIL_ONCE=<step>[,<step>...] makes the first task of each named step raise
once per experiment (a marker file in the temp folder, keyed by the origin run id, remembers
it), so tests can exercise `@retry` (train) and `resume` (any other step).
"""

from __future__ import annotations

import getpass
import os


def _user_name() -> str:
    """Who runs the flow, for Metaflow's namespaces; "cocomix" where there is no real user name."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no USER/LOGNAME and no passwd entry, as in some containers
        name = ""
    return name if name and name != "root" else "cocomix"


# Metaflow refuses to run without a user name, and does not accept "root" as one (containers).
os.environ.setdefault("METAFLOW_USER", _user_name())

import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, Iterator  # noqa: E402

import yaml  # noqa: E402
from metaflow import FlowSpec, Parameter, card, current, package_sources, resources, retry, step  # noqa: E402
from metaflow.cards import Image, Markdown  # noqa: E402

from cocomix_core.launch import OVERRIDES_ENV, SETTINGS_ENV, parse_overrides, settings_source  # noqa: E402
from settings import ExperimentSettings, SettingsError, load_settings, validate_settings  # noqa: E402

if TYPE_CHECKING:  # heavy imports (torch, mlflow, boto3) happen inside the steps that need them
    from cocomix_core.storage import Storage
    from cocomix_core.tracking import MlflowTracker

FAIL_ONCE_ENV = "COCOMIX_FAIL_ONCE"
SAE_FILE = "sae.safetensors"
TASKS_DIR = "lm_tasks"  # the offline lm-eval tasks, inside the prepared data folder
SAE_METRICS_FILE = "metrics.json"


def _launch_settings() -> ExperimentSettings:
    """The settings this process was started with, validated now so a bad value fails before any step."""
    source, overrides = settings_source()
    # Step processes inherit these, so their decorators see the same settings as this one.
    os.environ[SETTINGS_ENV], os.environ[OVERRIDES_ENV] = source, overrides
    try:
        settings = load_settings(source, parse_overrides(overrides))
    except (SettingsError, ValueError) as error:
        sys.exit(f"cocomix_flow: {error}")
    if settings.compute.train.nodes > 1:
        # The launcher builds multi-node commands, but the graph has no @parallel step yet: refuse
        # rather than silently train on one node.
        sys.exit(
            f"cocomix_flow: compute.train.nodes={settings.compute.train.nodes}: multi-node training is not wired "
            "into the flow yet; use nodes=1 (all GPUs of one node) or run cocomix_core.train under your own launcher"
        )
    return settings


LAUNCH = _launch_settings()


def _resources(kind: str) -> dict[str, int]:
    """@resources arguments of one kind of step (prepare, concepts, train, evaluate) from the settings."""
    spec = getattr(LAUNCH.compute, kind)
    gpus = {"gpu": spec.gpus} if spec.gpus else {}  # an explicit 0 would still add a GPU limit to pod specs
    return {"cpu": spec.cpus, "memory": spec.memory_mb} | gpus


@package_sources(["../cocomix_core", "../settings"], suffixes=".py,.yaml")  # remote steps import the library
class CocomixFlow(FlowSpec):
    """Train NTP and CoCoMix side by side, evaluate every checkpoint, report tokens-to-match."""

    settings_name = Parameter(
        "settings", default=os.environ[SETTINGS_ENV], help="preset name or YAML file (see settings/presets)"
    )
    overrides = Parameter(
        "set",
        default=os.environ[OVERRIDES_ENV],
        help="dotted overrides: 'train.lr=3e-4; train.steps=100' or a JSON list of key=value strings",
    )

    # ------------------------------------------------------------------ steps

    @step
    def start(self) -> None:
        """Validate the settings; create the MLflow experiment, the parent run and one run per branch."""
        from cocomix_core import tracking
        from cocomix_core.storage import default_storage_root
        from settings import dump_yaml, flat_params, settings_digest, training_branches

        settings = load_settings(self.settings_name, parse_overrides(self.overrides))
        self.settings_yaml = dump_yaml(settings)  # every later step (and a resume) uses exactly these
        self.settings_digest = settings_digest(settings)
        if settings.compute != LAUNCH.compute:  # e.g. a deployed flow triggered with other settings
            print(f"warning: step resources come from {os.environ[SETTINGS_ENV]!r} settings, not these; "
                  f"set {SETTINGS_ENV}/{OVERRIDES_ENV} to match when deploying", file=sys.stderr)
        self.branches = [branch.model_dump() for branch in training_branches(settings)]
        self.storage_root = settings.compute.storage_root or default_storage_root(self._datastore_root())
        self.tracking_uri = tracking.resolve_tracking_uri(settings.tracking.mlflow_uri)
        self.experiment_id = tracking.ensure_experiment(settings.tracking.experiment_name, self.tracking_uri)
        self.parent_run_id = tracking.create_run(
            self.experiment_id, f"{current.flow_name}/{current.run_id}", tags=self._tags(),
            tracking_uri=self.tracking_uri,
        )
        tracking.MlflowTracker(self.parent_run_id, self.tracking_uri).log_params(flat_params(settings))
        self.branch_run_ids = {
            branch["name"]: tracking.create_run(
                self.experiment_id,
                f"train/{branch['name']}",
                parent_run_id=self.parent_run_id,
                tags=self._tags() | {"cocomix.branch": branch["name"], "cocomix.kind": branch["kind"]},
                tracking_uri=self.tracking_uri,
            )
            for branch in self.branches
        }
        self.evaluation_run_id = tracking.create_run(
            self.experiment_id, "evaluation", parent_run_id=self.parent_run_id, tags=self._tags(),
            tracking_uri=self.tracking_uri,
        )
        tracking.MlflowTracker(self.evaluation_run_id, self.tracking_uri).log_params(_section_params(settings, "eval"))
        self.next(self.prepare)

    @resources(**_resources("prepare"))
    @step
    def prepare(self) -> None:
        """Corpus -> token shards + manifest, and the offline lm-eval tasks (skipped when already prepared)."""
        from cocomix_core import data, offline_tasks

        settings = self._settings()
        self.data_key = _cache_key("data", settings.data.model_dump(mode="json"), settings.tokenizer.name)
        with self._child_run("prepare", params=_section_params(settings, "data")) as tracker, self._stored(
            self.data_key
        ) as folder:
            with self._timed("prepare_corpus"):
                manifest = data.prepare_corpus(settings.data, folder)
            with self._timed("build_offline_tasks"):
                offline_tasks.build_offline_tasks(
                    folder, folder / TASKS_DIR, settings.data.offline_task_items, settings.data.split_seed
                )
            self.data_digest = data.data_digest(manifest)
            self.data_summary = {split: counts["tokens"] for split, counts in manifest["splits"].items()}
            tracker.log_metrics({f"data/{split}_tokens": tokens for split, tokens in self.data_summary.items()}, step=0)
            self._log_dataset(tracker.run_id, manifest)
        self.prepare_run_id = tracker.run_id
        self.next(self.concepts)

    @resources(**_resources("concepts"))
    @step
    def concepts(self) -> None:
        """The concept teacher and its SAE (pretrained, or trained on the corpus), and the label cache."""
        from cocomix_core.train import keep_freed_memory, set_threads
        from settings import training_branches

        settings = self._settings()
        set_threads(self._threads(settings, "concepts", parallel_tasks=1))
        if settings.train.keep_freed_memory:  # the teacher and SAE passes reallocate big tensors like training does
            keep_freed_memory()
        self.teacher_key, self.teacher_run_id = self._train_teacher(settings)
        self.sae_key, self.sae_run_id = self._train_sae(settings)
        # Only CoCoMix branches read labels; a run of NTP arms alone needs none.
        needs_labels = any(branch.kind == "cocomix" for branch in training_branches(settings))
        cached = needs_labels and settings.concepts.label_source == "cache"
        self.labels_key = self._label_cache(settings) if cached else None
        self.next(self.train, foreach="branches")

    @resources(**_resources("train"))
    @retry(times=LAUNCH.compute.train.retries, minutes_between_retries=0)
    @step
    def train(self) -> None:
        """Train one branch into its run folder, continuing from its last checkpoint when retried or resumed."""
        from cocomix_core import tracking

        settings = self._settings()
        self.branch = self.input
        self._fail_once()
        run_id = self.branch_run_ids[self.branch["name"]]
        key = f"runs/{self._origin_run_id()}/{self.branch['name']}"
        with tracking.active_run(run_id, self.tracking_uri) as tracker:
            tracker.set_tags(self._tags())  # the branch's run now points at the task that trains it
            tracker.log_params(_section_params(settings, "train") | _branch_params(settings, self.branch))
            self._log_dataset(run_id, self._data_manifest())
            with self._stored(key, resumable=True) as out_dir:
                with self._timed("train"):
                    self._run_trainer(settings, out_dir, tracker)
                self.checkpoints = _publish_checkpoints(out_dir, key, self._storage())
            tracking.log_checkpoints(tracker, self.checkpoints, self._scratch("checkpoints"))
        self.next(self.evaluate, foreach="checkpoints")

    @resources(**_resources("evaluate"))
    @step
    def evaluate(self) -> None:
        """Validation perplexity and the lm-eval tasks of one checkpoint, logged at its step in the branch's run."""
        from cocomix_core import evaluate, tracking
        from cocomix_core.train import set_threads

        settings = self._settings()
        self.eval_job = {"branch": self.branch, **self.input}
        name = self.branch["name"]
        # Every checkpoint of every branch may be under evaluation at once on this machine.
        set_threads(self._threads(settings, "evaluate", len(self.branches) * len(self.checkpoints)))
        data_dir = self._data_dir()
        with self._timed("evaluate_checkpoint"):
            results = evaluate.evaluate_checkpoint(
                self._storage().materialize(self.eval_job["key"]), data_dir, data_dir / TASKS_DIR, settings.eval,
                settings.data.block_size,
            )
        self.metrics = evaluate.tracker_metrics(results)
        # In the branch's run, MLflow's compare view charts both arms on one axis; the evaluation run groups them all.
        for run_id, prefix in ((self.branch_run_ids[name], ""), (self.evaluation_run_id, f"{name}/")):
            tracker = tracking.MlflowTracker(run_id, self.tracking_uri)
            named = {prefix + metric: value for metric, value in self.metrics.items()}
            tracker.log_metrics(named, step=self.eval_job["step"])
            tracker.close()
        self.next(self.join_checkpoints)

    @step
    def join_checkpoints(self, inputs: Any) -> None:
        """Gather one branch's evaluations."""
        self.merge_artifacts(inputs, include=_SHARED_ARTIFACTS + ["branch"])
        self.evaluations = [(task.eval_job, task.metrics) for task in inputs]
        self.next(self.report)

    @card(type="blank")
    @step
    def report(self, inputs: Any) -> None:
        """Per-branch curves against training tokens, tokens-to-match, table and plots: MLflow artifacts and a card."""
        from cocomix_core import report, tracking

        self.merge_artifacts(inputs, include=_SHARED_ARTIFACTS)
        self._fail_once()
        out_dir = self._scratch("report")
        with self._timed("write_report"):
            curves = report.curves_from_results(evaluation for task in inputs for evaluation in task.evaluations)
            written = report.write_report(curves, out_dir)
        self.report_summary = written.summary
        tracking.MlflowTracker(self.parent_run_id, self.tracking_uri).log_artifact(out_dir, "report")  # unbatched
        tracking.end_run(self.evaluation_run_id, "FINISHED", self.tracking_uri)
        current.card.append(Markdown(written.markdown_path.read_text()))
        for plot in written.plots:
            current.card.append(Image(plot.read_bytes(), label=plot.stem))
        self.next(self.end)

    @step
    def end(self) -> None:
        """Close the parent MLflow run."""
        from cocomix_core import tracking

        tracker = tracking.MlflowTracker(self.parent_run_id, self.tracking_uri)
        if current.origin_run_id:  # the parent was created by the origin run; record who finished it
            tracker.set_tags(
                {"metaflow.origin_run_id": current.origin_run_id, "metaflow.resumed_run_id": current.run_id}
            )
        tracker.log_metrics({f"report/{name}": value for name, value in self.report_summary.items()}, step=0)
        tracker.close()
        tracking.end_run(self.parent_run_id, "FINISHED", self.tracking_uri)

    # ------------------------------------------------------------------ concepts and training

    def _train_teacher(self, settings: ExperimentSettings) -> tuple[str | None, str]:
        """Train the small teacher (cached by data and job digest).

        Returns its storage key (None for a pretrained teacher) and its MLflow run id.
        """
        from cocomix_core.models import teacher_job
        from cocomix_core.train import train

        params = _section_params(settings, "teacher")
        with self._child_run("teacher", params=params) as tracker:
            if settings.teacher.pretrained:
                return None, tracker.run_id
            job = teacher_job(settings)
            key = _cache_key("teacher", self.data_digest, job.digest())
            self._log_dataset(tracker.run_id, self._data_manifest())
            with self._stored(key, resumable=True) as out_dir, self._timed("train_teacher"):
                threads = self._threads(settings, "concepts", 1)
                train(job, self._data_dir(), out_dir, tracker=tracker, num_threads=threads)
            tracker.set_tags({"cocomix.storage_uri": self._storage().uri(key)})
        return key, tracker.run_id

    def _train_sae(self, settings: ExperimentSettings) -> tuple[str | None, str]:
        """Train the SAE on the teacher's residual stream (cached by data, teacher and SAE settings).

        Returns its storage key (None for a pretrained SAE) and its MLflow run id.
        """
        from cocomix_core import sae as sae_io
        from cocomix_core.fileio import write_json_atomic

        self.sae_metrics: dict[str, float] = {}
        with self._child_run("sae", params=_section_params(settings, "sae")) as tracker:
            if settings.sae.pretrained:
                return None, tracker.run_id
            key = _cache_key("sae", self.data_digest, self._teacher_ref(settings), settings.sae.model_dump(mode="json"))
            with self._stored(key) as folder:
                if not (folder / SAE_FILE).is_file():
                    with self._timed("train_sae"):
                        teacher = self._teacher_ref(settings, local=True)
                        trained, metrics = _fit_sae(settings, teacher, self._data_dir(), tracker)
                    write_json_atomic(folder / SAE_METRICS_FILE, metrics)
                    sae_io.save_sae(trained, folder / SAE_FILE)
                metrics = json.loads((folder / SAE_METRICS_FILE).read_text())
            self.sae_metrics = {name: metrics[name] for name in ("fvu", "dead_fraction", "mean_l0")}
            final = {f"sae/{name}": value for name, value in self.sae_metrics.items()}
            tracker.log_metrics(final, step=settings.sae.steps)
            tracker.set_tags({"cocomix.storage_uri": self._storage().uri(key)})
        return key, tracker.run_id

    def _label_cache(self, settings: ExperimentSettings) -> str:
        """One teacher pass over every training sample the branches will read, shared by all CoCoMix branches."""
        from cocomix_core.concepts import build_label_cache

        provenance = {"data": self.data_digest, "teacher": self._teacher_ref(settings), "sae": self._sae_ref(settings),
                      "layer_index": settings.sae.layer_index}
        key = _cache_key("labels", provenance, settings.concepts.model_dump(mode="json"), settings.train.steps,
                         settings.train.batch_size)
        with self._stored(key) as folder, self._timed("build_label_cache"):
            build_label_cache(
                self._extractor(settings), _train_windows(settings, self._data_dir()),
                num_samples=settings.train.steps * settings.train.batch_size,
                batch_size=settings.concepts.extract_batch_size, k=settings.concepts.labels_per_token,
                out_dir=folder, provenance=provenance,
            )
        return key

    def _run_trainer(self, settings: ExperimentSettings, out_dir: Path, tracker: MlflowTracker) -> None:
        """Train this branch: in-process on CPUs or one GPU; under `accelerate launch` over several GPUs."""
        import subprocess

        import torch

        from cocomix_core.launch import training_command
        from cocomix_core.models import job_for_branch
        from cocomix_core.train import train
        from settings import Branch

        gpus = min(settings.compute.train.gpus, torch.cuda.device_count())
        cocomix = self.branch["kind"] == "cocomix"
        if gpus > 1:
            settings_file = self._scratch("settings") / "settings.yaml"
            settings_file.write_text(self.settings_yaml)
            args = ["--settings", str(settings_file), "--arm", self.branch["name"], "--data", str(self._data_dir()),
                    "--out", str(out_dir), "--mlflow-run-id", tracker.run_id]
            if cocomix and self.labels_key:
                args += ["--labels", str(self._storage().materialize(self.labels_key))]
            elif cocomix:
                args += ["--teacher", self._teacher_ref(settings, local=True)]
                args += ["--sae", self._sae_ref(settings, local=True)]
            environment = os.environ | {"MLFLOW_TRACKING_URI": self.tracking_uri}
            subprocess.run(training_command(args, gpus=gpus), check=True, env=environment)
            return
        labels = self._labels(settings) if cocomix else None
        job = job_for_branch(settings, Branch(**self.branch))
        threads = self._threads(settings, "train", len(self.branches))
        train(job, self._data_dir(), out_dir, tracker=tracker, labels=labels, num_threads=threads)

    def _labels(self, settings: ExperimentSettings) -> Any:
        """What a CoCoMix branch reads its labels from: the shared cache, or the extractor itself (online)."""
        from cocomix_core.concepts import LabelCache

        if self.labels_key:
            return LabelCache(self._storage().materialize(self.labels_key))
        return self._extractor(settings)

    def _extractor(self, settings: ExperimentSettings) -> Any:
        from cocomix_core.concepts import ConceptExtractor, load_teacher
        from cocomix_core.sae import load_sae

        teacher = load_teacher(self._teacher_ref(settings, local=True))
        return ConceptExtractor(teacher, load_sae(self._sae_ref(settings, local=True)), settings.sae.layer_index)

    def _teacher_ref(self, settings: ExperimentSettings, local: bool = False) -> str:
        """The teacher's HF name, or its storage URI (`local`: a local folder of its final checkpoint)."""
        from cocomix_core.checkpoints import final_checkpoint

        if self.teacher_key is None:
            return settings.teacher.pretrained
        if local:
            return str(final_checkpoint(self._storage().materialize(self.teacher_key)))
        return self._storage().uri(self.teacher_key)

    def _sae_ref(self, settings: ExperimentSettings, local: bool = False) -> str:
        """The SAE's file or URL, or its storage URI (`local`: a local file)."""
        if self.sae_key is None:
            return settings.sae.pretrained
        if local:
            return str(self._storage().materialize(self.sae_key) / SAE_FILE)
        return f"{self._storage().uri(self.sae_key)}/{SAE_FILE}"

    def _threads(self, settings: ExperimentSettings, kind: str, parallel_tasks: int) -> int:
        from cocomix_core.launch import cpu_threads

        return cpu_threads(parallel_tasks, configured=settings.train.cpu_threads,
                           reserved=getattr(settings.compute, kind).cpus)

    def _data_dir(self) -> Path:
        return self._storage().materialize(self.data_key)

    @contextlib.contextmanager
    def _stored(self, key: str, resumable: bool = False) -> Iterator[Path]:
        """A local folder holding what storage has at `key` (if anything), published back when the block succeeds.

        `resumable` folders (a trainer's: every checkpoint in them is written atomically) are
        published even when the block fails, so a retry on another node continues from them.
        """
        storage = self._storage()
        folder = storage.materialize(key) if storage.exists(key) else storage.local_workdir(key)
        try:
            yield folder
        except Exception:
            if resumable:
                storage.publish(folder, key)
            raise
        storage.publish(folder, key)

    def _scratch(self, name: str) -> Path:
        """A fresh local folder (under $TMPDIR) for this task's small files."""
        return Path(tempfile.mkdtemp(prefix=f"cocomix-{name}-"))

    # ------------------------------------------------------------------ helpers
    # Small pieces shared by the steps above; all real work happens in cocomix_core.

    def _settings(self) -> ExperimentSettings:
        """The settings resolved in `start` (not re-read from presets that may have changed since)."""
        return validate_settings(yaml.safe_load(self.settings_yaml))

    def _storage(self) -> Storage:
        from cocomix_core.storage import Storage

        return Storage(self.storage_root)

    def _datastore_root(self) -> str:
        # Metaflow has no public accessor for the datastore a run writes to; storage sits beside it.
        return self._datastore.parent_datastore.datastore_root

    def _origin_run_id(self) -> str:
        """The run this experiment started as: the same for a run and all its resumes."""
        return current.origin_run_id or current.run_id

    def _tags(self) -> dict[str, str]:
        """Lineage tags of this task, for the MLflow runs it creates or trains into."""
        from cocomix_core.tracking import lineage_tags

        return lineage_tags(
            flow=current.flow_name, run_id=current.run_id, step=current.step_name, task_pathspec=current.pathspec,
            settings_digest=self.settings_digest, origin_run_id=current.origin_run_id,
        )

    @contextlib.contextmanager
    def _child_run(self, name: str, params: dict[str, str] | None = None) -> Iterator[MlflowTracker]:
        """A child run of the parent for this task's piece of work, ended FINISHED or FAILED with the block."""
        from cocomix_core.tracking import tracked_run

        with tracked_run(
            self.experiment_id, name, parent_run_id=self.parent_run_id, tags=self._tags(), params=params,
            tracking_uri=self.tracking_uri,
        ) as tracker:
            yield tracker

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        """Record seconds spent inside a library call in artifact `library_seconds` (read by the benchmark).

        Keys are "<step>/<call>": a task inherits its parents' entries, and only its own step's are its own.
        """
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.library_seconds = dict(getattr(self, "library_seconds", {}), **{f"{current.step_name}/{name}": seconds})

    def _fail_once(self) -> None:
        """The test hook: raise if COCOMIX_FAIL_ONCE (comma-separated step names) names this step and it has not
        failed in this experiment yet."""
        if current.step_name not in os.environ.get(FAIL_ONCE_ENV, "").split(","):
            return
        name = f"cocomix-failed-{current.flow_name}-{self._origin_run_id()}-{current.step_name}"
        marker = Path(tempfile.gettempdir()) / name
        with contextlib.suppress(FileExistsError):
            marker.open("x").close()  # exclusive create: only the first task of the step fails
            raise RuntimeError(f"{FAIL_ONCE_ENV}={current.step_name}: failing this step once, as asked")

    def _data_manifest(self) -> dict[str, Any]:
        from cocomix_core.data import load_manifest

        return load_manifest(self._storage().materialize(self.data_key))

    def _log_dataset(self, run_id: str, manifest: dict[str, Any]) -> None:
        from cocomix_core.tracking import log_dataset_input

        log_dataset_input(
            run_id, name=f"corpus:{manifest['source']}", digest=self.data_digest,
            source=self._storage().uri(self.data_key), profile={"splits": manifest["splits"]},
            tracking_uri=self.tracking_uri,
        )


# Artifacts every branch of a foreach carries unchanged; joins take them from any input.
_SHARED_ARTIFACTS = [
    "settings_yaml", "settings_digest", "branches", "storage_root", "tracking_uri", "experiment_id", "parent_run_id",
    "branch_run_ids", "evaluation_run_id", "data_key", "data_digest", "data_summary", "prepare_run_id",
    "teacher_key", "teacher_run_id", "sae_key", "sae_run_id", "sae_metrics", "labels_key",
]


def _publish_checkpoints(out_dir: Path, key: str, storage: Storage) -> list[dict[str, Any]]:
    """Publish each checkpoint of a run folder at its own key (evaluation fetches one, not the run); list them."""
    from cocomix_core.checkpoints import checkpoint_info, list_checkpoints

    listing = []
    for folder in list_checkpoints(out_dir):
        info = checkpoint_info(folder)
        checkpoint_key = f"{key}/{folder.relative_to(out_dir).as_posix()}"
        listing.append({"step": int(info["step"]), "tokens_seen": int(info["tokens_seen"]), "key": checkpoint_key,
                        "uri": storage.publish(folder, checkpoint_key)})
    return listing


def _train_windows(settings: ExperimentSettings, data_dir: Path) -> Any:
    """The training windows every branch reads (same seed), so cached labels line up with their samples."""
    from cocomix_core.data import load_split
    from cocomix_core.windows import TrainWindows

    return TrainWindows(load_split(data_dir, "train"), settings.data.block_size, settings.data.window_seed)


def _fit_sae(
    settings: ExperimentSettings, teacher: str, data_dir: Path, tracker: MlflowTracker
) -> tuple[Any, dict[str, Any]]:
    """Train the SAE with the settings' knobs; progress goes to `tracker` at the SAE's step."""
    from cocomix_core.concepts import load_teacher
    from cocomix_core.sae_training import SAETrainConfig, train_sae

    sae = settings.sae
    batch_tokens = sae.batch_size * settings.data.block_size
    config = SAETrainConfig(
        num_latents=sae.num_latents, k=sae.k, steps=sae.steps, batch_tokens=batch_tokens, lr=sae.lr,
        aux_k=sae.aux_k, aux_coef=sae.aux_coef, dead_steps_threshold=max(1, sae.dead_after_tokens // batch_tokens),
        teacher_batch_size=sae.batch_size, seed=sae.seed,
    )

    def log(record: dict[str, Any]) -> None:
        tracker.log_metrics({f"sae/{name[4:]}": value for name, value in record.items() if name != "sae_step"},
                            step=int(record["sae_step"]))

    return train_sae(load_teacher(teacher), _train_windows(settings, data_dir), sae.layer_index, config, log_fn=log)


def _cache_key(kind: str, *parts: Any) -> str:
    """A storage key for a cached product: its kind plus a digest of everything it is computed from."""
    from cocomix_core.fileio import sha256_json

    return f"{kind}/{sha256_json(parts)[:16]}"


def _section_params(settings: ExperimentSettings, *sections: str) -> dict[str, str]:
    from settings import flat_params

    return {key: value for key, value in flat_params(settings).items() if key.split(".", 1)[0] in sections}


def _branch_params(settings: ExperimentSettings, branch: dict[str, Any]) -> dict[str, str]:
    """The branch's own settings (its arm, seed, λ) as params of its MLflow run."""
    prefix = f"arms.{branch['arm']}."
    arm = {f"arm.{key.removeprefix(prefix)}": value for key, value in _section_params(settings, "arms").items()
           if key.startswith(prefix)}
    return arm | {f"branch.{key}": str(value) for key, value in branch.items()}


if __name__ == "__main__":
    CocomixFlow()
