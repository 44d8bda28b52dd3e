"""The experiment's stages as plain functions of settings and storage: what each flow step does.

    data = prepare_data(settings, storage, tracker)
    teacher = obtain_teacher(settings, storage, data, tracker)
    sae = fit_sae(settings, storage, data, teacher, tracker)
    labels = build_labels(settings, storage, data, teacher, sae)
    teacher_logits = build_teacher_logits(settings, storage, data, teacher)
    trained = train_branch(settings, storage, branch, run_folder_key(experiment, branch.name), data, teacher, sae,
                           labels, tracker, teacher_logits=teacher_logits, node=GangNode(...))  # node 0 of the gang
    note = train_gang_worker(settings, storage, branch, run_folder_key(...), data, teacher, sae, labels, teacher_logits,
                             node)
    metrics = evaluate_checkpoint_job(settings, storage, data, checkpoint, parallel_tasks=1)
    files = write_report(evaluations, out_dir, tracker)

Each stage caches its product in storage under a key derived from what it is computed from, so
a rerun reuses it, and returns a small result (keys, URIs, digests, a one-line `note` saying
what it did or why it did nothing) for the orchestrator to keep. Stages log to the tracker they
are given; creating runs, lineage tags and parallelism belong to the orchestrator
(flows/cocomix_flow.py runs these stages as Metaflow steps; tests/test_stages.py runs them in-process).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from cocomix_core.fileio import scratch_folder, sha256_json
from cocomix_core.storage import Storage
from settings import Branch, ExperimentSettings, dump_yaml, flat_params, training_branches
from settings.schema import TrainResources

if TYPE_CHECKING:  # torch, mlflow and lm-eval load inside the stages that need them
    from cocomix_core.concepts import ConceptExtractor, LabelCache
    from cocomix_core.distill import OnlineTeacher, TeacherLogitCache
    from cocomix_core.report import ReportFiles
    from cocomix_core.tracking import MlflowTracker

SAE_FILE = "sae.safetensors"
SAE_METRICS_FILE = "metrics.json"
SAE_HEALTH = ("fvu", "fvu_normalized", "dead_fraction", "mean_l0")
TASKS_DIR = "lm_tasks"  # the offline lm-eval tasks, inside the prepared data folder


# ----- results ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Token shards and offline tasks in storage."""

    key: str
    uri: str
    digest: str
    source: str  # the corpus it was prepared from
    splits: dict[str, dict[str, int]]  # per split: documents and tokens (the manifest's)
    note: str

    def folder(self, storage: Storage) -> Path:
        """A local folder holding the prepared data."""
        return storage.materialize(self.key)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The concept teacher: a HF name or folder used as it is (`key` None), a GGUF file converted once into
    storage, or the toy teacher trained into storage (`trained`)."""

    key: str | None  # storage key of the converted GGUF's folder, or of the trained teacher's run folder
    ref: str  # the HF name or folder, or the storage URI of `key`
    identity: str  # what cached products are keyed by: the HF name, folder@<content digest>, gguf-<sha256[:16]>, or `key`
    note: str
    trained: bool = False

    def local(self, storage: Storage) -> str:
        """What `load_teacher` reads here: the HF name or folder, the converted folder, or the final checkpoint."""
        from cocomix_core.checkpoints import final_checkpoint

        if self.key is None:
            return self.ref
        folder = storage.materialize(self.key)
        return str(final_checkpoint(folder)) if self.trained else str(folder)


@dataclasses.dataclass(frozen=True)
class SAE:
    """The sparse autoencoder: a pretrained file or URL (`key` None), or one fitted into storage."""

    key: str | None
    ref: str  # the file or URL, or the storage URI of the fitted SAE file
    metrics: dict[str, float]  # fvu, dead_fraction, mean_l0 of a fitted SAE
    note: str

    def local(self, storage: Storage) -> str:
        """A local SAE file (or the pretrained reference) for `load_sae`."""
        return self.ref if self.key is None else str(storage.materialize(self.key) / SAE_FILE)


@dataclasses.dataclass(frozen=True)
class Labels:
    """The shared label caches, one per label selection the CoCoMix arms use (SPEC §9).

    Empty `keys`: CoCoMix branches extract labels online, or no branch needs any.
    """

    keys: dict[str, str]  # label_selection ("attribution", "activation") -> storage key
    note: str


@dataclasses.dataclass(frozen=True)
class TeacherLogits:
    """The KD teacher's cached top-k targets, one cache per distinct (τ, top_k) of the KD arms, shared by seeds.

    Empty `keys`: KD branches run the teacher online, or no branch distils.
    """

    keys: dict[str, str]  # teacher_logits_name(arm) -> storage key
    note: str


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One published evaluation checkpoint of a branch."""

    name: str  # its folder name, e.g. step_000040
    step: int
    tokens_seen: int
    key: str
    uri: str


@dataclasses.dataclass(frozen=True)
class GangNode:
    """One node of a branch's training gang (Metaflow's `current.parallel`); the defaults are a one-node gang."""

    index: int = 0
    nodes: int = 1
    main_ip: str | None = None
    port_offset: int = 0  # gangs sharing a machine (a local run's branches) must rendezvous on different ports

    @property
    def shares_machine(self) -> bool:
        """Whether all nodes run on this machine (Metaflow's local gangs), so their processes share its cores."""
        return self.nodes == 1 or self.main_ip in ("127.0.0.1", "localhost")


@dataclasses.dataclass(frozen=True)
class TrainedBranch:
    """A branch's published checkpoints, oldest first."""

    checkpoints: list[Checkpoint]
    note: str


# ----- small pieces ----------------------------------------------------------------------------
def cache_key(kind: str, *parts: Any) -> str:
    """A storage key for a cached product: its kind plus a digest of everything it is computed from."""
    return f"{kind}/{sha256_json(parts)[:16]}"


def run_folder_key(experiment_id: str, branch_name: str) -> str:
    """Where a branch trains: one folder per experiment (a run and its resumes share it) and branch."""
    return f"runs/{experiment_id}/{branch_name}"


def section_params(settings: ExperimentSettings, *sections: str) -> dict[str, str]:
    """The flat settings of some top-level sections, as MLflow params."""
    return {key: value for key, value in flat_params(settings).items() if key.split(".", 1)[0] in sections}


def branch_params(settings: ExperimentSettings, branch: Branch) -> dict[str, str]:
    """The branch's own settings (its arm, seed, λ) as params of its MLflow run."""
    prefix = f"arms.{branch.arm}."
    arm = {f"arm.{key.removeprefix(prefix)}": value for key, value in section_params(settings, "arms").items()
           if key.startswith(prefix)}
    return arm | {f"branch.{key}": str(value) for key, value in branch.model_dump().items()}


def threads_for(settings: ExperimentSettings, kind: str, parallel_tasks: int) -> int:
    """Torch threads for one of `parallel_tasks` tasks of one kind of step sharing this machine."""
    from cocomix_core.launch import cpu_threads

    return cpu_threads(parallel_tasks, configured=settings.train.cpu_threads,
                       reserved=getattr(settings.compute, kind).cpus)


def train_windows(settings: ExperimentSettings, data_dir: Path) -> Any:
    """The training windows every branch reads (same seed), so cached labels line up with their samples."""
    from cocomix_core.data import load_split
    from cocomix_core.windows import TrainWindows

    return TrainWindows(load_split(data_dir, "train"), settings.data.block_size, settings.data.window_seed)


def log_dataset(tracker: MlflowTracker, data: PreparedData) -> None:
    """Record the prepared corpus as a dataset input of the tracker's run, identified by its digest."""
    from cocomix_core.tracking import log_dataset_input

    log_dataset_input(
        tracker.run_id, name=f"corpus:{data.source}", digest=data.digest, source=data.uri,
        profile={"splits": data.splits}, tracking_uri=tracker.client.tracking_uri,
    )


def concept_extractor(
    settings: ExperimentSettings, storage: Storage, teacher: Teacher, sae: SAE, selection: str
) -> ConceptExtractor:
    """The teacher and SAE that label tokens with concepts, selected by attribution or by activation (SPEC §9)."""
    from cocomix_core.concepts import ActivationConceptExtractor, ConceptExtractor
    from cocomix_core.sae import load_sae

    extractor = ActivationConceptExtractor if selection == "activation" else ConceptExtractor
    return extractor(teacher_model(settings, storage, teacher), load_sae(sae.local(storage)), settings.sae.layer_index)


def teacher_compute_dtype(settings: ExperimentSettings) -> Any:
    """The torch dtype of the teacher's passes in the stages (on this machine's CPU): `teacher.precision` resolved."""
    from cocomix_core.teachers import teacher_dtype

    return teacher_dtype(settings.teacher.precision, "cpu")


def teacher_model(settings: ExperimentSettings, storage: Storage, teacher: Teacher) -> Any:
    """The teacher, frozen, in the dtype of `teacher.precision`."""
    from cocomix_core.concepts import load_teacher

    return load_teacher(teacher.local(storage), dtype=teacher_compute_dtype(settings))


def teacher_provenance(settings: ExperimentSettings, teacher: Teacher) -> dict[str, str]:
    """What a product of the teacher's passes depends on: which teacher, and the dtype its passes ran in."""
    return {"teacher": teacher.identity, "teacher_dtype": str(teacher_compute_dtype(settings)).removeprefix("torch.")}


def students_vocab_size(data_dir: Path) -> int:
    """Embedding rows of every student: the prepared data's tokenizer's size (GPT-2: 50257; others padded)."""
    from cocomix_core.data import data_tokenizer
    from cocomix_core.tokenizer import student_vocab_size

    return student_vocab_size(data_tokenizer(data_dir))


def teacher_folder(teacher: Teacher, storage: Storage) -> Path:
    """A local folder holding the teacher's model and tokenizer files (a hub name: its snapshot in the HF cache)."""
    from cocomix_core.teachers import resolve_teacher

    local = teacher.local(storage)
    return resolve_teacher(local, cache_dir=local)  # a folder or hub name: nothing to convert, the cache is unused


def pretrained_teacher(settings: ExperimentSettings, storage: Storage) -> Teacher:
    """`teacher.pretrained` ready to load: a GGUF file (or a packaged one such as smollm2-135m) converted once
    into storage at teacher/gguf-<sha256[:16]>, which every later step, task and run reuses; a HF name or folder
    as it is (a folder identified by its content too)."""
    from cocomix_core import teachers
    from cocomix_core.fileio import sha256_file

    name = settings.teacher.pretrained
    if name in teachers.PACKAGED_TEACHERS:
        gguf = teachers.packaged_gguf(name)
    elif name.endswith(".gguf"):
        gguf = Path(name).expanduser()
    else:
        identity = teachers.folder_identity(name)
        return Teacher(key=None, ref=name, identity=identity, note=f"teacher: pretrained {identity}")
    teachers.check_gguf_file(gguf)
    identity = f"gguf-{sha256_file(gguf)[:16]}"  # the folder name convert_gguf gives it
    key = f"teacher/{identity}"
    with storage.stored_folder(key) as folder:
        reused = storage.exists(key)  # asked under the folder's lock: another process may have just built it
        teachers.convert_gguf(gguf, folder.parent)  # returns at once when the folder holds this conversion
    uri = storage.uri(key)
    done = "already converted at" if reused else "converted to float32 at"
    return Teacher(key=key, ref=uri, identity=identity, note=f"teacher: pretrained {name} ({gguf.name}), {done} {uri}")


def data_tokenizer_for(settings: ExperimentSettings, storage: Storage) -> Any:
    """The tokenizer the data is prepared with (`tokenizer.name`; "teacher": the pretrained teacher's own)."""
    from cocomix_core.tokenizer import TEACHER_NAME, load_tokenizer

    if settings.tokenizer.name != TEACHER_NAME:
        return load_tokenizer(settings.tokenizer.name)
    return load_tokenizer(TEACHER_NAME, teacher_folder(pretrained_teacher(settings, storage), storage))


def label_selections(settings: ExperimentSettings) -> list[str]:
    """The label selections of the arms whose branches learn concepts (every CoCoMix mix and λ), in arm order."""
    in_use = {settings.arms[branch.arm].label_selection: None
              for branch in training_branches(settings) if branch.kind == "cocomix"}
    return list(in_use)


def teacher_logits_name(settings: ExperimentSettings, arm: str) -> str:
    """The teacher-logit cache a KD arm reads: one per distinct (τ, top_k), e.g. "tau1-top128"."""
    options = settings.arms[arm]
    return f"tau{options.kd_temperature:g}-top{options.kd_top_k}"


# ----- stages ----------------------------------------------------------------------------------
def prepare_data(settings: ExperimentSettings, storage: Storage, tracker: MlflowTracker) -> PreparedData:
    """Corpus -> token shards + manifest and the offline lm-eval tasks, in storage (reused when already there)."""
    from cocomix_core import data as corpus, offline_tasks

    tokenizer = data_tokenizer_for(settings, storage)
    key = cache_key("data", settings.data.model_dump(mode="json"), settings.tokenizer.name, tokenizer.digest)
    with storage.stored_folder(key) as folder:
        reused = storage.exists(key)
        manifest = corpus.prepare_corpus(settings.data, folder, tokenizer)
        offline_tasks.build_offline_tasks(
            folder, folder / TASKS_DIR, settings.data.offline_task_items, settings.data.split_seed, tokenizer
        )
    digest = corpus.data_digest(manifest)
    split_tokens = {split: counts["tokens"] for split, counts in manifest["splits"].items()}
    uri = storage.uri(key)
    tokens = ", ".join(f"{tokens:,} {split}" for split, tokens in split_tokens.items())
    note = (f"data already prepared at {uri} (digest {digest[:12]}…), reused" if reused
            else f"prepared {tokens} tokens at {uri} (digest {digest[:12]}…)")
    result = PreparedData(key=key, uri=uri, digest=digest, source=manifest["source"], splits=manifest["splits"],
                          note=note)
    tracker.log_metrics({f"data/{split}_tokens": tokens for split, tokens in split_tokens.items()}, step=0)
    log_dataset(tracker, result)
    return result


def obtain_teacher(
    settings: ExperimentSettings, storage: Storage, data: PreparedData, tracker: MlflowTracker
) -> Teacher:
    """`teacher.pretrained` (a GGUF converted once into storage), or the small teacher trained on the corpus
    (cached by data and job digest). A pretrained teacher whose tokenizer is not the data's is refused (SPEC §8)."""
    from cocomix_core.data import data_tokenizer
    from cocomix_core.models import teacher_job
    from cocomix_core.tokenizer import check_same_tokenizer, hf_tokenizer
    from cocomix_core.train import train

    if settings.teacher.pretrained:
        teacher = pretrained_teacher(settings, storage)
        check_same_tokenizer(hf_tokenizer(teacher_folder(teacher, storage)), data_tokenizer(data.folder(storage)))
        tracker.set_tags({"cocomix.teacher": teacher.identity})
        return teacher
    job = teacher_job(settings, vocab_size=students_vocab_size(data.folder(storage)))
    key = cache_key("teacher", data.digest, job.digest())
    log_dataset(tracker, data)
    with storage.stored_folder(key, resumable=True) as out_dir:
        result = train(job, data.folder(storage), out_dir, tracker=tracker,
                       num_threads=threads_for(settings, "concepts", 1))
    uri = storage.uri(key)
    tracker.set_tags({"cocomix.storage_uri": uri})
    if result.resumed_from_step == result.final_step:
        note = f"teacher already trained at {uri} (step {result.final_step}), reused"
    else:
        note = f"teacher trained to step {result.final_step} (val ppl {result.final_val_ppl:.4g}) at {uri}"
    return Teacher(key=key, ref=uri, identity=key, note=note, trained=True)


def fit_sae(
    settings: ExperimentSettings, storage: Storage, data: PreparedData, teacher: Teacher, tracker: MlflowTracker
) -> SAE:
    """`sae.pretrained` as it is, or an SAE fitted on the teacher's residual stream (cached by data, teacher, SAE settings).

    Training progress and the final health (fvu, dead fraction, mean L0) go to `tracker` at the SAE's step.
    """
    from cocomix_core import sae as sae_io
    from cocomix_core.fileio import write_json_atomic

    if settings.sae.pretrained:
        return SAE(key=None, ref=settings.sae.pretrained, metrics={}, note=f"SAE: pretrained {settings.sae.pretrained}")
    key = cache_key("sae", data.digest, teacher_provenance(settings, teacher), settings.sae.model_dump(mode="json"))
    with storage.stored_folder(key) as folder:
        reused = storage.exists(key)
        if not (folder / SAE_FILE).is_file():
            reused = False
            trained, metrics = _train_sae(settings, storage, teacher, data.folder(storage), tracker)
            write_json_atomic(folder / SAE_METRICS_FILE, metrics)
            sae_io.save_sae(trained, folder / SAE_FILE)
        metrics = json.loads((folder / SAE_METRICS_FILE).read_text())
    health = {name: float(metrics[name]) for name in SAE_HEALTH}
    tracker.log_metrics({f"sae/{name}": value for name, value in health.items()}, step=settings.sae.steps)
    uri = storage.uri(key)
    tracker.set_tags({"cocomix.storage_uri": uri})
    described = ", ".join(f"{name} {value:.3g}" for name, value in health.items())
    note = f"SAE already fitted at {uri} ({described}), reused" if reused else f"SAE fitted at {uri}: {described}"
    return SAE(key=key, ref=f"{uri}/{SAE_FILE}", metrics=health, note=note)


def _train_sae(
    settings: ExperimentSettings, storage: Storage, teacher: Teacher, data_dir: Path, tracker: MlflowTracker
) -> tuple[Any, dict]:
    """Train the SAE with the settings' knobs; progress goes to `tracker` at the SAE's step."""
    from cocomix_core.sae_training import sae_train_config, train_sae

    def log(record: dict[str, Any]) -> None:
        tracker.log_metrics({f"sae/{name[4:]}": value for name, value in record.items() if name != "sae_step"},
                            step=int(record["sae_step"]))

    return train_sae(teacher_model(settings, storage, teacher), train_windows(settings, data_dir),
                     settings.sae.layer_index, sae_train_config(settings.sae, settings.data.block_size), log_fn=log)


def build_labels(
    settings: ExperimentSettings, storage: Storage, data: PreparedData, teacher: Teacher, sae: SAE
) -> Labels:
    """One teacher pass over every training sample the branches will read per label selection in use, shared by
    all CoCoMix branches (every mix, λ and seed) of that selection.

    Nothing is built when no branch is CoCoMix, or when `concepts.label_source` is "online".
    """
    from cocomix_core.concepts import build_label_cache

    selections = label_selections(settings)
    if not selections:
        return Labels(keys={}, note="labels: none needed (no CoCoMix branch)")
    if settings.concepts.label_source != "cache":
        return Labels(keys={}, note=f"labels: extracted online by each branch (concepts.label_source="
                                    f"{settings.concepts.label_source})")
    samples = settings.train.steps * settings.train.batch_size
    keys, notes = {}, []
    for selection in selections:
        provenance = {"data": data.digest, **teacher_provenance(settings, teacher), "sae": sae.ref,
                      "layer_index": settings.sae.layer_index, "label_selection": selection}
        key = cache_key("labels", provenance, settings.concepts.model_dump(mode="json"), settings.train.steps,
                        settings.train.batch_size)
        with storage.stored_folder(key) as folder:
            reused = storage.exists(key)
            build_label_cache(
                concept_extractor(settings, storage, teacher, sae, selection),
                train_windows(settings, data.folder(storage)), num_samples=samples,
                batch_size=settings.concepts.extract_batch_size, k=settings.concepts.labels_per_token, out_dir=folder,
                provenance=provenance,
            )
        keys[selection] = key
        uri = storage.uri(key)
        notes.append(f"labels ({selection}) already cached at {uri}, reused" if reused
                     else f"labels ({selection}) of {samples:,} training samples cached at {uri}")
    return Labels(keys=keys, note="; ".join(notes))


def build_teacher_logits(
    settings: ExperimentSettings, storage: Storage, data: PreparedData, teacher: Teacher
) -> TeacherLogits:
    """The KD arms' teacher targets: top-k log-probs at τ plus the tail's mass for every training sample, one
    cache per distinct (τ, top_k), built once per experiment and shared by every seed (cocomix_core/distill.py).

    Nothing is built when no branch is KD, or when `concepts.label_source` is "online" (KD branches then run
    the teacher on each batch: exact full logits).
    """
    from cocomix_core.distill import TeacherLogitCache, build_teacher_logit_cache

    kd_arms = {branch.arm for branch in training_branches(settings) if branch.kind == "kd"}
    if not kd_arms:
        return TeacherLogits(keys={}, note="teacher logits: none needed (no KD branch)")
    if settings.concepts.label_source != "cache":
        return TeacherLogits(keys={}, note=f"teacher logits: computed online by each KD branch "
                                           f"(concepts.label_source={settings.concepts.label_source})")
    caches = {teacher_logits_name(settings, arm): settings.arms[arm] for arm in sorted(kd_arms)}
    samples = settings.train.steps * settings.train.batch_size
    provenance = {"data": data.digest, **teacher_provenance(settings, teacher)}
    model = teacher_model(settings, storage, teacher)  # a reused cache is checked against the teacher's vocabulary too
    keys, notes = {}, []
    for name, options in caches.items():
        key = cache_key("teacher_logits", provenance, options.kd_temperature, options.kd_top_k,
                        settings.data.block_size, settings.data.window_seed, samples)
        with storage.stored_folder(key) as folder:
            reused = storage.exists(key)
            build_teacher_logit_cache(
                model, train_windows(settings, data.folder(storage)), num_samples=samples,
                batch_size=settings.concepts.extract_batch_size, top_k=options.kd_top_k,
                temperature=options.kd_temperature, out_dir=folder, provenance=provenance,
            )
            tail = TeacherLogitCache(folder).manifest["tail_mass"]
        keys[name] = key
        uri = storage.uri(key)
        bound = f"teacher mass outside the top {options.kd_top_k}: mean {tail['mean']:.3g}, max {tail['max']:.3g}"
        notes.append(f"teacher logits ({name}) already cached at {uri} ({bound}), reused" if reused
                     else f"teacher logits ({name}) of {samples:,} training samples cached at {uri} ({bound})")
    return TeacherLogits(keys=keys, note="; ".join(notes))


def train_branch(
    settings: ExperimentSettings,
    storage: Storage,
    branch: Branch,
    folder_key: str,
    data: PreparedData,
    teacher: Teacher,
    sae: SAE,
    labels: Labels,
    tracker: MlflowTracker,
    *,
    teacher_logits: TeacherLogits,
    node: GangNode = GangNode(),
) -> TrainedBranch:
    """Train one branch into `folder_key`, continuing from its last checkpoint; publish and list its checkpoints.

    A CoCoMix branch reads the label cache of its arm's label selection, a KD branch the teacher-logit cache of
    its arm's (τ, top_k); with `concepts.label_source: online` both run the teacher on each batch instead.

    In-process when one process trains (CPU or one GPU); else under `accelerate launch`, as
    node 0 of a gang of `node.nodes` (the other nodes run `train_gang_worker`). Metrics go to
    `tracker`, and its run lists the checkpoints (`checkpoints.json`).
    """
    from cocomix_core.tracking import log_checkpoints

    tracker.log_params(section_params(settings, "train") | branch_params(settings, branch))
    log_dataset(tracker, data)
    with storage.stored_folder(folder_key, resumable=True) as out_dir:
        done = _run_trainer(settings, storage, branch, data, teacher, sae, labels, teacher_logits, out_dir, tracker,
                            node)
        checkpoints = publish_checkpoints(out_dir, folder_key, storage)
    with scratch_folder("checkpoints") as listing_folder:
        log_checkpoints(tracker, [dataclasses.asdict(checkpoint) for checkpoint in checkpoints], listing_folder)
    return TrainedBranch(checkpoints, f"{branch.name}: {done}; {len(checkpoints)} checkpoints at {storage.uri(folder_key)}")


def train_gang_worker(
    settings: ExperimentSettings, storage: Storage, branch: Branch, folder_key: str, data: PreparedData,
    teacher: Teacher, sae: SAE, labels: Labels, teacher_logits: TeacherLogits, node: GangNode,
) -> str:
    """Node `node.index` > 0 of a branch's gang: train from the run folder as stored; says what was done.

    Global rank 0 (on node 0) alone logs and writes checkpoints, so this node neither tracks nor publishes.
    """
    if node.index == 0:
        raise ValueError("node 0 of a gang trains with train_branch, which logs and publishes")
    found = storage.exists(folder_key, resumable=True)
    out_dir = storage.materialize(folder_key, resumable=True) if found else storage.local_workdir(folder_key)
    done = _run_trainer(settings, storage, branch, data, teacher, sae, labels, teacher_logits, out_dir, None, node)
    return f"{branch.name} node {node.index} of {node.nodes}: {done}"


def _launched_resources(settings: ExperimentSettings) -> TrainResources:
    """compute.train as this machine can honour it: no more GPU processes than visible GPUs (none: CPU processes)."""
    import torch

    resources = settings.compute.train
    return resources.model_copy(update={"gpus": min(resources.gpus, torch.cuda.device_count())})


def _launch_gang_node(
    settings: ExperimentSettings, resources: TrainResources, module_args: list[str], node: GangNode,
    tracker: MlflowTracker | None,
) -> str:
    """Run this node's `accelerate launch` of the trainer (all of the gang's processes on this node); says what ran."""
    from cocomix_core.launch import training_command

    port = resources.main_port + node.port_offset
    if port > 65535:
        raise ValueError(f"compute.train.main_port={resources.main_port} + branch index {node.port_offset} = {port} "
                         "is past the last TCP port 65535; lower compute.train.main_port")
    sharing = len(training_branches(settings)) * resources.processes_per_node * (node.nodes if node.shares_machine else 1)
    threads = threads_for(settings, "train", sharing)
    command = training_command([*module_args, "--threads", str(threads)],
                               resources.model_copy(update={"main_port": port}),
                               node_rank=node.index, main_ip=node.main_ip)
    environment = dict(os.environ)
    if tracker is not None:  # the trainer's rank 0 logs into the branch's run on this tracking server
        environment["MLFLOW_TRACKING_URI"] = tracker.client.tracking_uri
    subprocess.run(command, check=True, env=environment)
    device = f"{resources.gpus} GPUs" if resources.gpus else f"{resources.cpu_processes} CPU processes"
    return f"trained to step {settings.train.steps} on {node.nodes} node(s) × {device}"


def _run_trainer(
    settings: ExperimentSettings, storage: Storage, branch: Branch, data: PreparedData, teacher: Teacher, sae: SAE,
    labels: Labels, teacher_logits: TeacherLogits, out_dir: Path, tracker: MlflowTracker | None, node: GangNode,
) -> str:
    """Train in this process, or (several processes, or a gang) under `accelerate launch`; says what was done."""
    from cocomix_core.models import job_for_branch
    from cocomix_core.train import train

    resources = _launched_resources(settings)
    if resources.nodes * resources.processes_per_node > 1:
        settings_file = out_dir / "launch_settings.yaml"  # beside what it trains: no temp folder left behind
        settings_file.write_text(dump_yaml(settings))
        args = ["--settings", str(settings_file), "--arm", branch.name, "--data", str(data.folder(storage)),
                "--out", str(out_dir)]
        if tracker is not None:
            args += ["--mlflow-run-id", tracker.run_id]
        args += _teacher_input_args(settings, storage, branch, teacher, sae, labels, teacher_logits)
        return _launch_gang_node(settings, resources, args, node, tracker)
    label_source = teacher_source = None
    if branch.kind == "cocomix":
        label_source = _label_source(settings, storage, branch, teacher, sae, labels)
    if branch.kind == "kd":
        teacher_source = _teacher_source(settings, storage, branch, teacher, teacher_logits)
    threads = threads_for(settings, "train", len(training_branches(settings)))
    job = job_for_branch(settings, branch, vocab_size=students_vocab_size(data.folder(storage)))
    result = train(job, data.folder(storage), out_dir, tracker=tracker,
                   labels=label_source, teacher=teacher_source, num_threads=threads)
    if result.resumed_from_step == result.final_step:
        return f"already trained to step {result.final_step}, nothing to do"
    resumed = f" (continued from step {result.resumed_from_step})" if result.resumed_from_step is not None else ""
    return f"trained to step {result.final_step}{resumed}, val ppl {result.final_val_ppl:.4g}"


def _label_source(
    settings: ExperimentSettings, storage: Storage, branch: Branch, teacher: Teacher, sae: SAE, labels: Labels
) -> LabelCache | ConceptExtractor:
    """What a CoCoMix branch reads its labels from: the cache of its arm's selection, or the extractor (online)."""
    from cocomix_core.concepts import LabelCache

    selection = settings.arms[branch.arm].label_selection
    if labels.keys:
        return LabelCache(storage.materialize(labels.keys[selection]))
    return concept_extractor(settings, storage, teacher, sae, selection)


def _teacher_source(
    settings: ExperimentSettings, storage: Storage, branch: Branch, teacher: Teacher, teacher_logits: TeacherLogits
) -> TeacherLogitCache | OnlineTeacher:
    """What a KD branch distils from: the cache of its arm's (τ, top_k), or the teacher run on each batch (online)."""
    from cocomix_core.distill import OnlineTeacher, TeacherLogitCache

    if teacher_logits.keys:
        return TeacherLogitCache(storage.materialize(teacher_logits.keys[teacher_logits_name(settings, branch.arm)]))
    return OnlineTeacher(teacher_model(settings, storage, teacher))


def _teacher_input_args(
    settings: ExperimentSettings, storage: Storage, branch: Branch, teacher: Teacher, sae: SAE, labels: Labels,
    teacher_logits: TeacherLogits,
) -> list[str]:
    """The `python -m cocomix_core.train` arguments naming what the branch learns from, as `_label_source` and
    `_teacher_source` choose it in-process: a cache folder, or the teacher (and SAE) to run online."""
    if branch.kind == "cocomix" and labels.keys:
        return ["--labels", str(storage.materialize(labels.keys[settings.arms[branch.arm].label_selection]))]
    if branch.kind == "cocomix":
        return ["--teacher", teacher.local(storage), "--sae", sae.local(storage)]
    if branch.kind == "kd" and teacher_logits.keys:
        name = teacher_logits_name(settings, branch.arm)
        return ["--teacher-logits", str(storage.materialize(teacher_logits.keys[name]))]
    if branch.kind == "kd":
        return ["--teacher", teacher.local(storage)]
    return []


def publish_checkpoints(out_dir: Path, key: str, storage: Storage) -> list[Checkpoint]:
    """Publish each checkpoint of a run folder at its own key (evaluation fetches one, not the run); list them."""
    from cocomix_core.checkpoints import checkpoint_info, list_checkpoints

    listing = []
    for folder in list_checkpoints(out_dir):
        info = checkpoint_info(folder)
        checkpoint_key = f"{key}/{folder.relative_to(out_dir).as_posix()}"
        listing.append(Checkpoint(name=folder.name, step=int(info["step"]), tokens_seen=int(info["tokens_seen"]),
                                  key=checkpoint_key, uri=storage.publish(folder, checkpoint_key)))
    return listing


def evaluate_checkpoint_job(
    settings: ExperimentSettings, storage: Storage, data: PreparedData, checkpoint: Checkpoint, parallel_tasks: int
) -> dict[str, float]:
    """Validation perplexity and the lm-eval tasks of one checkpoint, as tracker metrics (`eval/...`).

    `parallel_tasks` evaluations share this machine's cores.
    """
    from cocomix_core import evaluate
    from cocomix_core.checkpoints import verify_checkpoint
    from cocomix_core.train import set_threads

    set_threads(threads_for(settings, "evaluate", parallel_tasks))
    folder = storage.materialize(checkpoint.key)
    verify_checkpoint(folder)  # a checkpoint altered since it was written is refused, naming the file
    data_dir = data.folder(storage)
    results = evaluate.evaluate_checkpoint(folder, data_dir, data_dir / TASKS_DIR, settings.eval, settings.data.block_size)
    return evaluate.tracker_metrics(results)


def log_evaluation(
    metrics: dict[str, float], checkpoint: Checkpoint, branch_name: str, branch_tracker: MlflowTracker,
    evaluation_tracker: MlflowTracker,
) -> None:
    """Log a checkpoint's metrics at its step: in the branch's run (MLflow's compare view charts the arms on one
    axis) and, prefixed by the branch, in the evaluation run that groups them all."""
    branch_tracker.log_metrics(metrics, step=checkpoint.step)
    evaluation_tracker.log_metrics({f"{branch_name}/{name}": value for name, value in metrics.items()},
                                   step=checkpoint.step)
    branch_tracker.flush()
    evaluation_tracker.flush()


def report_arm(branch: Branch) -> str:
    """What the report aggregates a branch's seeds under: its arm, and its λ when a λ sweep names it
    (`cocomix-s1-lam0.1` -> `cocomix-lam0.1`: seeds of one λ are one estimate, different λ are not)."""
    lam = f"-lam{branch.lam_concept:g}"
    return branch.arm + lam if branch.name.endswith(lam) else branch.arm


def write_report(
    evaluations: Iterable[tuple[Branch, Checkpoint, dict[str, float]]], out_dir: Path, tracker: MlflowTracker
) -> ReportFiles:
    """Curves per training token, tokens-to-match, tables and plots into `out_dir`, logged under `report/`; each
    branch's headline curves (val ppl, task metrics) also go into the tracker's run at step = training tokens."""
    from cocomix_core import report
    from cocomix_core.tracking import log_branch_curves

    jobs = ((dict(branch=branch.model_dump() | {"arm": report_arm(branch)}, step=checkpoint.step,
                  tokens_seen=checkpoint.tokens_seen), metrics)
            for branch, checkpoint, metrics in evaluations)
    curves = report.curves_from_results(jobs)
    written = report.write_report(curves, out_dir)
    headline = [report.VAL_PPL, *report.task_metrics(curves)]
    log_branch_curves(tracker.run_id, {
        curve.name: [(point.tokens_seen, {name: point.metrics[name] for name in headline if name in point.metrics})
                     for point in curve.points]
        for curve in curves
    }, tracker.client.tracking_uri)
    tracker.log_artifact(out_dir, "report")
    tracker.log_metrics({f"report/{name}": value for name, value in written.summary.items()}, step=0)
    tracker.flush()
    return written


# ----- presenting the report in narrow pages (a Metaflow card) ---------------------------------
def split_wide_tables(markdown: str, max_columns: int) -> str:
    """Markdown with every table wider than `max_columns` split into tables of at most that many columns,
    each repeating the first (row label) column."""
    lines, output, index = markdown.split("\n"), [], 0
    while index < len(lines):
        if not _is_table_row(lines[index]):
            output.append(lines[index])
            index += 1
            continue
        table = []
        while index < len(lines) and _is_table_row(lines[index]):
            table.append(_cells(lines[index]))
            index += 1
        output.append(_split_table(table, max_columns))
    return "\n".join(output)


def _is_table_row(line: str) -> bool:
    return line.startswith("|") and line.rstrip().endswith("|")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _split_table(rows: list[list[str]], max_columns: int) -> str:
    """`rows` (header, separator, body) as one or more tables, the first column repeated in each."""
    header, _, *body = rows
    rest = list(range(1, len(header)))
    width = max(1, max_columns - 1)
    groups = [rest[start:start + width] for start in range(0, len(rest), width)] or [[]]
    tables = []
    for group in groups:
        columns = [0, *group]
        lines = ["| " + " | ".join(header[column] for column in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row[column] if column < len(row) else "" for column in columns) + " |"
                  for row in body]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


_METRIC_WORDS = {"val_ppl": "validation perplexity", "acc": "accuracy", "acc_norm": "length-normalised accuracy",
                 "ppl": "perplexity", "word_perplexity": "word perplexity", "bits_per_byte": "bits per byte",
                 "training_val_ppl": "validation perplexity during training"}


def plot_caption(plot: Path) -> str:
    """A caption for a report plot named after its metric (`cocomix_choice__acc.png` -> "cocomix_choice:
    accuracy by training tokens")."""
    *task, metric = plot.stem.split("__")
    words = _METRIC_WORDS.get(metric, re.sub(r"[_]+", " ", metric))
    return f"{task[0]}: {words} by training tokens" if task else f"{words.capitalize()} by training tokens"
