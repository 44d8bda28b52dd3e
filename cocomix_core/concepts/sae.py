"""TopK sparse autoencoder in OpenAI's "v5" format (SPEC §2).

    LN(x) = (x - μ) / (σ + 1e-5), σ Bessel-corrected, no affine   (normalize=True)
    p  = encoder(x̂ - pre_bias) + latent_bias                       pre-activations, C wide
    a  = ReLU on the k largest entries of p, zero elsewhere         latents
    x' = (decoder(a) + pre_bias) · σ + μ                            reconstruction

The state dict matches OpenAI's released GPT-2-small autoencoders, so their `.pt` files load
directly and ours load in their code: tensors `pre_bias`, `encoder.weight`, `latent_bias`,
`decoder.weight`, the statistics buffers `stats_last_nonzero`, `latents_activation_frequency`,
`latents_mean_square`, plus the non-tensor entries `activation: "TopK"` and
`activation_state_dict: {"k": k, "postact_fn": "ReLU"}`. A `normalize` entry is accepted on
load (OpenAI's loader infers it from the activation being TopK); `state_dict()` does not emit
it, so OpenAI's strict loader still accepts our dicts.
"""

from __future__ import annotations

import os
import pickle
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from cocomix_core.model.modeling_cocomix import bessel_layer_norm
from cocomix_core.plumbing.errors import CocomixError
from cocomix_core.plumbing.files import atomic_path

OPENAI_SAE_BASE_URL = "https://openaipublic.blob.core.windows.net/sparse-autoencoder/gpt2-small"
OPENAI_SAE_LOCATIONS = ("resid_delta_attn", "resid_delta_mlp", "resid_post_attn", "resid_post_mlp")

TENSOR_KEYS = (
    "pre_bias",
    "encoder.weight",
    "latent_bias",
    "decoder.weight",
    "stats_last_nonzero",
    "latents_activation_frequency",
    "latents_mean_square",
)
# The statistics buffers are bookkeeping only; a dict without them still defines the SAE.
REQUIRED_TENSOR_KEYS = TENSOR_KEYS[:4]
NON_TENSOR_KEYS = ("activation", "activation_state_dict", "normalize")
SAFETENSORS_FORMAT = "cocomix-topk-sae-v1"
# Seconds an SAE download may wait on connect or on one read: an address that never answers
# fails in this time instead of holding a flow step for minutes.
DOWNLOAD_TIMEOUT_S = 20.0


class SAEError(CocomixError, ValueError):
    """An SAE file that cannot be used (corrupt, truncated, not an SAE), naming the file."""


class TopKSAE(nn.Module):
    """TopK sparse autoencoder over inputs of width `width` with `num_latents` latents."""

    def __init__(self, num_latents: int, width: int, k: int, normalize: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        if num_latents < 1 or width < 1:
            raise ValueError(f"SAE needs num_latents >= 1 and width >= 1, got {num_latents} and {width}")
        if not 1 <= k <= num_latents:
            raise ValueError(f"SAE k={k} must be between 1 and the dictionary size {num_latents}")
        self.k = int(k)
        self.normalize = bool(normalize)
        self.eps = eps
        self.pre_bias = nn.Parameter(torch.zeros(width))
        self.encoder = nn.Linear(width, num_latents, bias=False)
        self.latent_bias = nn.Parameter(torch.zeros(num_latents))
        self.decoder = nn.Linear(num_latents, width, bias=False)
        self.register_buffer("stats_last_nonzero", torch.zeros(num_latents, dtype=torch.long))
        self.register_buffer("latents_activation_frequency", torch.ones(num_latents, dtype=torch.float))
        self.register_buffer("latents_mean_square", torch.zeros(num_latents, dtype=torch.float))

    @property
    def num_latents(self) -> int:
        return self.encoder.weight.shape[0]

    @property
    def width(self) -> int:
        return self.encoder.weight.shape[1]

    def extra_repr(self) -> str:
        return f"width={self.width}, num_latents={self.num_latents}, k={self.k}, normalize={self.normalize}"

    # ----- the computation -------------------------------------------------------------------
    def preprocess(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(x̂, info) with info = {"mu": μ, "std": σ} (μ = 0, σ = 1 when normalize is off)."""
        if not self.normalize:
            return x, {"mu": torch.zeros_like(x[..., :1]), "std": torch.ones_like(x[..., :1])}
        x_hat, mu, std = bessel_layer_norm(x, self.eps)
        return x_hat, {"mu": mu, "std": std}

    def pre_activations(self, x_hat: torch.Tensor) -> torch.Tensor:
        """p = encoder(x̂ - pre_bias) + latent_bias, shape (..., C)."""
        return F.linear(x_hat - self.pre_bias, self.encoder.weight, self.latent_bias)

    def topk_sparse(self, pre_acts: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Support of the latents: (ReLU of the k largest pre-activations, their indices), each (..., k)."""
        top = torch.topk(pre_acts, k=self.k if k is None else k, dim=-1)
        return F.relu(top.values), top.indices

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Latents as (values (..., k), indices (..., k), info); dense latents are zero off this support."""
        x_hat, info = self.preprocess(x)
        values, indices = self.topk_sparse(self.pre_activations(x_hat))
        return values, indices, info

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Dense latents a (..., C) and info {"mu", "std"}."""
        values, indices, info = self.encode_sparse(x)
        latents = torch.zeros(*values.shape[:-1], self.num_latents, dtype=values.dtype, device=values.device)
        return latents.scatter(-1, indices, values), info

    def decode_normalized(self, latents: torch.Tensor) -> torch.Tensor:
        """decoder(a) + pre_bias: the reconstruction in normalised (x̂) space."""
        return self.decoder(latents) + self.pre_bias

    def decode_sparse_normalized(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Same as decode_normalized on the dense latents, reading only the k active decoder columns."""
        lead = values.shape[:-1]
        flat_values = values.reshape(-1, values.shape[-1])
        flat_indices = indices.reshape(-1, indices.shape[-1])
        out = F.embedding_bag(
            flat_indices, self.decoder.weight.t(), per_sample_weights=flat_values, mode="sum"
        )
        return out.reshape(*lead, self.width) + self.pre_bias

    def decode(self, latents: torch.Tensor, info: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x' = (decoder(a) + pre_bias) · σ + μ."""
        recons = self.decode_normalized(latents)
        if self.normalize:
            if info is None:
                raise ValueError("decode of a normalising SAE needs the info (mu, std) returned by encode")
            recons = recons * info["std"] + info["mu"]
        return recons

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (..., C), reconstruction (..., d))."""
        latents, info = self.encode(x)
        return latents, self.decode(latents, info)

    # ----- OpenAI-format state dicts ---------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        # Only the top-level dict carries the non-tensor entries: a parent module's state dict
        # must stay all-tensor so its own load_state_dict keeps working.
        if not prefix:
            sd["activation"] = "TopK"
            sd["activation_state_dict"] = {"k": self.k, "postact_fn": "ReLU"}
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        tensors = dict(state_dict)
        k, normalize = _read_non_tensor_entries(tensors)
        if k is not None and k != self.k:
            raise ValueError(f"state dict has TopK k={k}, this SAE has k={self.k}")
        if normalize is not None and normalize != self.normalize:
            raise ValueError(f"state dict has normalize={normalize}, this SAE has normalize={self.normalize}")
        return super().load_state_dict(tensors, strict=strict, assign=assign)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], k: int | None = None, normalize: bool | None = None) -> "TopKSAE":
        """Build an SAE from an OpenAI-format dict (with or without its non-tensor entries).

        k comes from `activation_state_dict` unless given; normalize from `normalize`, else
        True for a TopK activation (OpenAI's rule). Statistics buffers may be absent.
        """
        entries = dict(state_dict)
        sd_k, sd_normalize = _read_non_tensor_entries(entries)
        missing = [key for key in REQUIRED_TENSOR_KEYS if key not in entries]
        unexpected = [key for key in entries if key not in TENSOR_KEYS]
        if missing or unexpected:
            raise ValueError(
                f"not a TopK SAE state dict: missing keys {missing}, unexpected keys {unexpected} "
                f"(expected {list(TENSOR_KEYS)} plus optional {list(NON_TENSOR_KEYS)})"
            )
        k = sd_k if k is None else k
        if k is None:
            raise ValueError("state dict carries no activation_state_dict['k']; pass k explicitly")
        normalize = (sd_normalize if sd_normalize is not None else True) if normalize is None else normalize
        enc = entries["encoder.weight"]
        if enc.dim() != 2:
            raise ValueError(f"encoder.weight must be 2-D (C, d), got shape {tuple(enc.shape)}")
        num_latents, width = enc.shape
        expected = {
            "pre_bias": (width,),
            "encoder.weight": (num_latents, width),
            "latent_bias": (num_latents,),
            "decoder.weight": (width, num_latents),
            "stats_last_nonzero": (num_latents,),
            "latents_activation_frequency": (num_latents,),
            "latents_mean_square": (num_latents,),
        }
        bad = [
            f"{key}: {tuple(entries[key].shape)} != {shape}"
            for key, shape in expected.items()
            if key in entries and tuple(entries[key].shape) != shape
        ]
        if bad:
            raise ValueError(f"SAE state dict shapes inconsistent with C={num_latents}, d={width}: {bad}")
        sae = cls(num_latents, width, k=k, normalize=normalize)
        sae.to(enc.dtype)
        result = nn.Module.load_state_dict(sae, entries, strict=False)
        assert not result.unexpected_keys
        return sae


def _read_non_tensor_entries(entries: dict[str, Any]) -> tuple[int | None, bool | None]:
    """Pop activation / activation_state_dict / normalize from `entries`; return (k, normalize)."""
    activation = entries.pop("activation", None)
    act_state = entries.pop("activation_state_dict", None)
    normalize = entries.pop("normalize", None)
    if activation is not None and activation != "TopK":
        raise ValueError(f"only TopK SAEs are supported, state dict has activation={activation!r}")
    k = None
    if act_state is not None:
        postact = act_state.get("postact_fn", "ReLU")
        if postact != "ReLU":
            raise ValueError(f"only TopK with a ReLU post-activation is supported, got {postact!r}")
        if "k" in act_state:
            k = int(act_state["k"])
    if normalize is not None:
        normalize = bool(normalize.item() if isinstance(normalize, torch.Tensor) else normalize)
    elif activation == "TopK":
        normalize = True
    return k, normalize


# ----- files and URLs ------------------------------------------------------------------------
def openai_sae_url(location: str = "resid_post_mlp", layer_index: int = 5, size: str = "v5_32k") -> str:
    """Public https URL of one of OpenAI's released GPT-2-small autoencoders."""
    if location not in OPENAI_SAE_LOCATIONS:
        raise ValueError(f"location must be one of {OPENAI_SAE_LOCATIONS}, got {location!r}")
    if size not in ("v5_32k", "v5_128k"):
        raise ValueError(f"size must be 'v5_32k' or 'v5_128k' (the TopK releases), got {size!r}")
    if not 0 <= layer_index < 12:
        raise ValueError(f"GPT-2 small has 12 layers; layer_index {layer_index} is out of range")
    return f"{OPENAI_SAE_BASE_URL}/{location}_{size}/autoencoders/{layer_index}.pt"


def default_cache_dir() -> Path:
    return Path(os.environ.get("COCOMIX_CACHE", Path.home() / ".cache" / "cocomix")) / "sae"


def sae_cache_path(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `download` keeps the file of `url`."""
    parsed = urllib.parse.urlparse(url)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / parsed.netloc.replace(":", "_") / parsed.path.lstrip("/")


def download(url: str, cache_dir: str | os.PathLike | None = None, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch `url` once into the cache (atomic rename); later calls reuse the file. `timeout` bounds each wait."""
    target = sae_cache_path(url, cache_dir)
    if target.is_file():
        return target
    try:
        with atomic_path(target) as temp, urllib.request.urlopen(url, timeout=timeout) as response:
            with open(temp, "wb") as handle:
                shutil.copyfileobj(response, handle, length=1 << 22)
    except OSError as error:
        raise OSError(f"could not download SAE from {url}: {error}") from error
    return target


def save_sae(sae: TopKSAE, path: str | os.PathLike) -> Path:
    """Write the SAE as safetensors (k, normalize in the metadata), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {key: value.detach().contiguous().cpu() for key, value in nn.Module.state_dict(sae).items()}
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "activation": "TopK",
        "k": str(sae.k),
        "postact_fn": "ReLU",
        "normalize": "true" if sae.normalize else "false",
    }
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata=metadata)
    return path


def load_sae(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None, map_location: str | torch.device = "cpu") -> TopKSAE:
    """Load an SAE from a `.safetensors` file (ours), a `.pt` OpenAI-format state dict, or an http(s) URL of one.

    A missing file raises FileNotFoundError, a failed download OSError, a file that is not a
    usable SAE (corrupt, truncated, inconsistent shapes) SAEError; each names the file or URL.
    """
    text = str(source)
    if text.startswith(("http://", "https://")):
        source = download(text, cache_dir)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"SAE file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return _load_safetensors_sae(path, map_location)
        return _load_state_dict_sae(path, map_location)
    except SAEError:
        raise
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as error:
        # torch.load reports a truncated or foreign file as RuntimeError/UnpicklingError/EOFError
        raise SAEError(f"{path}: not a usable SAE file ({_first_line(error)})") from None


def _load_safetensors_sae(path: Path, map_location: str | torch.device) -> TopKSAE:
    with safe_open(str(path), framework="pt", device=str(map_location)) as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if "k" not in metadata:
        raise SAEError(f"{path} has no 'k' in its safetensors metadata; not written by save_sae")
    return TopKSAE.from_state_dict(tensors, k=int(metadata["k"]), normalize=metadata.get("normalize", "true") == "true")


def _load_state_dict_sae(path: Path, map_location: str | torch.device) -> TopKSAE:
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, Mapping):
        raise SAEError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return TopKSAE.from_state_dict(state)


def _first_line(error: Exception) -> str:
    """The error's kind and first line: torch's unpickling errors run to a page of advice."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def sae_file_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(num_latents, width) of an SAE file from its encoder's shape, without reading the weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAE file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                shape = handle.get_slice("encoder.weight").get_shape()
        else:  # a memory-mapped load reads the zip index and tensor headers only
            shape = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["encoder.weight"].shape
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError, TypeError) as error:
        raise SAEError(f"{path}: not a usable SAE file ({_first_line(error)})") from None
    if len(shape) != 2:
        raise SAEError(f"{path}: encoder.weight has shape {tuple(shape)}, expected (num_latents, width)")
    return int(shape[0]), int(shape[1])
