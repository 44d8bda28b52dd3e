"""Settings -> models and training jobs: the glue between `settings/` and the training loop.

A `TrainJob` is everything one training run needs to know, resolved from the experiment
settings for one branch (an arm of SPEC §9 at one seed and λ) or for the concept teacher.

Models per arm kind: `ntp` and `kd` train a GPT2LMHeadModel; `cocomix` a CoCoMixForCausalLM with
`config.mix` = the arm's mix (insert | add | none); `pause` a CoCoMixForCausalLM with mix "pause".

FLOPs per token (fwd + bwd = 3 × fwd; matmuls only; d width, L layers, T block size, V vocab):
    NTP, KD:          6·(L·P_block + V·d) + 12·L·T·d
    CoCoMix insert:   6·((L_lo + 2·L_up)·P_block + V·d + C·d + k_mix·d) + 12·T·d·(L_lo + 4·L_up)
    pause:            6·((L_lo + 2·L_up)·P_block + V·d) + 12·T·d·(L_lo + 4·L_up)
    CoCoMix add:      6·(L·P_block + V·d + C·d + k_mix·d) + 12·L·T·d
    CoCoMix none:     6·(L·P_block + V·d + C·d) + 12·L·T·d
with P_block = 12·d² + 13·d (a GPT-2 block's parameters, i.e. the non-embedding parameters),
V·d the tied LM head (a per-token matmul, so it is counted although its weight is an
embedding), C·d the concept predictor, k_mix·d the gathered compress layer, and L_lo / L_up
the blocks before / from the insert layer: interleaving runs the upper blocks on 2T positions,
so their parameters count twice per token and their attention four times (twice the positions,
each attending over twice the length). The teacher's passes (concept labels, KD targets) are
not counted: they are made once per experiment, shared by every branch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PretrainedConfig, PreTrainedModel

from cocomix_core.model.modeling_cocomix import (
    INTERLEAVED_MIX_MODES,
    CoCoMixConfig,
    CoCoMixForCausalLM,
)
from cocomix_core.plumbing.files import sha256_json
from settings.loader import settings_digest
from settings.schema import (
    GPT2_VOCAB_SIZE,
    ArmKind,
    Branch,
    ExperimentSettings,
    ModelShape,
    TrainSettings,
)

TEACHER_JOB_NAME = "teacher"


def flops_per_token(config: PretrainedConfig, block_size: int) -> float:
    """Training FLOPs per token of a GPT-2 or CoCoMix-family model (formulas in the module docstring)."""
    d, layers, vocab = config.n_embd, config.n_layer, config.vocab_size
    block_params = 12 * d * d + 13 * d
    if not isinstance(config, CoCoMixConfig):
        return 6 * (layers * block_params + vocab * d) + 12 * layers * block_size * d
    concept_params = {"insert": config.concept_dim + config.concept_num, "add": config.concept_dim + config.concept_num,
                      "none": config.concept_dim, "pause": 0}[config.mix] * d
    if config.mix not in INTERLEAVED_MIX_MODES:
        return 6 * (layers * block_params + vocab * d + concept_params) + 12 * layers * block_size * d
    lower = config.insert_layer_index
    upper = layers - lower
    matmul_params = (lower + 2 * upper) * block_params + vocab * d + concept_params
    return 6 * matmul_params + 12 * block_size * d * (lower + 4 * upper)


def build_model(
    kind: ArmKind,
    shape: ModelShape,
    block_size: int,
    *,
    concept_dim: int | None = None,
    concept_num: int | None = None,
    insert_layer_index: int | None = None,
    mix: Literal["insert", "add", "none"] = "insert",
    seed: int,
) -> PreTrainedModel:
    """A freshly initialised GPT-2 LM (`ntp`, `kd`) or CoCoMix-family model (`cocomix`, `pause`), on the CPU, seeded.

    The global torch RNG is left untouched, so building a model never shifts other random draws.
    """
    # A shape without vocab_size is GPT-2's; jobs of other tokenizers are sized by `sized_shape`.
    vocab_size = shape.vocab_size or GPT2_VOCAB_SIZE
    # GPT-2's end-of-text id (its config's default) exists only in GPT-2-sized vocabularies; on others the
    # trainer sets the data's EOS id (trainer._end_documents_with).
    special_ids = {} if vocab_size >= GPT2_VOCAB_SIZE else {"bos_token_id": None, "eos_token_id": None}
    gpt2_fields = dict(
        n_embd=shape.width,
        n_layer=shape.depth,
        n_head=shape.heads,
        vocab_size=vocab_size,
        n_positions=block_size,
        resid_pdrop=0.0,  # SPEC §5: dropout 0 everywhere
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation=shape.attn_implementation,
        **special_ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind in ("ntp", "kd"):
            return GPT2LMHeadModel(GPT2Config(**gpt2_fields))
        if kind == "pause":
            if insert_layer_index is None:
                raise ValueError("a pause model needs insert_layer_index")
            # concept sizes are unused by a pause model (it has no concept layers); 1 keeps the config valid
            return CoCoMixForCausalLM(CoCoMixConfig(
                **gpt2_fields, concept_dim=1, concept_num=1, insert_layer_index=insert_layer_index, mix="pause"
            ))
        if kind == "cocomix":
            missing = [n for n, v in [("concept_dim", concept_dim), ("concept_num", concept_num),
                                      ("insert_layer_index", insert_layer_index)] if v is None]
            if missing:
                raise ValueError(f"a cocomix model needs {', '.join(missing)}")
            config = CoCoMixConfig(
                **gpt2_fields, concept_dim=concept_dim, concept_num=concept_num, insert_layer_index=insert_layer_index,
                mix=mix,
            )
            return CoCoMixForCausalLM(config)
    raise ValueError(f"unknown model kind {kind!r}; expected one of ntp, cocomix, kd, pause")


@dataclass(frozen=True)
class TrainJob:
    """One training run, fully resolved: model shape, optimisation, data stream, concept and distillation options."""

    name: str
    kind: ArmKind
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
    mix: Literal["insert", "add", "none"] = "insert"  # (cocomix only)
    label_selection: Literal["attribution", "activation"] = "attribution"  # (cocomix only)
    lam_kd: float = 0.0  # (kd only)
    kd_temperature: float = 1.0  # τ (kd only)
    kd_top_k: int | None = None  # teacher logits cached per token (kd only)
    settings_digest: str = ""

    def build_model(self) -> PreTrainedModel:
        """This job's freshly initialised model."""
        return build_model(
            self.kind, self.shape, self.block_size, concept_dim=self.concept_dim,
            concept_num=self.concept_num, insert_layer_index=self.insert_layer_index, mix=self.mix, seed=self.seed,
        )

    @property
    def auxiliary_weight(self) -> float:
        """Weight of the second loss term: λ for L_concept (cocomix), λ_kd·τ² for the KL (kd), else 0."""
        if self.kind == "cocomix":
            return self.lam_concept
        if self.kind == "kd":
            return self.lam_kd * self.kd_temperature**2
        return 0.0

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
    cocomix_core.data.tokenizer.student_vocab_size), else GPT-2's 50257 when the tokenizer is GPT-2."""
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
    if branch.kind == "kd":
        return TrainJob(**common, lam_kd=arm.lam_kd, kd_temperature=arm.kd_temperature, kd_top_k=arm.kd_top_k)
    if branch.kind == "pause":
        return TrainJob(**common, insert_layer_index=arm.insert_layer_index)
    return TrainJob(
        **common,
        lam_concept=branch.lam_concept,
        concept_dim=settings.sae.num_latents,
        concept_num=arm.concept_num,
        insert_layer_index=arm.insert_layer_index,
        labels_per_token=settings.concepts.labels_per_token,
        mix=arm.mix,
        label_selection=arm.label_selection,
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
