"""Settings -> models and training jobs: the glue between `settings/` and the training loop.

A `TrainJob` is everything one training run needs to know, resolved from the experiment
settings for one branch (an NTP or CoCoMix arm at one seed and λ) or for the concept teacher.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from cocomix_core.fileio import sha256_json
from cocomix_core.modeling import CoCoMixConfig, CoCoMixForCausalLM
from settings.loader import settings_digest
from settings.schema import GPT2_VOCAB_SIZE, Branch, ExperimentSettings, ModelShape, TrainSettings

TEACHER_JOB_NAME = "teacher"


def build_model(
    kind: Literal["ntp", "cocomix"],
    shape: ModelShape,
    block_size: int,
    *,
    concept_dim: int | None = None,
    concept_num: int | None = None,
    insert_layer_index: int | None = None,
    seed: int,
) -> PreTrainedModel:
    """A freshly initialised GPT-2 LM (`ntp`) or CoCoMix student, on the CPU, seeded.

    The global torch RNG is left untouched, so building a model never shifts other random draws.
    """
    # A shape without vocab_size is GPT-2's; jobs of other tokenizers are sized by `sized_shape`.
    gpt2_fields = dict(
        n_embd=shape.width,
        n_layer=shape.depth,
        n_head=shape.heads,
        vocab_size=shape.vocab_size or GPT2_VOCAB_SIZE,
        n_positions=block_size,
        resid_pdrop=0.0,  # SPEC §5: dropout 0 everywhere
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation=shape.attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "ntp":
            return GPT2LMHeadModel(GPT2Config(**gpt2_fields))
        if kind == "cocomix":
            missing = [n for n, v in [("concept_dim", concept_dim), ("concept_num", concept_num),
                                      ("insert_layer_index", insert_layer_index)] if v is None]
            if missing:
                raise ValueError(f"a cocomix model needs {', '.join(missing)}")
            config = CoCoMixConfig(
                **gpt2_fields, concept_dim=concept_dim, concept_num=concept_num, insert_layer_index=insert_layer_index
            )
            return CoCoMixForCausalLM(config)
    raise ValueError(f"unknown model kind {kind!r}; expected 'ntp' or 'cocomix'")


@dataclass(frozen=True)
class TrainJob:
    """One training run, fully resolved: model shape, optimisation, data stream and concept sizes."""

    name: str
    kind: Literal["ntp", "cocomix"]
    shape: ModelShape
    train: TrainSettings
    block_size: int
    window_seed: int
    seed: int  # model initialisation seed
    lam_concept: float = 0.0
    concept_dim: int | None = None  # C, the SAE dictionary size (cocomix only)
    concept_num: int | None = None  # k_mix (cocomix only)
    insert_layer_index: int | None = None  # (cocomix only)
    labels_per_token: int | None = None  # K (cocomix only)
    settings_digest: str = ""

    def build_model(self) -> PreTrainedModel:
        """This job's freshly initialised model."""
        return build_model(
            self.kind, self.shape, self.block_size, concept_dim=self.concept_dim,
            concept_num=self.concept_num, insert_layer_index=self.insert_layer_index, seed=self.seed,
        )

    def digest(self) -> str:
        """sha256 of every field that changes the computation (not the name, not the experiment digest).

        A run resumes only from trainer state written under the same job digest.
        """
        fields = dataclasses.asdict(self) | {"shape": self.shape.model_dump(), "train": self.train.model_dump()}
        for unrelated in ("name", "settings_digest"):
            fields.pop(unrelated)
        # Threads and loop cadence change neither the weights nor the metric values.
        for cadence in ("cpu_threads", "log_every"):
            fields["train"].pop(cadence)
        return sha256_json(fields)


def sized_shape(shape: ModelShape, settings: ExperimentSettings, vocab_size: int | None) -> ModelShape:
    """`shape` with its embedding rows: its own vocab_size, else `vocab_size` (the tokenizer's, from
    cocomix_core.tokenizer.student_vocab_size), else GPT-2's 50257 when the tokenizer is GPT-2."""
    if shape.vocab_size is not None:
        return shape
    if vocab_size is None and settings.tokenizer.name != "gpt2":
        raise ValueError(f"tokenizer.name={settings.tokenizer.name}: pass the tokenizer's vocab_size to size the models")
    return shape.model_copy(update={"vocab_size": vocab_size or GPT2_VOCAB_SIZE})


def job_for_branch(settings: ExperimentSettings, branch: Branch, vocab_size: int | None = None) -> TrainJob:
    """The training job of one branch (see `settings.training_branches`); vocab_size: the tokenizer's, padded."""
    arm = settings.arms[branch.arm]
    common = dict(
        name=branch.name, kind=branch.kind, shape=sized_shape(arm.model, settings, vocab_size), train=settings.train,
        block_size=settings.data.block_size, window_seed=settings.data.window_seed,
        seed=branch.seed, settings_digest=settings_digest(settings),
    )
    if branch.kind == "ntp":
        return TrainJob(**common)
    return TrainJob(
        **common,
        lam_concept=branch.lam_concept,
        concept_dim=settings.sae.num_latents,
        concept_num=arm.concept_num,
        insert_layer_index=arm.insert_layer_index,
        labels_per_token=settings.concepts.labels_per_token,
    )


def teacher_job(settings: ExperimentSettings, vocab_size: int | None = None) -> TrainJob:
    """The job that trains the concept teacher: a plain GPT-2 LM on the same corpus and windows."""
    if settings.teacher.train is None:
        raise ValueError(
            f"teacher.pretrained={settings.teacher.pretrained!r} is set and teacher.train is empty: nothing to train"
        )
    return TrainJob(
        name=TEACHER_JOB_NAME, kind="ntp", shape=sized_shape(settings.teacher.model, settings, vocab_size),
        train=settings.teacher.train,
        block_size=settings.data.block_size, window_seed=settings.data.window_seed,
        seed=settings.teacher.train.seed, settings_digest=settings_digest(settings),
    )
