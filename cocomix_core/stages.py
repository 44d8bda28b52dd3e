"""The experiment's stages in the data's order: what each flow step does, as plain functions of settings and storage.

    data = prepare_data(settings, storage, tracker)                           # data/stage.py
    teacher = obtain_teacher(settings, storage, data, tracker)                # concepts/stage.py
    sae = fit_sae(settings, storage, data, teacher, tracker)
    labels = build_labels(settings, storage, data, teacher, sae)
    teacher_logits = build_teacher_logits(settings, storage, data, teacher)
    trained = train_branch(settings, storage, branch, run_folder_key(experiment, branch.name), data, teacher, sae,
                           labels, tracker, teacher_logits=teacher_logits)    # training/stage.py
    metrics, replicates = evaluate_checkpoint_job(settings, storage, data, checkpoint, 1)   # evaluation/stage.py
    metrics |= concept_prediction_job(settings, storage, data, labels, branch, checkpoint)
    files = write_report(evaluations, out_dir, tracker, data.unigram_ppl)        # reporting/stage.py
    concepts = write_concepts_report(settings, storage, data, labels, evaluations, concepts_dir, tracker)

Each stage lives with its concern, beside the small result type it hands on, and caches its product
in storage under a key derived from what it is computed from, so a rerun reuses it. A result
carries keys, URIs, digests and a one-line `note` saying what the stage did or why it did nothing.
Stages log to the tracker they are given; creating runs, lineage tags and parallelism belong to the
orchestrator (flows/cocomix_flow.py runs them as Metaflow steps; tests/test_stages.py in-process).
"""

from cocomix_core.concepts.stage import (
    SAE,
    Labels,
    Teacher,
    TeacherLogits,
    build_labels,
    build_teacher_logits,
    fit_sae,
    obtain_teacher,
)
from cocomix_core.data.stage import PreparedData, prepare_data
from cocomix_core.evaluation.stage import (
    checkpoint_model_id,
    concept_prediction_job,
    evaluate_checkpoint_job,
    log_evaluation,
)
from cocomix_core.plumbing.keys import run_folder_key, section_params
from cocomix_core.reporting.stage import (
    report_arm,
    write_concepts_report,
    write_report,
)
from cocomix_core.training.stage import (
    Checkpoint,
    GangNode,
    TrainedBranch,
    train_branch,
    train_gang_worker,
)

__all__ = [
    "PreparedData", "prepare_data",
    "Teacher", "SAE", "Labels", "TeacherLogits", "obtain_teacher", "fit_sae", "build_labels", "build_teacher_logits",
    "Checkpoint", "GangNode", "TrainedBranch", "train_branch", "train_gang_worker",
    "evaluate_checkpoint_job", "concept_prediction_job", "checkpoint_model_id", "log_evaluation",
    "report_arm", "write_report", "write_concepts_report",
    "run_folder_key", "section_params",
]
