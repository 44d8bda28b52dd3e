"""cocomix_core: the CoCoMix library, one subpackage per concern, in the order the data flows through them.

    data/        corpus -> token shards (tokenizer, corpus, windows)            stage: prepare
    concepts/    teacher, TopK SAE, concept labels (teachers, sae, sae_fit, labels)  stage: concepts
    model/       the CoCoMix student (modeling_cocomix), models from settings (build), model folders (folders)
    training/    the training loop (trainer), KD targets (distill), checkpoints stage: train
    evaluation/  validation perplexity and lm-eval tasks (evaluator, offline_tasks)  stage: evaluate
    reporting/   curves, verdicts, plots (report), card pages (card), end-of-run text  stage: report
    plumbing/    storage, tracking (the one module that talks to MLflow), files, progress, interrupts,
                 launch, preflight, keys

Each concern's `stage.py` is what its flow step runs; `stages` lists them all. Nothing in here
imports Metaflow; every capability is a plain function or class.
"""

from pathlib import Path

__version__ = "0.1.0"
# The checkout (or install) root: default homes of the MLflow store and the artifacts folder.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
