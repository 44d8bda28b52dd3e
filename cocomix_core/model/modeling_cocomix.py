"""CoCoMix student model (SPEC §3). Self-contained: imports only torch and transformers,
because `save_pretrained` copies this file next to checkpoints for trust_remote_code loading.

Layout (state-dict keys match the released checkpoints):
    transformer.{wte, wpe, h.N.*, ln_f}      GPT-2 pieces from transformers
    transformer.pre_bias                     (d,) zeros at init
    transformer.concept_predictor            Linear d -> C  (concept logits z)
    transformer.compress_layer               Linear C -> d  (sparse concept -> continuous concept)
    lm_head.weight                           tied to transformer.wte.weight

Blocks before `insert_layer_index` see one position per token; from that block on the sequence is
h_1, c_1, h_2, c_2, ... (2T positions) and the logits are read at the concept positions c_t.
The KV cache follows the same layout: one entry per token before the insert layer, two after.

`config.mix` selects the paper's baselines and ablations (SPEC §9) in the same class:
    insert   the CoCoMix student above (the default; released checkpoints load as this)
    add      h_t + c_t instead of interleaving: T positions throughout
    none     concept prediction (and its loss) at the insert layer, nothing mixed; no compress_layer
    pause    c_t replaced by one learned vector `transformer.pause_vector` (d), interleaved as in
             `insert`; no pre_bias, concept predictor or compress layer, no concept loss
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import (
    strict,  # ships with transformers; GPT2Config uses it too
)
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.models.gpt2.modeling_gpt2 import GPT2Block, GPT2PreTrainedModel
from transformers.utils import ModelOutput

MIX_MODES = ("insert", "add", "none", "pause")
INTERLEAVED_MIX_MODES = ("insert", "pause")  # two positions per token from the insert layer on


def bessel_layer_norm(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC's LN: (x - mean) / (std + eps) with Bessel-corrected std, no affine; returns (x_hat, mean, std)."""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=True)
    return (x - mean) / (std + eps), mean, std


@strict
class CoCoMixConfig(GPT2Config):
    """GPT2Config plus the concept sizes: C (`concept_dim`), k_mix (`concept_num`), the insert block and `mix`."""

    model_type = "cocomix"
    concept_dim: int = 32768
    concept_num: int = 32
    insert_layer_index: int = 3
    mix: Literal["insert", "add", "none", "pause"] = "insert"

    def __post_init__(self, **kwargs):
        # Checked here (not in a `validate_*` hook) so that callers get a plain ValueError.
        if not 0 <= self.insert_layer_index < self.n_layer:
            raise ValueError(
                f"insert_layer_index must be in [0, n_layer={self.n_layer}), got {self.insert_layer_index}"
            )
        if self.concept_dim < 1:
            raise ValueError(f"concept_dim must be positive, got {self.concept_dim}")
        if not 1 <= self.concept_num <= self.concept_dim:
            raise ValueError(
                f"concept_num (k_mix) must be in [1, concept_dim={self.concept_dim}], got {self.concept_num}"
            )
        if self.mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {', '.join(MIX_MODES)}, got {self.mix!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        super().__post_init__(**kwargs)


@dataclass
class CoCoMixModelOutput(ModelOutput):
    """Trunk output: ln_f-normalised states at the concept positions, concept logits z (and their
    loss when labels were given), the KV cache."""

    last_hidden_state: torch.Tensor | None = None
    concept_logits: torch.Tensor | None = None
    concept_loss: torch.Tensor | None = None
    cache: Cache | None = None


@dataclass
class CoCoMixCausalLMOutput(ModelOutput):
    """`loss` is the next-token loss ONLY; the trainer adds λ·concept_loss itself (see `concept_loss`).

    `concept_loss` is filled when `concept_labels` are passed to forward, for convenience.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    concept_logits: torch.Tensor | None = None
    concept_loss: torch.Tensor | None = None
    cache: Cache | None = None  # transformers 5 generation reads the key "cache"

    @property
    def past_key_values(self) -> Cache | None:
        """Pre-transformers-5 name of `cache`."""
        return self.cache


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors so that log-sum-exps are taken in float32 (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE with the HF shift: logits[:, :-1] predict labels[:, 1:]; label -100 is ignored.

    The labels are shifted (last position gets -100) rather than the logits sliced, which would copy B×T×V.
    """
    shifted_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(_at_least_float32(logits).flatten(0, 1), shifted_labels.flatten(), ignore_index=-100)


def concept_loss(concept_logits: torch.Tensor, concept_labels: torch.Tensor) -> torch.Tensor:
    """L_concept = mean over tokens of logsumexp(z) - mean_j z[label_j]  (== (1/K) Σ_j CE(z, label_j)).

    concept_logits: B×T×C, concept_labels: B×T×K int64. Computed in float32 even under bf16 autocast.
    """
    loss, _, _ = ConceptLossAndTopK.apply(concept_logits, concept_labels, 0)
    return loss


def concept_loss_and_topk(
    concept_logits: torch.Tensor, concept_labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(`concept_loss`, TopK values, TopK indices) of z, with one backward that writes dL/dz once."""
    return ConceptLossAndTopK.apply(concept_logits, concept_labels, k)


CHUNK_ELEMENTS = 1 << 20  # rows of wide logits are processed in ~4 MB chunks that stay in cache


def row_chunks(rows: int, width: int) -> Iterator[slice]:
    """Slices of `rows` rows of `width` elements, each about CHUNK_ELEMENTS: row-wise passes on cached chunks."""
    step = max(1, CHUNK_ELEMENTS // width)
    return (slice(start, start + step) for start in range(0, rows, step))


class ConceptLossAndTopK(torch.autograd.Function):
    """The concept loss and the TopK of z as one autograd node.

    With the loss, the TopK and the label gather as separate nodes, autograd builds three dense
    N×C gradients (two of them zero-filled scatters) and adds them up; with C = 32k that traffic
    costs more than the concept predictor's matmuls on a CPU. Here backward writes softmax(z)·g
    into one buffer, chunk by chunk, then scatters the label and TopK terms into it.
    """

    @staticmethod
    def forward(ctx, concept_logits: torch.Tensor, concept_labels: torch.Tensor, k: int):
        z = concept_logits.flatten(0, -2)
        labels = concept_labels.flatten(0, -2)
        compute_dtype = torch.promote_types(z.dtype, torch.float32)  # float64 stays float64
        log_partition = torch.empty(len(z), dtype=compute_dtype, device=z.device)
        for rows in row_chunks(*z.shape):
            chunk = z[rows].to(compute_dtype)
            log_partition[rows] = torch.logsumexp(chunk, dim=-1)
        label_logits = z.gather(-1, labels).to(compute_dtype).mean(dim=-1)
        loss = (log_partition - label_logits).mean()
        if k:
            top_values, top_indices = torch.topk(concept_logits, k, dim=-1)
        else:
            top_values = concept_logits.new_empty((*concept_logits.shape[:-1], 0))
            top_indices = concept_labels.new_empty(top_values.shape)
        ctx.mark_non_differentiable(top_indices)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(z, labels, log_partition, top_indices.flatten(0, -2))
        ctx.logits_shape = concept_logits.shape
        return loss, top_values, top_indices

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_top_values, _):
        z, labels, log_partition, top_indices = ctx.saved_tensors
        if grad_loss is None and grad_top_values is None:
            return None, None, None
        if grad_loss is None:
            grad_z = torch.zeros(z.shape, dtype=log_partition.dtype, device=z.device)
        else:
            tokens, labels_per_token = labels.shape
            scale = grad_loss / tokens
            grad_z = torch.empty(z.shape, dtype=log_partition.dtype, device=z.device)
            for rows in row_chunks(*z.shape):  # softmax(z) · g / N
                torch.sub(z[rows], log_partition[rows, None], out=grad_z[rows]).exp_().mul_(scale)
            grad_z.scatter_add_(-1, labels, (-scale / labels_per_token).expand(labels.shape))
        if grad_top_values is not None:
            grad_z.scatter_add_(-1, top_indices, grad_top_values.flatten(0, -2).to(grad_z.dtype))
        return grad_z.to(z.dtype).view(ctx.logits_shape), None, None


def compress_sparse_concepts(values: torch.Tensor, indices: torch.Tensor, compress_layer: nn.Linear) -> torch.Tensor:
    """compress_layer(z_k) where z_k holds `values` at `indices` (…×k) and zeros elsewhere.

    Gathers the k selected columns of the C-wide weight instead of multiplying by a mostly-zero vector.
    The C×d copy makes each column a contiguous row: gathering and scattering rows is 2x faster.
    """
    weight_columns = F.embedding(indices, compress_layer.weight.t().contiguous())  # …×k×d
    return torch.einsum("...k,...kd->...d", values.to(weight_columns.dtype), weight_columns) + compress_layer.bias


def positions_from_mask(attention_mask: torch.Tensor | None, past_tokens: int, new_tokens: int, device) -> torch.Tensor:
    """wpe indices of the new tokens: count only real tokens, so left padding does not shift positions."""
    if attention_mask is None:
        return torch.arange(past_tokens, past_tokens + new_tokens, device=device).unsqueeze(0)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -new_tokens:]


def causal_attention_mask(
    key_is_real: torch.Tensor | None, query_len: int, past_len: int, implementation: str, dtype: torch.dtype, device
) -> torch.Tensor | None:
    """4D mask (B|1)×1×q×k for the queries at key positions past_len…past_len+q-1.

    sdpa gets a boolean mask (True = attend), eager an additive one. Padding queries may attend to
    themselves so that no softmax row is empty (an all-masked row would produce NaNs).
    Returns None when sdpa's built-in causal mask is exact (no padding, no cache).
    """
    if key_is_real is None and past_len == 0 and implementation == "sdpa":
        return None
    query_pos = torch.arange(past_len, past_len + query_len, device=device)[:, None]
    key_pos = torch.arange(past_len + query_len, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None]
    if key_is_real is not None:
        allowed = (allowed & key_is_real.bool()[:, None, :]) | (key_pos == query_pos)[None]
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class CoCoMixPreTrainedModel(GPT2PreTrainedModel):
    """GPT-2 init scheme, plus zeros for `pre_bias` and N(0, 0.02²) for the pause vector (SPEC §9)."""

    config: CoCoMixConfig
    config_class = CoCoMixConfig

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CoCoMixModel) and module.pre_bias is not None:
            init.zeros_(module.pre_bias)
        if isinstance(module, CoCoMixModel) and module.pause_vector is not None:
            init.normal_(module.pause_vector, mean=0.0, std=self.config.initializer_range)


class CoCoMixModel(CoCoMixPreTrainedModel):
    """The GPT-2 trunk with concept prediction and mixing at block `insert_layer_index` (SPEC §3)."""

    def __init__(self, config: CoCoMixConfig):
        super().__init__(config)
        width = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, width)
        self.wpe = nn.Embedding(config.n_positions, width)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPT2Block(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(width, eps=config.layer_norm_epsilon)
        # Only the parameters an arm uses exist, so parameter counts compare arms honestly.
        predicts = config.mix != "pause"
        self.pre_bias = nn.Parameter(torch.zeros(width)) if predicts else None
        self.concept_predictor = nn.Linear(width, config.concept_dim) if predicts else None
        self.compress_layer = nn.Linear(config.concept_dim, width) if config.mix in ("insert", "add") else None
        self.pause_vector = nn.Parameter(torch.zeros(width)) if config.mix == "pause" else None
        self.concept_steering: dict[int, float] = {}  # concept id -> offset added to z before TopK
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    @property
    def positions_per_token(self) -> int:
        """Sequence positions a token owns from the insert layer on (and so KV-cache entries in those layers)."""
        return 2 if self.config.mix in INTERLEAVED_MIX_MODES else 1

    def predict_concepts(self, h: torch.Tensor, concept_labels: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SPEC §3 steps 1-2 only (`mix: none`): (concept logits z, L_concept when labels are given)."""
        h_normed, _, _ = bessel_layer_norm(h)
        concept_logits = self.concept_predictor(h_normed - self.pre_bias)
        loss = concept_loss(concept_logits, concept_labels) if concept_labels is not None else None
        return concept_logits, loss

    def predict_and_mix_concepts(
        self, h: torch.Tensor, concept_labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """SPEC §3 steps 1-4: (concept logits z, continuous concept c, L_concept when labels are given)."""
        h_normed, mean, std = bessel_layer_norm(h)
        concept_logits = self.concept_predictor(h_normed - self.pre_bias)
        loss, top_values, top_indices = self._concept_loss_and_topk(concept_logits, concept_labels)
        compressed = compress_sparse_concepts(top_values, top_indices, self.compress_layer)
        continuous_concept = (compressed + self.pre_bias) * std + mean
        return concept_logits, continuous_concept, loss

    def _concept_loss_and_topk(
        self, concept_logits: torch.Tensor, concept_labels: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        k = self.config.concept_num
        if concept_labels is not None and not self.concept_steering:
            return concept_loss_and_topk(concept_logits, concept_labels, k)  # the training path, fused
        # Steering changes what TopK sees, never the loss: that scores the model's own predictions.
        loss = concept_loss(concept_logits, concept_labels) if concept_labels is not None else None
        return loss, *torch.topk(self._apply_steering(concept_logits), k, dim=-1)

    def _apply_steering(self, concept_logits: torch.Tensor) -> torch.Tensor:
        if not self.concept_steering:
            return concept_logits
        offsets = torch.zeros(self.config.concept_dim, dtype=concept_logits.dtype, device=concept_logits.device)
        ids = torch.tensor(list(self.concept_steering), device=offsets.device)
        offsets[ids] = torch.tensor(list(self.concept_steering.values()), dtype=offsets.dtype, device=offsets.device)
        return concept_logits + offsets

    def _mix(self, h: torch.Tensor, concept_labels: torch.Tensor | None
             ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(concept logits, the sequence entering block insert_layer_index, L_concept) for `config.mix`."""
        mix = self.config.mix
        if mix == "pause":
            pause = self.pause_vector.to(h.dtype).expand_as(h)
            return None, torch.stack([h, pause], dim=2).flatten(1, 2), None  # h_1, p, h_2, p, ...
        if mix == "none":
            concept_logits, loss = self.predict_concepts(h, concept_labels)
            return concept_logits, h, loss
        concept_logits, continuous_concept, loss = self.predict_and_mix_concepts(h, concept_labels)
        if mix == "add":
            return concept_logits, h + continuous_concept, loss
        return concept_logits, torch.stack([h, continuous_concept], dim=2).flatten(1, 2), loss  # h_1, c_1, h_2, ...

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        concept_labels: torch.LongTensor | None = None,
    ) -> CoCoMixModelOutput:
        """Run the trunk on `input_ids` (B×T new tokens); `attention_mask` covers cached + new tokens."""
        batch, new_tokens = input_ids.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        # The last layer always runs after the insert layer: positions_per_token cache entries per token.
        per_token = self.positions_per_token
        past_tokens = cache.get_seq_length(self.config.n_layer - 1) // per_token if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past_tokens + new_tokens:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens, expected cached {past_tokens} + new {new_tokens}"
            )
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past_tokens, new_tokens, input_ids.device)

        h = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        insert_at = self.config.insert_layer_index
        implementation = self.config._attn_implementation
        token_mask = causal_attention_mask(attention_mask, new_tokens, past_tokens, implementation, h.dtype, h.device)
        for block in self.h[:insert_at]:
            h = block(h, cache=cache, attention_mask=token_mask, use_cache=use_cache)

        concept_logits, x, concept_loss_value = self._mix(h, concept_labels)
        if per_token == 1:
            upper_mask = token_mask
        else:  # each token owns two positions from here on; its padding flag applies to both
            pair_is_real = attention_mask.repeat_interleave(2, dim=-1) if attention_mask is not None else None
            upper_mask = causal_attention_mask(
                pair_is_real, 2 * new_tokens, 2 * past_tokens, implementation, x.dtype, x.device
            )
        for block in self.h[insert_at:]:
            x = block(x, cache=cache, attention_mask=upper_mask, use_cache=use_cache)

        output_positions = x[:, 1::2] if per_token == 2 else x  # the concept (or pause) positions
        return CoCoMixModelOutput(
            last_hidden_state=self.ln_f(output_positions),
            concept_logits=concept_logits,
            concept_loss=concept_loss_value,
            cache=cache,
        )


class CoCoMixForCausalLM(CoCoMixPreTrainedModel, GenerationMixin):
    """CoCoMix LM: logits, next-token loss and concept logits; works with `generate()` and its KV cache.

    The concept loss is NOT part of `.loss`: compute `loss + λ * concept_loss(out.concept_logits, labels)`.

    Steering (SPEC §7): `model.set_concept_steering({concept_id: offset})` or
    `with model.steer_concepts({concept_id: offset}): model.generate(...)` adds `offset` to those
    concept logits before the TopK step, so a large positive offset forces the concept into z_k at
    every token with that boosted value. Returned `concept_logits` stay the unsteered predictions.
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: CoCoMixConfig):
        super().__init__(config)
        self.transformer = CoCoMixModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(
        cls, *args, ignore_mismatched_sizes: bool = False, output_loading_info: bool = False, **kwargs
    ):
        """transformers' loader, but a shape mismatch (e.g. another concept_dim) raises a ValueError naming the keys."""
        model, info = super().from_pretrained(*args, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs)
        if info["mismatched_keys"] and not ignore_mismatched_sizes:
            details = sorted(
                f"{key}: checkpoint {tuple(ckpt)} vs config {tuple(ours)}" for key, ckpt, ours in info["mismatched_keys"]
            )
            raise ValueError("checkpoint shapes do not match the config (concept_dim?): " + "; ".join(details))
        return (model, info) if output_loading_info else model

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        concept_labels: torch.LongTensor | None = None,
        **generation_flags,  # return_dict, output_attentions, ... passed by generate(); not supported
    ) -> CoCoMixCausalLMOutput:
        """Logits B×T×V, concept logits B×T×C, next-token `loss` when `labels` are given."""
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        trunk = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            concept_labels=concept_labels,
        )
        logits = self.lm_head(trunk.last_hidden_state)
        return CoCoMixCausalLMOutput(
            loss=next_token_loss(logits, labels) if labels is not None else None,
            logits=logits,
            concept_logits=trunk.concept_logits,
            concept_loss=trunk.concept_loss,
            cache=trunk.cache,
        )

    def set_concept_steering(self, offsets: Mapping[int, float] | None) -> None:
        """Add offsets[c] to concept logit c before TopK on every forward; None or {} turns steering off."""
        offsets = dict(offsets or {})
        if offsets and self.config.mix not in ("insert", "add"):
            raise ValueError(f"steering needs mixed concepts; this model has mix={self.config.mix!r}")
        bad_ids = [c for c in offsets if not 0 <= c < self.config.concept_dim]
        if bad_ids:
            raise ValueError(f"concept ids {bad_ids} are outside [0, concept_dim={self.config.concept_dim})")
        self.transformer.concept_steering = {int(c): float(v) for c, v in offsets.items()}

    @contextlib.contextmanager
    def steer_concepts(self, offsets: Mapping[int, float]) -> Iterator[CoCoMixForCausalLM]:
        """Context manager form of `set_concept_steering`; restores the previous steering on exit."""
        previous = dict(self.transformer.concept_steering)
        self.set_concept_steering(offsets)
        try:
            yield self
        finally:
            self.transformer.concept_steering = previous


def load_released_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strictly load a checkpoint with the released key names; ValueError lists missing/unexpected/mis-sized keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            "state dict does not match the model:\n"
            f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n  shape mismatches: {mismatched}"
        )
    model.load_state_dict(state_dict, strict=True)


CoCoMixConfig.register_for_auto_class()
CoCoMixForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register("cocomix", CoCoMixConfig, exist_ok=True)
AutoModelForCausalLM.register(CoCoMixConfig, CoCoMixForCausalLM, exist_ok=True)
