"""CoCoMix against next-token prediction, as one traceable experiment.

    python flows/cocomix_flow.py run                               # the `cpu` preset, ~10 min on 2 cores
    python flows/cocomix_flow.py run --settings smoke --set 'train.steps=8; eval.limit=4'
    python flows/cocomix_flow.py resume                            # after a failed step
    python flows/cocomix_flow.py card view <run id>/report --id report   # the report card, as an HTML file
    mlflow ui --backend-store-uri sqlite:///$PWD/mlruns.db         # every run (beside .metaflow)

Graph: start -> prepare -> concepts -> train (a foreach over branches: arm × seed × λ, in parallel)
       -> train_one_node (compute.train.nodes == 1: a plain step, one pod or job)
          | launch_gang -> train_gang (@parallel: the nodes train the branch together) -> join_gang
       -> trained -> evaluate (a nested foreach over that branch's checkpoints) -> join_checkpoints
       -> report -> end
`train` picks the path with Metaflow's split-switch, so a one-node branch never needs a gang
scheduler: on Kubernetes a gang is a JobSet (a controller many clusters lack), on AWS Batch a
multi-node parallel job (which Fargate refuses); locally it is N processes of this machine.
Node 0 of a gang logs to the branch's MLflow run and publishes its checkpoints; the others only
train. A branch's checkpoints are evaluated as soon as it is trained, while other branches
still train.
Each step is orchestration only: it reads the settings, calls one stage of cocomix_core/stages.py
(which runs the same without Metaflow), prints the stage's note (what it did, or why it did
nothing) and keeps the stage's small result as an artifact. The foreach values are short names
(`cocomix-s0-lam0.1`, `step_000040`: readable labels in the Metaflow UI); the full branches and
checkpoints are the `branches` and `checkpoints` artifacts, keyed by those names.

Settings. `--settings` names a preset or a YAML file; `--set` holds dotted overrides, either
`;`-separated (`'train.lr=3e-4; train.steps=100'`) or a JSON list. Both are validated when
this file is imported, so a bad value fails before any step runs. Step decorators take their
resources from these settings; commands that carry no `--settings` (`resume`,
`argo-workflows create`) read $COCOMIX_SETTINGS / $COCOMIX_SET instead (cocomix_core/plumbing/launch.py).

Lineage. `start` creates the MLflow experiment (once: tasks creating a SQLite store's schema
or an experiment side by side corrupt it), the parent run, one run per training branch (so a
retried or resumed branch keeps logging into one run, and evaluation adds its metrics there at each
checkpoint's step; top level, tagged `cocomix.experiment_run` = the parent's id, so MLflow's UI
lists and charts the branches without unfolding the parent) and the `evaluation` run; the `prepare`, `teacher`
and `sae` runs are created by the steps doing that work. Runs carry the lineage tags of the
task that created them (a branch's run: of the task that trained it); every step keeps the
MLflow run ids as artifacts. A `resume` clones the steps that finished (their code does not
run, so they log nothing twice) and, with them, the run ids: resumed steps log into the
origin's parent, branch and evaluation runs; runs they create or train into are tagged
`metaflow.origin_run_id`, and `end` tags the parent with both ids. Metaflow
links the two runs' tasks itself (origin-run-id); `end`, which a resume always runs (`start`
is cloned), gives the resumed run the Metaflow tag `origin_run:<origin run id>`.

Storage. Shards, checkpoints and caches live under a storage root (`compute.storage_root`;
default: `artifacts/` beside the local `.metaflow`, or next to an S3 datastore) at keys derived from what they
contain, so a rerun skips work already done: data/<data settings>, teacher/…, sae/…,
labels/…, teacher_logits/…; training folders live at runs/<origin run id>/<branch>, so a retried or resumed
branch continues from its own last checkpoint. Metaflow artifacts hold only URIs, digests,
run ids and metric summaries.

Test hook. COCOMIX_FAIL_ONCE=<step>[,<step>...] makes the first task of each named step raise
once per experiment (a marker file in the temp folder, keyed by the origin run id, remembers
it), so tests can exercise `@retry` (train_one_node, train_gang) and `resume` (any other step).
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
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, Callable, Iterator  # noqa: E402

import yaml  # noqa: E402
from metaflow import (  # noqa: E402
    FlowSpec,
    Parameter,
    card,
    current,
    package_sources,
    parallel,
    resources,
    retry,
    step,
)
from metaflow.cards import Image, Markdown  # noqa: E402

from cocomix_core import stages  # noqa: E402
from cocomix_core.plumbing.files import scratch_folder  # noqa: E402
from cocomix_core.plumbing.launch import (  # noqa: E402
    OVERRIDES_ENV,
    SETTINGS_ENV,
    parse_overrides,
    settings_source,
    threads_for,
)
from cocomix_core.plumbing.storage import Storage  # noqa: E402
from settings import ExperimentSettings, SettingsError, load_settings, validate_settings  # noqa: E402

if TYPE_CHECKING:  # heavy imports (torch, mlflow) happen inside the steps that need them
    from cocomix_core.plumbing.tracking import MlflowTracker

FAIL_ONCE_ENV = "COCOMIX_FAIL_ONCE"
CARD_TABLE_COLUMNS = 7  # columns per card table (the branch included): wider tables run off the page


def _launch_settings() -> ExperimentSettings:
    """The settings this process was started with, validated now so a bad value fails before any step."""
    source, overrides = settings_source()
    # Step processes inherit these, so their decorators see the same settings as this one.
    os.environ[SETTINGS_ENV], os.environ[OVERRIDES_ENV] = source, overrides
    try:
        settings = load_settings(source, parse_overrides(overrides))
    except (SettingsError, ValueError) as error:
        sys.exit(f"cocomix_flow: {error}")
    resources, batch = settings.compute.train, settings.train
    split = resources.nodes * resources.processes_per_node * batch.grad_accum_steps
    if batch.batch_size % split:
        # Every process of a gang takes an equal slice of each global batch; refuse before any step, not hours in.
        sys.exit(
            f"cocomix_flow: train.batch_size={batch.batch_size} does not split over compute.train.nodes="
            f"{resources.nodes} × {resources.processes_per_node} processes per node × train.grad_accum_steps="
            f"{batch.grad_accum_steps} = {split} micro-batches; choose values whose product divides it"
        )
    return settings


LAUNCH = _launch_settings()


def honest_step(body: Callable[..., None]) -> Callable[..., None]:
    """Run a step's body with third-party noise hushed and, once `start` made them, the parent and evaluation runs
    kept honest: ended KILLED (Ctrl-C, SIGTERM) or FAILED if the body does not finish, reopened when a retry or a
    resume runs it again. Placed under @step, so the step's own code stays as it is."""

    @functools.wraps(body)
    def run(self: FlowSpec, *inputs: Any) -> None:
        from cocomix_core.plumbing import interrupts, progress

        lineage = inputs[0][0] if inputs else self  # a join reads the run ids from any of its inputs
        with progress.quiet_third_party():
            if not hasattr(lineage, "parent_run_id"):  # `start`, before it creates the runs
                body(self, *inputs)
                return
            runs = [lineage.parent_run_id, lineage.evaluation_run_id]
            # Only a retry or a resume can find the runs ended by an earlier attempt; a first attempt skips
            # that check, and with it MLflow's import, in steps that do not log.
            if current.retry_count > 0 or current.origin_run_id is not None:
                from cocomix_core.plumbing.tracking import reopen_ended_runs

                reopen_ended_runs(runs, lineage.tracking_uri)
            with interrupts.settled_on_failure(functools.partial(_end_running_runs, runs, lineage.tracking_uri)):
                body(self, *inputs)

    return run


def _end_running_runs(run_ids: list[str], tracking_uri: str, status: str) -> None:
    """End those of `run_ids` still RUNNING with `status`; MLflow is imported only here, when a step failed."""
    from cocomix_core.plumbing.tracking import end_running_runs

    end_running_runs(run_ids, status, tracking_uri)


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
    @honest_step
    def start(self) -> None:
        """Validate the settings; create the MLflow experiment, the parent run and one run per branch."""
        from cocomix_core.plumbing import tracking
        from cocomix_core.plumbing.storage import default_storage_root
        from settings import dump_yaml, settings_digest, training_branches

        settings = load_settings(self.settings_name, parse_overrides(self.overrides))
        self.settings_yaml = dump_yaml(settings)  # every later step (and a resume) uses exactly these
        self.settings_digest = settings_digest(settings)
        if settings.compute != LAUNCH.compute:  # e.g. a deployed flow triggered with other settings
            print(f"warning: step resources come from {os.environ[SETTINGS_ENV]!r} settings, not these; "
                  f"set {SETTINGS_ENV}/{OVERRIDES_ENV} to match when deploying", file=sys.stderr)
        # The foreach runs over short names (readable labels in the UI); the full branches stay in `branches`.
        self.branches = {branch.name: branch.model_dump() for branch in training_branches(settings)}
        self.branch_names = list(self.branches)
        datastore_root = self._datastore_root()
        self.storage_root = settings.compute.storage_root or default_storage_root(datastore_root)
        # Beside the local datastore, not the installed package; with an S3 datastore, where the flow was started.
        home = Path(datastore_root).parent if not datastore_root.startswith("s3://") else None
        self.tracking_uri = tracking.resolve_tracking_uri(settings.tracking.mlflow_uri, home=home)
        self._preflight(settings)
        self.experiment_id = tracking.ensure_experiment(settings.tracking.experiment_name, self.tracking_uri)
        created: list[str] = []  # no later step ends these runs if start does not finish: it ends them FAILED
        with tracking.ended_on_failure(created, self.tracking_uri, reopen=False):
            self._create_runs(settings, created)
            self._fail_once()
        print(f"MLflow experiment {settings.tracking.experiment_name!r} at {self.tracking_uri}: parent run "
              f"{self.parent_run_id}, branches {', '.join(self.branch_names)}; storage at {self.storage_root}")
        self.next(self.prepare)

    @resources(**_resources("prepare"))
    @step
    @honest_step
    def prepare(self) -> None:
        """Corpus -> token shards + manifest, and the offline lm-eval tasks (reused when already prepared); the
        unigram floor goes to the prepare run and the parent run."""
        from cocomix_core.plumbing.tracking import MlflowTracker

        settings = self._settings()
        with self._child_run("prepare", params=stages.section_params(settings, "data")) as tracker:
            with self._timed("prepare_data"):
                self.data = stages.prepare_data(settings, self._storage(), tracker)
        self.prepare_run_id = tracker.run_id
        parent = MlflowTracker(self.parent_run_id, self.tracking_uri)
        parent.log_metrics(self.data.floor_metrics(), step=0)
        parent.flush()
        print(self.data.note)
        self.next(self.concepts)

    @resources(**_resources("concepts"))
    @step
    @honest_step
    def concepts(self) -> None:
        """The concept teacher and its SAE (pretrained, or trained on the corpus); the label caches of the CoCoMix
        arms (one per label selection) and the teacher-logit caches of the KD arms (one per τ and top-k)."""
        from cocomix_core.training.trainer import keep_freed_memory, set_threads

        settings, storage = self._settings(), self._storage()
        set_threads(threads_for(settings, "concepts", parallel_tasks=1))
        if settings.train.keep_freed_memory:  # the teacher and SAE passes reallocate big tensors like training does
            keep_freed_memory()
        with self._child_run("teacher", params=stages.section_params(settings, "teacher")) as tracker:
            with self._timed("obtain_teacher"):
                self.teacher = stages.obtain_teacher(settings, storage, self.data, tracker)
        self.teacher_run_id = tracker.run_id
        with self._child_run("sae", params=stages.section_params(settings, "sae")) as tracker:
            with self._timed("fit_sae"):
                self.sae = stages.fit_sae(settings, storage, self.data, self.teacher, tracker)
        self.sae_run_id = tracker.run_id
        with self._timed("build_labels"):
            self.labels = stages.build_labels(settings, storage, self.data, self.teacher, self.sae)
        with self._timed("build_teacher_logits"):
            self.teacher_logits = stages.build_teacher_logits(settings, storage, self.data, self.teacher)
        print("\n".join((self.teacher.note, self.sae.note, self.labels.note, self.teacher_logits.note)))
        self.next(self.train, foreach="branch_names")

    @step
    @honest_step
    def train(self) -> None:
        """One branch (arm × seed × λ): one node trains it in a plain step, several in a gang. A one-node branch
        thus never needs a gang scheduler (Kubernetes' JobSet controller, AWS Batch's multi-node jobs)."""
        self.branch = self.branches[self.input]
        self.branch_index = self.index  # offsets the gang's rendezvous port: local gangs share one machine
        self.nodes = self._settings().compute.train.nodes
        self.placement = "gang" if self.nodes > 1 else "one_node"
        print(f"{self.input}: training on {self.nodes} node{'s' if self.nodes > 1 else ''}")
        self.next({"one_node": self.train_one_node, "gang": self.launch_gang}, condition="placement")

    @resources(**_resources("train"))
    @retry(times=LAUNCH.compute.train.retries, minutes_between_retries=0)
    @step
    @honest_step
    def train_one_node(self) -> None:
        """The branch on one node (a plain pod or job): it logs to MLflow and publishes the checkpoints. A retried
        or resumed task continues from the branch's last checkpoint."""
        self._train_node(stages.GangNode())
        self.next(self.trained)

    @step
    @honest_step
    def launch_gang(self) -> None:
        """Start the branch's gang of compute.train.nodes nodes (Metaflow: the step before @parallel sizes it)."""
        self.next(self.train_gang, num_parallel=self.nodes)

    @resources(**_resources("train"))
    @retry(times=LAUNCH.compute.train.retries, minutes_between_retries=0)
    @parallel
    @step
    @honest_step
    def train_gang(self) -> None:
        """One node of the branch's gang; node 0 logs to MLflow and publishes the checkpoints. A retried or
        resumed gang continues from the branch's last checkpoint."""
        self._train_node(stages.GangNode(index=current.parallel.node_index, nodes=current.parallel.num_nodes,
                                         main_ip=current.parallel.main_ip, port_offset=self.branch_index))
        self.next(self.join_gang)

    @step
    @honest_step
    def join_gang(self, inputs: Any) -> None:
        """The gang finished: keep what node 0 trained and published."""
        (main,) = [task for task in inputs if task.node_index == 0]
        self.merge_artifacts(inputs, include=_SHARED_ARTIFACTS + ["branch"])
        self.checkpoints = main.checkpoints
        self.library_seconds = main.library_seconds
        self.next(self.trained)

    @step
    @honest_step
    def trained(self) -> None:
        """Both training paths meet here; fan out over the branch's checkpoints (Metaflow: a join cannot also split)."""
        # The evaluate foreach runs over checkpoint names (step_000040); the checkpoints stay in `checkpoints`.
        self.checkpoint_names = list(self.checkpoints)
        self.next(self.evaluate, foreach="checkpoint_names")

    @resources(**_resources("evaluate"))
    @step
    @honest_step
    def evaluate(self) -> None:
        """Validation perplexity and the lm-eval tasks of one checkpoint (and a CoCoMix one's concept prediction),
        logged at its step in the branch's run and against the checkpoint's MLflow LoggedModel."""
        from cocomix_core.plumbing.tracking import MlflowTracker
        from settings import Branch

        settings = self._settings()
        self.checkpoint = self.checkpoints[self.input]
        # Every checkpoint of every branch may be under evaluation at once on this machine.
        parallel = len(self.branches) * len(self.checkpoints)
        with self._memory_reserved(settings.compute.evaluate.memory_mb):
            with self._timed("evaluate_checkpoint"):
                self.metrics, self.replicates = stages.evaluate_checkpoint_job(
                    settings, self._storage(), self.data, self.checkpoint, parallel)
            with self._timed("concept_prediction"):
                self.metrics |= stages.concept_prediction_job(settings, self._storage(), self.data, self.labels,
                                                              Branch(**self.branch), self.checkpoint)
        name = self.branch["name"]
        self.model_id = stages.checkpoint_model_id(  # the checkpoint in MLflow's Models tab, its metrics linked
            settings, Branch(**self.branch), self.checkpoint, self.experiment_id, self.branch_run_ids[name],
            self.parent_run_id, self.tracking_uri,
        )
        stages.log_evaluation(
            self.metrics, self.checkpoint, name, MlflowTracker(self.branch_run_ids[name], self.tracking_uri),
            MlflowTracker(self.evaluation_run_id, self.tracking_uri), model_id=self.model_id,
        )
        print(f"{name} {self.checkpoint.name} ({self.checkpoint.tokens_seen:,} tokens): "
              f"val ppl {self.metrics['eval/val_ppl']:.4g}")
        self.next(self.join_checkpoints)

    @step
    @honest_step
    def join_checkpoints(self, inputs: Any) -> None:
        """Gather one branch's evaluations."""
        self.merge_artifacts(inputs, include=_SHARED_ARTIFACTS + ["branch"])
        self.evaluations = [(task.checkpoint, task.metrics, task.replicates) for task in inputs]
        print(f"{self.branch['name']}: {len(self.evaluations)} checkpoint evaluations gathered")
        self.next(self.report)

    @card(type="blank", id="report")
    @step
    @honest_step
    def report(self, inputs: Any) -> None:
        """Per-branch curves against training tokens, tokens-to-match, table and plots: MLflow artifacts and a card."""
        from cocomix_core.plumbing import tracking
        from cocomix_core.reporting.card import plot_caption, split_wide_tables
        from settings import Branch

        self.merge_artifacts(inputs, include=_SHARED_ARTIFACTS)
        self._fail_once()
        evaluations = [(Branch(**task.branch), checkpoint, metrics, replicates)
                       for task in inputs for checkpoint, metrics, replicates in task.evaluations]
        with scratch_folder("report") as folder:  # the files live on as MLflow artifacts and in the card
            with self._timed("write_report"):
                written = stages.write_report(evaluations, folder, tracking.MlflowTracker(
                    self.parent_run_id, self.tracking_uri), self.data.unigram_ppl)
            self.report_summary = written.summary
            self.report_content = json.loads(written.json_path.read_text())  # the verdict `end` prints
            # The card opens with the verdict; wide tables are split to fit a page; plots are captioned in words.
            current.card.append(Markdown(split_wide_tables(written.markdown_path.read_text(), CARD_TABLE_COLUMNS)))
            for plot in written.plots:
                current.card.append(Image(plot.read_bytes(), label=plot_caption(plot)))
        self._concepts_card(evaluations)
        self.report_pathspec = f"{current.run_id}/report"  # a resume that clones `report` keeps the origin's card
        print(f"report: {len(evaluations)} checkpoint evaluations of {len(self.branches)} branches, card `report`")
        self.next(self.end)

    @step
    @honest_step
    def end(self) -> None:
        """Print the verdict and where to look further; describe and close the parent MLflow run; tag a resume;
        register the best final checkpoint when tracking.register_best names a registered model."""
        from metaflow import Run, namespace

        from cocomix_core.plumbing import tracking
        from cocomix_core.reporting import end_of_run

        if current.origin_run_id:  # the parent was created by the origin run; record who finished it
            tracking.MlflowTracker(self.parent_run_id, self.tracking_uri).set_tags(
                {"metaflow.origin_run_id": current.origin_run_id, "metaflow.resumed_run_id": current.run_id}
            )
            namespace(None)  # the run itself, whatever namespace this task's client would default to
            Run(f"{current.flow_name}/{current.run_id}").add_tag(f"origin_run:{current.origin_run_id}")
            print(f"resumed from run {current.origin_run_id}: tagged origin_run:{current.origin_run_id}")
        links = end_of_run.RunLinks(
            self.tracking_uri, self.experiment_id, self.parent_run_id, self.branch_run_ids,
            flow_file=sys.argv[0], card_pathspec=self.report_pathspec,
        )
        settings = self._settings()
        description = end_of_run.description_markdown(self.report_content, end_of_run.settings_summary(settings))
        tracking.set_description(self.parent_run_id, description, self.tracking_uri)
        if settings.tracking.register_best:
            version = tracking.register_best_checkpoint(
                settings.tracking.register_best, self.experiment_id, self.parent_run_id, description,
                run_link=end_of_run.run_url(links), tracking_uri=self.tracking_uri,
            )
            print(f"registered the best final checkpoint as {version.name} version {version.version} ({version.source})")
        for run_id in (self.evaluation_run_id, self.parent_run_id):
            tracking.end_run(run_id, "FINISHED", self.tracking_uri)
        print("\n".join(self._time_by_step()) + "\n")
        print(end_of_run.result_text(self.report_content, links))

    # ------------------------------------------------------------------ helpers
    # Small pieces shared by the steps above; all real work happens in cocomix_core.

    def _concepts_card(self, evaluations: list[Any]) -> None:
        """The report's concepts (cards, concept prediction, steering): an MLflow artifact and the card's end."""
        from cocomix_core.plumbing import tracking

        with scratch_folder("concepts") as folder:
            with self._timed("write_concepts_report"):
                concepts = stages.write_concepts_report(
                    self._settings(), self._storage(), self.data, self.labels, evaluations, folder,
                    tracking.MlflowTracker(self.parent_run_id, self.tracking_uri),
                )
            current.card.append(Markdown(concepts.markdown_path.read_text(encoding="utf-8")))
            if concepts.plot is not None:
                current.card.append(Image(concepts.plot.read_bytes(), label="Concept prediction by training tokens"))

    def _settings(self) -> ExperimentSettings:
        """The settings resolved in `start` (not re-read from presets that may have changed since)."""
        return validate_settings(yaml.safe_load(self.settings_yaml))

    def _storage(self) -> Storage:
        return Storage(self.storage_root)

    def _preflight(self, settings: ExperimentSettings) -> None:
        """Stop the run before any work if the inputs, the MLflow store or the storage root would fail it later:
        one line per problem, naming the setting or file, and no traceback (a SystemExit, which Metaflow lets through)."""
        from cocomix_core.plumbing.preflight import preflight

        problems = preflight(settings, storage_root=self.storage_root, tracking_uri=self.tracking_uri)
        if problems:
            print(f"cocomix_flow: {len(problems)} problem(s) before the run could start:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            sys.exit(1)

    def _datastore_root(self) -> str:
        # Metaflow has no public accessor for the datastore a run writes to; storage sits beside it.
        return self._datastore.parent_datastore.datastore_root

    def _train_node(self, node: stages.GangNode) -> None:
        """Train this task's part of the branch: node 0 logs to the branch's run and publishes the checkpoints
        (artifact `checkpoints`), any other node of a gang only trains."""
        from cocomix_core.plumbing import tracking
        from settings import Branch

        settings = self._settings()
        self._fail_once()
        branch = Branch(**self.branch)
        self.node_index = node.index
        folder_key = stages.run_folder_key(self._origin_run_id(), branch.name)
        inputs = (self.data, self.teacher, self.sae, self.labels)
        # A gang's nodes must all start to meet at the rendezvous, so they never wait their turn for memory.
        memory = self._memory_reserved(settings.compute.train.memory_mb) if node.nodes == 1 else contextlib.nullcontext()
        if node.index > 0:
            with self._timed("train_branch"):
                print(stages.train_gang_worker(settings, self._storage(), branch, folder_key, *inputs,
                                               self.teacher_logits, node))
            return
        with tracking.active_run(self.branch_run_ids[branch.name], self.tracking_uri) as tracker:
            tracker.set_tags(self._tags())  # the branch's run now points at the task that trains it
            with memory, self._timed("train_branch"):
                trained = stages.train_branch(settings, self._storage(), branch, folder_key, *inputs, tracker,
                                              teacher_logits=self.teacher_logits, node=node)
        print(trained.note)
        self.checkpoints = {checkpoint.name: checkpoint for checkpoint in trained.checkpoints}

    def _origin_run_id(self) -> str:
        """The run this experiment started as: the same for a run and all its resumes."""
        return current.origin_run_id or current.run_id

    def _tags(self) -> dict[str, str]:
        """Lineage tags of this task, for the MLflow runs it creates or trains into."""
        from cocomix_core.plumbing.tracking import lineage_tags

        return lineage_tags(
            flow=current.flow_name, run_id=current.run_id, step=current.step_name, task_pathspec=current.pathspec,
            settings_digest=self.settings_digest, origin_run_id=current.origin_run_id,
        )

    @contextlib.contextmanager
    def _child_run(self, name: str, params: dict[str, str] | None = None) -> Iterator[MlflowTracker]:
        """A child run of the parent for this task's piece of work, ended FINISHED or FAILED with the block."""
        from cocomix_core.plumbing.tracking import tracked_run

        with tracked_run(
            self.experiment_id, name, parent_run_id=self.parent_run_id, tags=self._tags(), params=params,
            tracking_uri=self.tracking_uri,
        ) as tracker:
            yield tracker

    def _time_by_step(self) -> list[str]:
        """Where this run's time went: every finished task's span (from Metaflow) and library seconds (`_timed`)."""
        from metaflow import Run, namespace

        from cocomix_core.reporting.step_times import (
            TaskTime,
            own_library_seconds,
            step_time_lines,
            step_times,
        )

        namespace(None)
        tasks = []
        for flow_step in Run(f"{current.flow_name}/{current.run_id}").steps():
            for task in flow_step.tasks():
                if task.finished_at is None or flow_step.id == current.step_name:
                    continue
                recorded = task.data.library_seconds if "library_seconds" in task else {}
                own = own_library_seconds(recorded, flow_step.id)
                tasks.append(TaskTime(flow_step.id, task.created_at, task.finished_at, own))
        rows = step_times(tasks)
        total = (max(task.finished for task in tasks) - rows[0].started).total_seconds() if rows else 0.0
        return step_time_lines(rows, total)

    def _memory_reserved(self, memory_mb: int) -> contextlib.AbstractContextManager[None]:
        """Hold the step's declared memory on this machine (cocomix_core.plumbing.memory), saying so if it waits."""
        from cocomix_core.plumbing.memory import memory_reserved

        def say(held_mb: int, capacity_mb: int) -> None:
            print(f"waiting for memory: the running tasks hold {held_mb:,} of {capacity_mb:,} MB and this one declares "
                  f"{memory_mb:,} (compute.<step>.memory_mb)")

        return memory_reserved(memory_mb, on_wait=say)

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        """Record seconds spent inside a library call in artifact `library_seconds` (read by the benchmark).

        Keys are "<step>/<call>": a task inherits its parents' entries, and only its own step's are its own.
        """
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.library_seconds = dict(getattr(self, "library_seconds", {}), **{f"{current.step_name}/{name}": seconds})

    def _create_runs(self, settings: Any, created: list[str]) -> None:
        """The parent run, one run per branch and the evaluation run, each id appended to `created` as it exists."""
        from cocomix_core.plumbing import tracking
        from settings import flat_params

        self.parent_run_id = tracking.create_run(
            self.experiment_id, f"{current.flow_name}/{current.run_id}", tags=self._tags(),
            tracking_uri=self.tracking_uri,
        )
        created.append(self.parent_run_id)
        tracking.MlflowTracker(self.parent_run_id, self.tracking_uri).log_params(flat_params(settings))
        self.branch_run_ids = {}
        for branch in self.branches.values():
            self.branch_run_ids[branch["name"]] = tracking.create_run(
                self.experiment_id,
                f"train/{branch['name']}",
                # Top-level runs tied to the parent by a tag: MLflow's UI folds child runs under their parent, so
                # only top-level branch runs show (and chart, one line each) from the printed link unexpanded.
                tags=self._tags() | {"cocomix.branch": branch["name"], "cocomix.kind": branch["kind"],
                                     tracking.EXPERIMENT_RUN_TAG: self.parent_run_id},
                tracking_uri=self.tracking_uri,
            )
            created.append(self.branch_run_ids[branch["name"]])
        self.evaluation_run_id = tracking.create_run(
            self.experiment_id, "evaluation", parent_run_id=self.parent_run_id, tags=self._tags(),
            tracking_uri=self.tracking_uri,
        )
        created.append(self.evaluation_run_id)
        tracking.MlflowTracker(self.evaluation_run_id, self.tracking_uri).log_params(
            stages.section_params(settings, "eval")
        )

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


# Artifacts every branch of a foreach carries unchanged; joins take them from any input.
_SHARED_ARTIFACTS = [
    "settings_yaml", "settings_digest", "branches", "branch_names", "storage_root", "tracking_uri", "experiment_id", "parent_run_id",
    "branch_run_ids", "evaluation_run_id", "data", "prepare_run_id", "teacher", "teacher_run_id", "sae", "sae_run_id",
    "labels", "teacher_logits",
]


if __name__ == "__main__":
    CocomixFlow()
