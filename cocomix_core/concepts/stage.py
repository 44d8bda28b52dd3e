"""The `concepts` stage: the teacher, its SAE, and the caches every branch learns from (SPEC §2, §8, §9).

    teacher = obtain_teacher(settings, storage, data, tracker)
    sae = fit_sae(settings, storage, data, teacher, tracker)
    labels = build_labels(settings, storage, data, teacher, sae)
    teacher_logits = build_teacher_logits(settings, storage, data, teacher)

Each product is cached in storage under a key of everything it is computed from (data digest,
teacher identity and dtype, settings), so every seed, λ and rerun shares it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cocomix_core.data import corpus
from cocomix_core.plumbing.keys import cache_key
from cocomix_core.plumbing.launch import threads_for
from cocomix_core.plumbing.storage import Storage
from settings import ExperimentSettings, training_branches
from settings.schema import CONCEPT_PRESENTATION

if TYPE_CHECKING:  # torch and mlflow load inside the stages that need them
    from cocomix_core.concepts.labels import ConceptExtractor
    from cocomix_core.data.stage import PreparedData
    from cocomix_core.plumbing.tracking import MlflowTracker

SAE_FILE = "sae.safetensors"


SAE_METRICS_FILE = "metrics.json"


SAE_HEALTH = ("fvu", "fvu_normalized", "dead_fraction", "mean_l0")


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
        from cocomix_core.training.checkpoints import final_checkpoint

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
    # label_selection -> storage key of the cache's small files (concept cards, validation labels): what evaluation
    # and the report read
    concept_keys: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TeacherLogits:
    """The KD teacher's cached top-k targets, one cache per distinct (τ, top_k) of the KD arms, shared by seeds.

    Empty `keys`: KD branches run the teacher online, or no branch distils.
    """

    keys: dict[str, str]  # teacher_logits_name(arm) -> storage key
    note: str


def pretrained_teacher(settings: ExperimentSettings, storage: Storage) -> Teacher:
    """`teacher.pretrained` ready to load (a GGUF converted once into storage; see `teachers.pretrained_in_storage`)."""
    from cocomix_core.concepts.teachers import pretrained_in_storage

    name = settings.teacher.pretrained
    key, identity, note = pretrained_in_storage(name, storage)
    return Teacher(key=key, ref=name if key is None else storage.uri(key), identity=identity, note=note)


def teacher_folder(teacher: Teacher, storage: Storage) -> Path:
    """A local folder holding the teacher's model and tokenizer files (a hub name: its snapshot in the HF cache)."""
    from cocomix_core.concepts.teachers import resolve_teacher

    local = teacher.local(storage)
    return resolve_teacher(local, cache_dir=local)  # a folder or hub name: nothing to convert, the cache is unused


def teacher_compute_dtype(settings: ExperimentSettings) -> Any:
    """The torch dtype of the teacher's passes in the stages (on this machine's CPU): `teacher.precision` resolved."""
    from cocomix_core.concepts.teachers import teacher_dtype

    return teacher_dtype(settings.teacher.precision, "cpu")


def teacher_model(settings: ExperimentSettings, storage: Storage, teacher: Teacher) -> Any:
    """The teacher, frozen, in the dtype of `teacher.precision`."""
    from cocomix_core.concepts.labels import load_teacher

    return load_teacher(teacher.local(storage), dtype=teacher_compute_dtype(settings))


def teacher_provenance(settings: ExperimentSettings, teacher: Teacher) -> dict[str, str]:
    """What a product of the teacher's passes depends on: which teacher, and the dtype its passes ran in."""
    return {"teacher": teacher.identity, "teacher_dtype": str(teacher_compute_dtype(settings)).removeprefix("torch.")}


def concept_extractor(
    settings: ExperimentSettings, storage: Storage, teacher: Teacher, sae: SAE, selection: str
) -> ConceptExtractor:
    """The teacher and SAE that label tokens with concepts, selected by attribution or by activation (SPEC §9)."""
    from cocomix_core.concepts.labels import (
        ActivationConceptExtractor,
        ConceptExtractor,
    )
    from cocomix_core.concepts.sae import load_sae

    extractor = ActivationConceptExtractor if selection == "activation" else ConceptExtractor
    return extractor(teacher_model(settings, storage, teacher), load_sae(sae.local(storage)), settings.sae.layer_index)


def label_selections(settings: ExperimentSettings) -> list[str]:
    """The label selections of the arms whose branches learn concepts (every CoCoMix mix and λ), in arm order."""
    in_use = {settings.arms[branch.arm].label_selection: None
              for branch in training_branches(settings) if branch.kind == "cocomix"}
    return list(in_use)


def teacher_logits_name(settings: ExperimentSettings, arm: str) -> str:
    """The teacher-logit cache a KD arm reads: one per distinct (τ, top_k), e.g. "tau1-top128"."""
    options = settings.arms[arm]
    return f"tau{options.kd_temperature:g}-top{options.kd_top_k}"


def obtain_teacher(
    settings: ExperimentSettings, storage: Storage, data: PreparedData, tracker: MlflowTracker
) -> Teacher:
    """`teacher.pretrained` (a GGUF converted once into storage), or the small teacher trained on the corpus
    (cached by data and job digest). A pretrained teacher whose tokenizer is not the data's is refused (SPEC §8)."""
    from cocomix_core.data.tokenizer import check_same_tokenizer, hf_tokenizer
    from cocomix_core.model.build import teacher_job
    from cocomix_core.training.trainer import train

    if settings.teacher.pretrained:
        teacher = pretrained_teacher(settings, storage)
        check_same_tokenizer(hf_tokenizer(teacher_folder(teacher, storage)), corpus.data_tokenizer(data.folder(storage)))
        tracker.set_tags({"cocomix.teacher": teacher.identity})
        return teacher
    job = teacher_job(settings, vocab_size=corpus.students_vocab_size(data.folder(storage)))
    key = cache_key("teacher", data.digest, job.digest())
    data.log_to(tracker)
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
    from cocomix_core.concepts import sae as sae_io
    from cocomix_core.plumbing.files import write_json_atomic

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
    from cocomix_core.concepts.sae_fit import sae_train_config, train_sae

    def log(record: dict[str, Any]) -> None:
        tracker.log_metrics({f"sae/{name[4:]}": value for name, value in record.items() if name != "sae_step"},
                            step=int(record["sae_step"]))

    return train_sae(teacher_model(settings, storage, teacher), corpus.training_windows(data_dir, settings.data),
                     settings.sae.layer_index, sae_train_config(settings.sae, settings.data.block_size), log_fn=log)


def label_cache_key(settings: ExperimentSettings, provenance: dict[str, Any], val_windows: int) -> str:
    """Where a label cache lives: keyed by what its labels depend on, not by what the report shows of them."""
    labelling = settings.concepts.model_dump(mode="json", exclude=set(CONCEPT_PRESENTATION))
    return cache_key("labels", provenance, labelling, settings.train.steps, settings.train.batch_size, val_windows)


def publish_concept_files(storage: Storage, label_key: str, label_folder: Path) -> str:
    """The label cache's manifest, concept cards and validation labels under a key of their own beside it, so
    evaluation tasks and the report fetch those kilobytes from remote storage, not the training labels."""
    import shutil

    from cocomix_core.concepts.labels import ConceptFiles

    key = f"{label_key}-concepts"
    with storage.stored_folder(key) as folder:
        for path in ConceptFiles(label_folder).small_files():
            if not (folder / path.name).is_file():
                shutil.copyfile(path, folder / path.name)
    return key


def build_labels(
    settings: ExperimentSettings, storage: Storage, data: PreparedData, teacher: Teacher, sae: SAE
) -> Labels:
    """One teacher pass over every training sample the branches will read per label selection in use, shared by
    all CoCoMix branches (every mix, λ and seed) of that selection.

    Nothing is built when no branch is CoCoMix, or when `concepts.label_source` is "online".
    """
    from cocomix_core.concepts.labels import build_label_cache
    from cocomix_core.data.windows import validation_windows

    selections = label_selections(settings)
    if not selections:
        return Labels(keys={}, note="labels: none needed (no CoCoMix branch)")
    if settings.concepts.label_source != "cache":
        return Labels(keys={}, note=f"labels: extracted online by each branch (concepts.label_source="
                                    f"{settings.concepts.label_source})")
    samples = settings.train.steps * settings.train.batch_size
    # The validation windows evaluation scores get labels too: the students' concept prediction is measured on them.
    val_windows = validation_windows(corpus.load_split(data.folder(storage), "val"), settings.data.block_size,
                                     settings.eval.val_windows)
    keys, concept_keys, notes = {}, {}, []
    for selection in selections:
        provenance = {"data": data.digest, **teacher_provenance(settings, teacher), "sae": sae.ref,
                      "layer_index": settings.sae.layer_index, "label_selection": selection}
        key = label_cache_key(settings, provenance, len(val_windows))
        with storage.stored_folder(key) as folder:
            reused = storage.exists(key)
            build_label_cache(
                concept_extractor(settings, storage, teacher, sae, selection),
                corpus.training_windows(data.folder(storage), settings.data), num_samples=samples,
                batch_size=settings.concepts.extract_batch_size, k=settings.concepts.labels_per_token, out_dir=folder,
                provenance=provenance, val_windows=val_windows,
            )
            concept_keys[selection] = publish_concept_files(storage, key, folder)
        keys[selection] = key
        uri = storage.uri(key)
        notes.append(f"labels ({selection}) already cached at {uri}, reused" if reused
                     else f"labels ({selection}) of {samples:,} training samples cached at {uri}, with those of "
                          f"{len(val_windows)} validation windows and the concept cards")
    return Labels(keys=keys, note="; ".join(notes), concept_keys=concept_keys)


def build_teacher_logits(
    settings: ExperimentSettings, storage: Storage, data: PreparedData, teacher: Teacher
) -> TeacherLogits:
    """The KD arms' teacher targets: top-k log-probs at τ plus the tail's mass for every training sample, one
    cache per distinct (τ, top_k), built once per experiment and shared by every seed (cocomix_core/training/distill.py).

    Nothing is built when no branch is KD, or when `concepts.label_source` is "online" (KD branches then run
    the teacher on each batch: exact full logits).
    """
    from cocomix_core.training.distill import (
        TeacherLogitCache,
        build_teacher_logit_cache,
    )

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
                model, corpus.training_windows(data.folder(storage), settings.data), num_samples=samples,
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
