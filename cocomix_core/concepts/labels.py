"""Concept labels from a frozen teacher and a TopK SAE (SPEC §2), and their on-disk cache.

For a window of token ids, with x the teacher's residual after block `layer_index` (before
any final norm), a = SAE latents of x, g = ∂L_teacher/∂x (L_teacher: mean next-token CE of
the teacher on the same window, HF shift):

    s = (g @ W_dec) ⊙ a            attribution scores, B×T×C
    labels = top-K indices of s     per token, K <= k_sae

How it is computed, and why it equals the dense definition:
- One teacher forward. A hook on block `layer_index` swaps its output for a detached copy
  that requires grad, so autograd records only the blocks above it (teacher parameters are
  frozen) and `torch.autograd.grad(loss, x)` stops there: no parameter gradients, no
  backward through the lower blocks.
- a is zero off the SAE's top-k_sae support, so s is too. On the support,
  s = (g · W_dec[:, idx]) · a_idx: k_sae dot products of width d per token, never a C-wide
  product or a B×T×C tensor.
- Labels: the dense top-K over C picks zeros from off the support before any negative score.
  So the candidates are the k_sae support scores plus K "virtual zeros": the K smallest
  latent indices not in the token's support, each with score 0. The top-K of those
  candidates has exactly the dense top-K's scores; among equal scores (zeros) the choice is
  arbitrary in the SPEC, and here it is deterministic (support entries first, then the
  smallest off-support indices).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cocomix_core.concepts.cards import CARDS_FILE, CardCollector, ConceptCards
from cocomix_core.concepts.sae import TopKSAE
from cocomix_core.model.modeling_cocomix import row_chunks
from cocomix_core.plumbing.files import atomic_path, sha256_file
from cocomix_core.plumbing.progress import Progress, quiet_third_party, say

LABEL_DTYPE = np.uint16
MAX_CONCEPT_DIM = int(np.iinfo(LABEL_DTYPE).max) + 1  # 65536
CACHE_FORMAT = "cocomix-concept-labels-v1"
LABELS_FILE = "labels.u16"
MANIFEST_FILE = "manifest.json"
VAL_LABELS_FILE = "val_labels.u16"


# ----- teacher plumbing ----------------------------------------------------------------------
def teacher_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a transformers causal LM (GPT-2, Llama, and kin)."""
    num_layers = getattr(model.config, "num_hidden_layers", None)
    for path in ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks"):
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and (num_layers is None or len(module) == num_layers):
            return module
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def _block_output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_block_output(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (tensor,) + tuple(output[1:])
    if isinstance(output, list):
        return [tensor] + list(output[1:])
    return tensor


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_residual(teacher: nn.Module, input_ids: torch.Tensor, layer_index: int) -> torch.Tensor:
    """Residual stream after block `layer_index` (pre final norm), B×T×d; blocks above it are skipped."""
    blocks = teacher_blocks(teacher)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(_block_output_tensor(output))
        raise _StopForward

    handle = blocks[layer_index].register_forward_hook(hook)
    try:
        teacher(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {layer_index} of the teacher never ran")
    return captured[0]


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


@quiet_third_party()  # transformers' "Loading weights" bar
def load_teacher(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A pretrained causal LM (hub name such as `openai-community/gpt2`, or a local folder), eval and frozen.

    `dtype`: the teacher's passes run in it (`teachers.teacher_dtype(settings.teacher.precision, device)`);
    the SAE and the attribution math stay in the SAE's float32 (ConceptExtractor casts x and g up).
    """
    from transformers import AutoModelForCausalLM

    from cocomix_core.training.checkpoints import CHECKPOINT_META, verify_checkpoint

    if (Path(name_or_path) / CHECKPOINT_META).is_file():  # a teacher trained here: refused if altered since
        verify_checkpoint(name_or_path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    return freeze(model.to(device))


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, HF shift: logits[:, :-1] predict input_ids[:, 1:]."""
    shifted = logits[:, :-1, :]
    if shifted.dtype in (torch.float16, torch.bfloat16):
        shifted = shifted.float()  # CE in at least fp32; float64 teachers stay float64
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), input_ids[:, 1:].reshape(-1))


def plain_output_layer(teacher: nn.Module) -> nn.Linear | None:
    """The teacher's output layer when logits == output_layer(base_model(ids).last_hidden_state), else None.

    True of GPT-2, Llama and most causal LMs; checked on a few tokens, so a model that scales or
    soft-caps its logits is detected and gets the plain (full-logits) path.
    """
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    base = getattr(teacher, "base_model", teacher)
    if not isinstance(head, nn.Linear) or base is teacher:
        return None
    probe = torch.arange(4, device=head.weight.device).unsqueeze(0)
    with torch.no_grad():
        logits = teacher(input_ids=probe, use_cache=False).logits
        recomposed = head(base(input_ids=probe, use_cache=False).last_hidden_state)
    tolerance = 1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 2e-2  # bf16 rounds at ~4e-3
    same = logits.shape == recomposed.shape and torch.allclose(
        logits.float(), recomposed.float(), rtol=tolerance, atol=tolerance)
    return head if same else None


def next_token_loss_and_grad(
    hidden: torch.Tensor, output_layer: nn.Linear, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`next_token_loss` of output_layer(hidden), its gradient w.r.t. hidden), without autograd on the logits.

    dL/dlogits = (softmax - onehot(target)) / n is written over the logits in place, row chunk by
    row chunk while they are in cache; autograd would add a log-softmax copy, a sliced copy and
    two zero-filled B×T×V gradients (about 1.4 s of a 7 s GPT-2-small step on 2 CPU cores).
    """
    flat = hidden.flatten(0, 1)
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100).flatten()  # the last position predicts nothing
    logits = output_layer(flat)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # CE in at least fp32, as in next_token_loss
    weights = (targets >= 0).to(logits.dtype) / (targets >= 0).sum()
    safe_targets = targets.clamp(min=0).unsqueeze(1)
    target_logits = logits.gather(1, safe_targets).squeeze(1)
    log_partition = torch.empty_like(target_logits)
    for rows in row_chunks(*logits.shape):
        chunk = logits[rows]
        log_partition[rows] = torch.logsumexp(chunk, dim=-1)
        chunk.sub_(log_partition[rows, None]).exp_().mul_(weights[rows, None])
    logits.scatter_add_(1, safe_targets, -weights.unsqueeze(1))
    loss = ((log_partition - target_logits) * weights).sum()
    grad = logits.to(output_layer.weight.dtype) @ output_layer.weight
    return loss, grad.view_as(hidden)


# ----- the extractor -------------------------------------------------------------------------
@dataclass
class Attribution:
    """Attribution scores on the SAE support: score[..., j] is s at latent indices[..., j]."""

    scores: torch.Tensor  # B×T×k_sae
    indices: torch.Tensor  # B×T×k_sae int64
    latents: torch.Tensor  # B×T×k_sae, a on the support (after ReLU)

    def dense(self, num_latents: int) -> torch.Tensor:
        out = torch.zeros(*self.scores.shape[:-1], num_latents, dtype=self.scores.dtype, device=self.scores.device)
        return out.scatter(-1, self.indices, self.scores)


class ConceptExtractor:
    """Teacher LM + TopK SAE at `layer_index` -> attribution scores and concept labels (SPEC §2)."""

    def __init__(self, teacher: nn.Module, sae: TopKSAE, layer_index: int, chunk_tokens: int = 512) -> None:
        self.blocks = teacher_blocks(teacher)
        num_layers = len(self.blocks)
        if not 0 <= layer_index < num_layers:
            raise ValueError(
                f"SAE layer index {layer_index} is out of range: the teacher has {num_layers} blocks "
                f"(valid indices 0..{num_layers - 1})"
            )
        hidden = getattr(teacher.config, "hidden_size", None) or getattr(teacher.config, "n_embd", None)
        if hidden is not None and sae.width != hidden:
            raise ValueError(
                f"SAE input width {sae.width} does not match the teacher's hidden size {hidden}"
            )
        self.teacher = freeze(teacher)
        self.output_layer = plain_output_layer(self.teacher)  # None: take the loss from full logits
        self.sae = sae.eval()
        self.layer_index = layer_index
        self.chunk_tokens = chunk_tokens
        self._dictionary: tuple[tuple[int, int, torch.device, torch.dtype], torch.Tensor] | None = None

    def dictionary(self) -> torch.Tensor:
        """W_dec transposed and contiguous (C×d): row gathers of strided columns are ~4x slower."""
        weight = self.sae.decoder.weight
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
        if self._dictionary is None or self._dictionary[0] != key:
            self._dictionary = (key, weight.detach().t().contiguous())
        return self._dictionary[1]

    @property
    def concept_dim(self) -> int:
        return self.sae.num_latents

    @property
    def device(self) -> torch.device:
        return self.sae.decoder.weight.device

    def residual_and_grad(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, g = ∂L/∂x, L) with x the residual after block layer_index; autograd never goes below it."""
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            x = _block_output_tensor(output).detach().requires_grad_(True)
            captured.append(x)
            return _replace_block_output(output, x)

        handle = self.blocks[self.layer_index].register_forward_hook(hook)
        try:
            with torch.enable_grad():
                if self.output_layer is None:
                    logits = self.teacher(input_ids=input_ids, use_cache=False).logits
                    loss = next_token_loss(logits, input_ids)
                    del logits
                    (x,) = captured
                    (grad,) = torch.autograd.grad(loss, x)
                else:
                    hidden = self.teacher.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
                    loss, grad_hidden = next_token_loss_and_grad(hidden.detach(), self.output_layer, input_ids)
                    (x,) = captured
                    (grad,) = torch.autograd.grad(hidden, x, grad_outputs=grad_hidden)
        finally:
            handle.remove()
        return x.detach(), grad, loss.detach()

    @torch.no_grad()
    def sparse_attribution(self, input_ids: torch.Tensor) -> Attribution:
        """s on the SAE's top-k support: scores, latent indices and latent values, each B×T×k_sae."""
        input_ids = torch.as_tensor(input_ids, device=self.device)
        x, grad, _ = self.residual_and_grad(input_ids)
        sae = self.sae
        x = x.to(sae.decoder.weight.dtype)
        grad = grad.to(sae.decoder.weight.dtype)
        lead = x.shape[:-1]
        flat_x, flat_g = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        dictionary = self.dictionary()  # C×d, row c is W_dec[:, c]
        scores, indices, values = [], [], []
        for start in range(0, flat_x.shape[0], self.chunk_tokens):
            a, idx, _ = sae.encode_sparse(flat_x[start : start + self.chunk_tokens])
            columns = dictionary[idx]  # n×k×d
            gw = torch.einsum("nkd,nd->nk", columns, flat_g[start : start + self.chunk_tokens])
            scores.append(gw * a)
            indices.append(idx)
            values.append(a)
        k = sae.k
        return Attribution(
            scores=torch.cat(scores).reshape(*lead, k),
            indices=torch.cat(indices).reshape(*lead, k),
            latents=torch.cat(values).reshape(*lead, k),
        )

    def attribution_scores(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Dense s = (g @ W_dec) ⊙ a, B×T×C float (zero off the SAE support)."""
        return self.sparse_attribution(input_ids).dense(self.concept_dim)

    def check_label_count(self, k: int) -> None:
        if not 1 <= k <= self.sae.k:
            raise ValueError(f"labels per token k={k} must be between 1 and the SAE's k={self.sae.k}")
        if k > self.concept_dim:
            raise ValueError(f"labels per token k={k} exceeds the concept dictionary size {self.concept_dim}")

    def select_labels(self, attribution: Attribution, k: int) -> torch.Tensor:
        """Indices of the k largest attribution scores per token, B×T×k int64."""
        return labels_from_sparse(attribution, k, self.concept_dim)

    @torch.no_grad()
    def labels_and_attribution(self, input_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, Attribution]:
        """(`concept_labels`, the attribution they were selected from): the label pass keeps both."""
        self.check_label_count(k)
        attribution = self.sparse_attribution(input_ids)
        return self.select_labels(attribution, k), attribution

    def concept_labels(self, input_ids: torch.Tensor, k: int) -> torch.Tensor:
        """The k labels of every token, B×T×k int64 (constants)."""
        return self.labels_and_attribution(input_ids, k)[0]


def labels_from_sparse(attribution: Attribution, k: int, num_latents: int) -> torch.Tensor:
    """Exact dense top-k of s from its support (see the module docstring for the zero padding)."""
    scores, support = attribution.scores, attribution.indices
    k_sae = support.shape[-1]
    span = min(num_latents, k_sae + k)  # at least k indices in range(span) are off any k_sae support
    candidates = torch.arange(span, device=support.device).expand(*support.shape[:-1], span)
    on_support = (candidates.unsqueeze(-1) == support.unsqueeze(-2)).any(-1)
    # keep the k smallest off-support indices as score-0 candidates
    rank = torch.where(on_support, torch.full_like(candidates, span), candidates)
    zero_idx = torch.topk(rank, k=min(k, span), dim=-1, largest=False, sorted=True).values
    zero_scores = torch.where(
        zero_idx < span, torch.zeros((), dtype=scores.dtype, device=scores.device),
        torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device),
    )
    zero_idx = zero_idx.clamp(max=num_latents - 1)
    all_scores = torch.cat([scores, zero_scores], dim=-1)
    all_idx = torch.cat([support, zero_idx], dim=-1)
    pick = torch.topk(all_scores, k=k, dim=-1, sorted=True).indices
    return all_idx.gather(-1, pick)


# ----- label cache ---------------------------------------------------------------------------
def _manifest_core(num_samples: int, block_size: int, k: int, concept_dim: int, windows_seed: int,
                   provenance: Mapping[str, Any], val_windows: int = 0) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "num_samples": int(num_samples),
        "block_size": int(block_size),
        "k": int(k),
        "concept_dim": int(concept_dim),
        "windows_seed": int(windows_seed),
        "val_windows": int(val_windows),
        "dtype": "uint16",
        "provenance": json.loads(json.dumps(dict(provenance), sort_keys=True, default=str)),
    }


def _matches(manifest: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    return [key for key, value in expected.items() if manifest.get(key) != value]


def _reusable(out_dir: Path, core: Mapping[str, Any]) -> bool:
    """True when out_dir already holds an intact cache with this manifest."""
    if not (out_dir / MANIFEST_FILE).is_file():
        return False
    try:
        cache = LabelCache(out_dir)
        return not _matches(cache.manifest, core) and cache.verify_file()
    except (ValueError, OSError, json.JSONDecodeError):
        return False  # unreadable or stale: rebuild


def _training_pass(extractor: ConceptExtractor, windows: Any, labels: np.memmap, batch_size: int, k: int,
                   log_fn: Any) -> CardCollector:
    """Label every training sample into `labels`, gathering the concept cards from the same passes."""
    num_samples, block = labels.shape[:2]
    collector = CardCollector(extractor.concept_dim)
    with Progress("label cache", num_samples, unit="sample") as progress:
        for first in range(0, num_samples, batch_size):
            count = min(batch_size, num_samples - first)
            batch_labels, attribution = extractor.labels_and_attribution(torch.from_numpy(windows.batch(first, count)), k)
            labels[first : first + count] = batch_labels.cpu().numpy().astype(LABEL_DTYPE)
            starts = np.array([windows.start_of(sample) for sample in range(first, first + count)])
            collector.update(attribution, batch_labels, starts[:, None] + np.arange(block))
            if log_fn is not None:
                log_fn({"label_cache_samples": first + count, "label_cache_total": num_samples})
            progress.update(count)
    return collector


def _label_windows(extractor: ConceptExtractor, windows: np.ndarray, batch_size: int, k: int, path: Path) -> None:
    """Labels of fixed windows (the validation windows evaluation scores) into a uint16 file."""
    labels = np.memmap(path, dtype=LABEL_DTYPE, mode="w+", shape=(*windows.shape, k))
    for first in range(0, len(windows), batch_size):
        ids = torch.from_numpy(np.ascontiguousarray(windows[first : first + batch_size], dtype=np.int64))
        labels[first : first + len(ids)] = extractor.concept_labels(ids, k).cpu().numpy().astype(LABEL_DTYPE)
    labels.flush()


def build_label_cache(
    extractor: ConceptExtractor,
    windows: Any,
    num_samples: int,
    batch_size: int,
    k: int,
    out_dir: str | os.PathLike,
    provenance: Mapping[str, Any],
    log_fn: Any = None,
    val_windows: np.ndarray | None = None,
) -> Path:
    """Labels of global samples 0..num_samples-1 of `windows` into out_dir/labels.u16 (+ manifest.json), the
    concept cards gathered on the way (cards.npz), and the labels of `val_windows` (val_labels.u16) if given.

    Row g of the uint16 memmap (num_samples×T×k) holds sample g's labels. The folder is written
    atomically; when out_dir already holds a cache with the same manifest (sizes, k,
    concept_dim, windows seed, validation windows, provenance) and an intact labels file, nothing is computed.
    """
    extractor.check_label_count(k)
    if extractor.concept_dim > MAX_CONCEPT_DIM:
        raise ValueError(
            f"concept dictionary of {extractor.concept_dim} does not fit uint16 labels (max {MAX_CONCEPT_DIM})"
        )
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be positive, got {num_samples} and {batch_size}")
    out_dir = Path(out_dir)
    val_count = 0 if val_windows is None else len(val_windows)
    core = _manifest_core(num_samples, windows.block_size, k, extractor.concept_dim, windows.seed, provenance, val_count)
    if _reusable(out_dir, core):
        say(f"label cache: {out_dir} already holds the labels of these {num_samples:,} samples; reused")
        return out_dir
    with atomic_path(out_dir) as temp:
        temp.mkdir(parents=True)
        labels = np.memmap(temp / LABELS_FILE, dtype=LABEL_DTYPE, mode="w+", shape=(num_samples, windows.block_size, k))
        collector = _training_pass(extractor, windows, labels, batch_size, k, log_fn)
        labels.flush()
        del labels
        collector.finish(windows.tokens).save(temp / CARDS_FILE)
        manifest = dict(core, labels_file=LABELS_FILE, labels_sha256=sha256_file(temp / LABELS_FILE),
                        cards_file=CARDS_FILE)
        if val_count:
            _label_windows(extractor, val_windows, batch_size, k, temp / VAL_LABELS_FILE)
            manifest["val_labels_file"] = VAL_LABELS_FILE
        (temp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out_dir


class ConceptFiles:
    """The small part of a label cache: its manifest, concept cards and validation labels. A folder holding only
    those is what evaluation and the report read, never the training labels (gigabytes at paper scale)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no label cache manifest at {manifest_path}")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"{manifest_path} is not a {CACHE_FORMAT} manifest")
        self.num_samples = int(self.manifest["num_samples"])
        self.block_size = int(self.manifest["block_size"])
        self.k = int(self.manifest["k"])
        self.concept_dim = int(self.manifest["concept_dim"])

    def cards(self) -> ConceptCards | None:
        """The concept cards gathered by the label pass; None for a cache written before cards existed."""
        name = self.manifest.get("cards_file")
        return ConceptCards.load(self.path / name) if name else None

    def val_labels(self) -> np.ndarray | None:
        """Labels of the validation windows evaluation scores (V×T×k), or None when none were labelled."""
        name, count = self.manifest.get("val_labels_file"), int(self.manifest.get("val_windows", 0))
        if not name:
            return None
        return np.memmap(self.path / name, dtype=LABEL_DTYPE, mode="r", shape=(count, self.block_size, self.k))

    def small_files(self) -> list[Path]:
        """The manifest, cards and validation labels: all that `ConceptFiles` reads of the folder."""
        names = [MANIFEST_FILE, self.manifest.get("cards_file"), self.manifest.get("val_labels_file")]
        return [self.path / name for name in names if name]


class LabelCache(ConceptFiles):
    """Read side of a label cache folder written by `build_label_cache`."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        labels_path = self.path / self.manifest.get("labels_file", LABELS_FILE)
        expected_bytes = self.num_samples * self.block_size * self.k * np.dtype(LABEL_DTYPE).itemsize
        if not labels_path.is_file() or labels_path.stat().st_size != expected_bytes:
            raise ValueError(f"{labels_path} is missing or not {expected_bytes} bytes as the manifest says")
        self._labels = np.memmap(labels_path, dtype=LABEL_DTYPE, mode="r", shape=(self.num_samples, self.block_size, self.k))

    def verify_file(self) -> bool:
        return sha256_file(self.path / self.manifest.get("labels_file", LABELS_FILE)) == self.manifest.get("labels_sha256")

    def check(self, expected: Mapping[str, Any]) -> None:
        """Raise ValueError naming every field of `expected` that the manifest disagrees with.

        Keys are manifest fields (num_samples, block_size, k, concept_dim, windows_seed) or
        provenance fields (looked up under manifest["provenance"]); provenance may also be
        given whole as expected["provenance"].
        """
        problems = []
        provenance = self.manifest.get("provenance", {})
        for key, value in expected.items():
            if key == "provenance":
                for sub_key, sub_value in dict(value).items():
                    if provenance.get(sub_key) != sub_value:
                        problems.append(f"provenance.{sub_key}: cache has {provenance.get(sub_key)!r}, expected {sub_value!r}")
                continue
            have = self.manifest[key] if key in self.manifest else provenance.get(key)
            if have != value:
                problems.append(f"{key}: cache has {have!r}, expected {value!r}")
        if problems:
            raise ValueError(f"label cache at {self.path} does not match: " + "; ".join(problems))

    def labels(self, first_sample: int, batch_size: int) -> torch.Tensor:
        """Labels of samples first_sample..first_sample+batch_size-1 as a LongTensor B×T×k."""
        end = first_sample + batch_size
        if first_sample < 0 or batch_size < 1 or end > self.num_samples:
            raise IndexError(
                f"label cache holds samples 0..{self.num_samples - 1}; asked for {first_sample}..{end - 1}"
            )
        return torch.from_numpy(np.asarray(self._labels[first_sample:end], dtype=np.int64))


# ----- activation-selected labels (SPEC §9 ablation) ----------------------------------------------
def activation_labels(attribution: Attribution, k: int) -> torch.Tensor:
    """Indices of the k largest SAE latents a[t] per token (instead of the k largest attribution scores), B×T×k int64.

    a[t] is non-zero only on the SAE's k_sae support, so with k <= k_sae the top k lie on it.
    """
    pick = torch.topk(attribution.latents, k=k, dim=-1, sorted=True).indices
    return attribution.indices.gather(-1, pick)


class ActivationConceptExtractor(ConceptExtractor):
    """A ConceptExtractor whose labels are activation-selected; build_label_cache accepts it as is."""

    def select_labels(self, attribution: Attribution, k: int) -> torch.Tensor:
        """Indices of the k largest SAE latents per token, B×T×k int64."""
        return activation_labels(attribution, k)
