"""Offline lm-eval tasks built from the held-out documents (SPEC §6 stand-ins for the hub tasks).

The paper's downstream tasks live on the Hugging Face hub. These three tasks have the same
shapes and metrics but are generated deterministically from `val_documents.jsonl`, so they
run anywhere and never overlap the training split:

    cocomix_lastword  LAMBADA-style: a passage of whole sentences whose final word is the target.
                      Metrics: acc (greedy continuation == the word), perplexity of the word.
    cocomix_choice    HellaSwag-style: up to three context sentences; choices are the true next
                      sentence and three sentences drawn from OTHER documents, each at most
                      MAX_CHOICE_TOKENS tokens (lm-eval requires answers to fit the context). acc, acc_norm.
    cocomix_rolling   wikitext-style rolling log-likelihood of passages: word_perplexity,
                      byte_perplexity, bits_per_byte.

The task YAMLs in `cocomix_core/lm_tasks/` are templates. lm-eval resolves a relative
`data_files` against the working directory, not against the YAML, so `build_offline_tasks`
writes a task folder holding the JSONL files plus copies of the templates whose `data_files`
are absolute paths into that folder. That folder is what `--include_path` (stock lm_eval) or
`TaskManager(include_path=...)` takes, from any working directory:

    out_dir/cocomix_{lastword,choice,rolling}.{jsonl,yaml}, manifest.json
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from cocomix_core.data.tokenizer import TextTokenizer, gpt2_tokenizer
from cocomix_core.plumbing.errors import CocomixError
from cocomix_core.plumbing.files import atomic_path, sha256_file, sha256_json

TASK_NAMES = ("cocomix_lastword", "cocomix_choice", "cocomix_rolling")
TEMPLATES_DIR = Path(__file__).resolve().parent / "lm_tasks"
VAL_DOCUMENTS_FILE = "val_documents.jsonl"
MANIFEST_FILE = "manifest.json"
GENERATOR_VERSION = 1  # bump when the items a (corpus, items, seed) produces change

# Bounds keep items well inside small context windows (~4 characters per GPT-2 token).
MIN_SENTENCE_WORDS = 4
MAX_SENTENCE_CHARS = 300
MAX_PASSAGE_CHARS = 600  # lastword passage, choice context
MAX_CONTEXT_SENTENCES = 3
MAX_ROLLING_CHARS = 1200
MAX_CHOICE_TOKENS = 24  # lm-eval asserts an answer fits the model's context: keep choices short
DISTRACTORS = 3

# Whitespace after . ! ? (possibly closed by a quote or bracket), before a capital or digit.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_FINAL_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{2,})[.!?;:,\"')\]]*$")


class EvaluationError(CocomixError, ValueError):
    """An evaluation input is unusable: the message says which and why."""


def split_sentences(text: str) -> list[str]:
    """Whitespace-normalised sentences of a document: a break after . ! ? before a capital or digit."""
    normalised = " ".join(text.split())
    return [sentence for sentence in _SENTENCE_END.split(normalised) if sentence]


def _is_plain_sentence(sentence: str) -> bool:
    return len(sentence.split()) >= MIN_SENTENCE_WORDS and len(sentence) <= MAX_SENTENCE_CHARS


def _is_choice_sentence(sentence: str, tokenizer: TextTokenizer) -> bool:
    return _is_plain_sentence(sentence) and len(tokenizer.encode_ordinary(" " + sentence)) <= MAX_CHOICE_TOKENS


def _preceding_sentences(sentences: list[str], end: int, budget: int) -> list[str]:
    """Up to MAX_CONTEXT_SENTENCES plain sentences right before index `end`, fitting `budget` characters."""
    chosen: list[str] = []
    for sentence in reversed(sentences[max(0, end - MAX_CONTEXT_SENTENCES) : end]):
        if not _is_plain_sentence(sentence) or len(sentence) + 1 > budget:
            break
        chosen.insert(0, sentence)
        budget -= len(sentence) + 1
    return chosen


@dataclass(frozen=True)
class Position:
    """A sentence of the held-out corpus: document index and sentence index."""

    doc: int
    sentence: int


def _lastword_item(documents: list[list[str]], at: Position, rng: np.random.Generator,
                   tokenizer: TextTokenizer) -> dict[str, Any] | None:
    """Passage = preceding sentences + sentence `at`; the target is its final word (punctuation dropped)."""
    final = documents[at.doc][at.sentence]
    match = _FINAL_WORD.match(final)
    if not _is_plain_sentence(final) or match is None:
        return None
    before = _preceding_sentences(documents[at.doc], at.sentence, MAX_PASSAGE_CHARS - len(final))
    context = " ".join(before + [match["context"]])
    return {"context": context, "target": match["word"], "doc_id": at.doc}


def _choice_item(documents: list[list[str]], at: Position, rng: np.random.Generator,
                 tokenizer: TextTokenizer) -> dict[str, Any] | None:
    """Context = sentences before `at`; choices = sentence `at` + DISTRACTORS sentences of other documents."""
    ending = documents[at.doc][at.sentence]
    context = _preceding_sentences(documents[at.doc], at.sentence, MAX_PASSAGE_CHARS)
    if not context or not _is_choice_sentence(ending, tokenizer):
        return None
    distractors: list[str] = []
    distractor_docs: list[int] = []
    other_docs = [d for d in range(len(documents)) if d != at.doc]
    for _ in range(100 * DISTRACTORS):  # bounded: a corpus of only odd sentences must not loop forever
        if len(distractors) == DISTRACTORS:
            break
        doc = other_docs[rng.integers(len(other_docs))]
        sentence = documents[doc][rng.integers(len(documents[doc]))]
        if _is_choice_sentence(sentence, tokenizer) and sentence != ending and sentence not in distractors:
            distractors.append(sentence)
            distractor_docs.append(doc)
    if len(distractors) < DISTRACTORS:
        return None
    label = int(rng.integers(DISTRACTORS + 1))
    choices = distractors[:label] + [ending] + distractors[label:]
    return {
        "context": " ".join(context), "choices": choices, "label": label,
        "doc_id": at.doc, "distractor_doc_ids": distractor_docs,
    }


def _rolling_item(documents: list[list[str]], at: Position, rng: np.random.Generator,
                  tokenizer: TextTokenizer) -> dict[str, Any] | None:
    """Passage = sentence `at` and the following ones, as many as fit MAX_ROLLING_CHARS."""
    passage: list[str] = []
    budget = MAX_ROLLING_CHARS
    for sentence in documents[at.doc][at.sentence :]:
        if len(sentence) + 1 > budget:
            break
        passage.append(sentence)
        budget -= len(sentence) + 1
    if len(" ".join(passage).split()) < MIN_SENTENCE_WORDS:
        return None
    return {"page": " ".join(passage), "doc_id": at.doc}


ItemMaker = Callable[[list[list[str]], Position, np.random.Generator, TextTokenizer], "dict[str, Any] | None"]
ITEM_MAKERS: dict[str, ItemMaker] = {
    "cocomix_lastword": _lastword_item,
    "cocomix_choice": _choice_item,
    "cocomix_rolling": _rolling_item,
}


def _rolling_starts(documents: list[list[str]]) -> list[Position]:
    """Starts of consecutive, non-overlapping rolling passages, so no text is scored twice."""
    starts = []
    for doc, sentences in enumerate(documents):
        start = used = 0
        for index, sentence in enumerate(sentences):
            if used and used + len(sentence) + 1 > MAX_ROLLING_CHARS:
                starts.append(Position(doc, start))
                start, used = index, 0
            used += len(sentence) + 1
        if sentences:
            starts.append(Position(doc, start))
    return starts


def make_items(task: str, documents: list[list[str]], items: int, seed: int,
               tokenizer: TextTokenizer | None = None) -> list[dict[str, Any]]:
    """Up to `items` items of `task`, a pure function of (documents, items, seed, tokenizer; default GPT-2's).

    The tokenizer only bounds choice lengths (MAX_CHOICE_TOKENS), so items fit the students' context.
    """
    tokenizer = tokenizer or gpt2_tokenizer()
    rng = np.random.default_rng([seed, TASK_NAMES.index(task)])
    if task == "cocomix_rolling":
        positions = _rolling_starts(documents)
    else:  # every sentence with at least one sentence before it
        positions = [Position(d, s) for d, sentences in enumerate(documents) for s in range(1, len(sentences))]
    made = []
    for index in rng.permutation(len(positions)):
        item = ITEM_MAKERS[task](documents, positions[index], rng, tokenizer)
        if item is not None:
            made.append(item)
            if len(made) == items:
                break
    return made


def read_documents(data_dir: str | Path) -> list[list[str]]:
    """Sentences of every held-out document in `data_dir/val_documents.jsonl`."""
    path = Path(data_dir) / VAL_DOCUMENTS_FILE
    if not path.is_file():
        raise EvaluationError(f"{path} is missing: {data_dir} is not a prepared data folder with held-out documents")
    with path.open(encoding="utf-8") as lines:
        documents = [split_sentences(json.loads(line)["text"]) for line in lines if line.strip()]
    documents = [sentences for sentences in documents if sentences]
    if len(documents) < 2:
        raise EvaluationError(
            f"{path} holds {len(documents)} non-empty document(s); the offline tasks need at least 2 "
            "(cocomix_choice draws its wrong answers from other documents)"
        )
    return documents


def _task_yaml(task: str, data_file: Path) -> str:
    """The packaged template of `task` with its data file pointed at an absolute path."""
    config = yaml.safe_load((TEMPLATES_DIR / f"{task}.yaml").read_text())
    config["dataset_kwargs"]["data_files"] = {"test": str(data_file.resolve())}
    header = f"# Generated by cocomix_core.evaluation.offline_tasks from the template lm_tasks/{task}.yaml\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows), encoding="utf-8")


def tasks_digest(tasks_dir: str | Path) -> str:
    """Content digest of a built task folder (items, not paths): equal folders give equal digests."""
    manifest = load_tasks_manifest(tasks_dir)
    return sha256_json({key: manifest[key] for key in ("generator_version", "tasks")})


def load_tasks_manifest(tasks_dir: str | Path) -> dict[str, Any]:
    """The manifest.json of a folder written by `build_offline_tasks`."""
    path = Path(tasks_dir) / MANIFEST_FILE
    if not path.is_file():
        raise EvaluationError(f"{path} is missing: {tasks_dir} is not a task folder written by build_offline_tasks")
    return json.loads(path.read_text())


def build_offline_tasks(data_dir: str | Path, out_dir: str | Path, items: int, seed: int,
                        tokenizer: TextTokenizer | None = None) -> Path:
    """Write the offline tasks' JSONL and YAML files into out_dir (atomically); returns out_dir.

    `tokenizer` is the data's (default GPT-2's; `cocomix_core.data.corpus.data_tokenizer(data_dir)`). A folder
    already built from the same held-out documents with the same items, seed and tokenizer is kept.
    """
    out_dir = Path(out_dir).resolve()
    source = Path(data_dir) / VAL_DOCUMENTS_FILE
    tokenizer = tokenizer or gpt2_tokenizer()
    wanted = {"generator_version": GENERATOR_VERSION, "items": items, "seed": seed,
              "source_sha256": sha256_file(source) if source.is_file() else None, "tokenizer": tokenizer.digest}
    if (out_dir / MANIFEST_FILE).is_file():
        existing = load_tasks_manifest(out_dir)
        if all(existing.get(key) == value for key, value in wanted.items()):
            return out_dir
    documents = read_documents(data_dir)
    tasks = {}
    with atomic_path(out_dir) as temp:
        temp.mkdir(parents=True)
        for task in TASK_NAMES:
            rows = make_items(task, documents, items, seed, tokenizer)
            if not rows:
                raise EvaluationError(f"{task}: no item could be built from {source} (documents too short?)")
            _write_jsonl(temp / f"{task}.jsonl", rows)
            # The YAML points at the final folder, which exists once atomic_path renames temp.
            (temp / f"{task}.yaml").write_text(_task_yaml(task, out_dir / f"{task}.jsonl"))
            tasks[task] = {"items": len(rows), "sha256": sha256_file(temp / f"{task}.jsonl")}
        (temp / MANIFEST_FILE).write_text(json.dumps(wanted | {"tasks": tasks}, indent=2, sort_keys=True) + "\n")
    return out_dir
