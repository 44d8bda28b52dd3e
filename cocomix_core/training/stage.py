"""The `train` stage: one branch (arm × seed × λ) trained into storage, its checkpoints published.

    trained = train_branch(settings, storage, branch, run_folder_key(experiment, branch.name), data, teacher, sae,
                           labels, tracker, teacher_logits=teacher_logits, node=GangNode(...))  # node 0 of a gang
    note = train_gang_worker(settings, storage, branch, run_folder_key(...), data, teacher, sae, labels,
                             teacher_logits, node)                                                 # nodes 1..N-1

One process trains in-process; several (GPUs, CPU processes, or a multi-node gang) run under
`accelerate launch`, whose global rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from cocomix_core.concepts.stage import (
    SAE,
    Labels,
    Teacher,
    TeacherLogits,
    concept_extractor,
    teacher_logits_name,
    teacher_model,
)
from cocomix_core.data import corpus
from cocomix_core.plumbing.files import scratch_folder
from cocomix_core.plumbing.keys import branch_params, section_params
from cocomix_core.plumbing.launch import threads_for
from cocomix_core.plumbing.storage import Storage
from settings import Branch, ExperimentSettings, dump_yaml, training_branches
from settings.schema import TrainResources

if TYPE_CHECKING:  # torch and mlflow load inside the stages that need them
    from cocomix_core.concepts.labels import ConceptExtractor, LabelCache
    from cocomix_core.data.stage import PreparedData
    from cocomix_core.plumbing.tracking import MlflowTracker
    from cocomix_core.training.distill import OnlineTeacher, TeacherLogitCache


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
    from cocomix_core.plumbing.tracking import log_checkpoints

    tracker.log_params(section_params(settings, "train") | branch_params(settings, branch))
    data.log_to(tracker)
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
    from cocomix_core.plumbing.launch import training_command

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
    # Imported here: a launching task waits on its trainer processes without the models' imports (~3 s of CPU).
    from cocomix_core.model.build import job_for_branch
    from cocomix_core.training.trainer import train

    label_source = teacher_source = None
    if branch.kind == "cocomix":
        label_source = _label_source(settings, storage, branch, teacher, sae, labels)
    if branch.kind == "kd":
        teacher_source = _teacher_source(settings, storage, branch, teacher, teacher_logits)
    threads = threads_for(settings, "train", len(training_branches(settings)))
    job = job_for_branch(settings, branch, vocab_size=corpus.students_vocab_size(data.folder(storage)))
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
    from cocomix_core.concepts.labels import LabelCache

    selection = settings.arms[branch.arm].label_selection
    if labels.keys:
        return LabelCache(storage.materialize(labels.keys[selection]))
    return concept_extractor(settings, storage, teacher, sae, selection)


def _teacher_source(
    settings: ExperimentSettings, storage: Storage, branch: Branch, teacher: Teacher, teacher_logits: TeacherLogits
) -> TeacherLogitCache | OnlineTeacher:
    """What a KD branch distils from: the cache of its arm's (τ, top_k), or the teacher run on each batch (online)."""
    from cocomix_core.training.distill import OnlineTeacher, TeacherLogitCache

    if teacher_logits.keys:
        return TeacherLogitCache(storage.materialize(teacher_logits.keys[teacher_logits_name(settings, branch.arm)]))
    return OnlineTeacher(teacher_model(settings, storage, teacher))


def _teacher_input_args(
    settings: ExperimentSettings, storage: Storage, branch: Branch, teacher: Teacher, sae: SAE, labels: Labels,
    teacher_logits: TeacherLogits,
) -> list[str]:
    """The `python -m cocomix_core.training.trainer` arguments naming what the branch learns from, as `_label_source` and
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
    from cocomix_core.training.checkpoints import checkpoint_info, list_checkpoints

    listing = []
    for folder in list_checkpoints(out_dir):
        info = checkpoint_info(folder)
        checkpoint_key = f"{key}/{folder.relative_to(out_dir).as_posix()}"
        listing.append(Checkpoint(name=folder.name, step=int(info["step"]), tokens_seen=int(info["tokens_seen"]),
                                  key=checkpoint_key, uri=storage.publish(folder, checkpoint_key)))
    return listing
