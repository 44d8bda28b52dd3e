"""The offline GPT-2 tokenizer: known ids, an independent reference BPE, the HF twin, saving, tampering."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import regex

from cocomix_core.data import tokenizer as tok

SAMPLE = [
    "Hello world",
    " the",
    "\n",
    "",
    "a  b   c\n\n\n  d \t\t x   ",
    "   leading and trailing   ",
    "12345 3.14159 1,000,000 2025-01-31",
    "héllo wörld — naïve café 日本語 🤖🦀 Ωmega ∑",
    "it's we'll they've I'm you'd He'S",
    "x\r\ny\u00a0nbsp\u2003em",
    "$$$!!!...??? <html><b>tags</b></html>",
    "a <|endoftext|> b",
]


@lru_cache(maxsize=1)
def _reference_tables() -> tuple[dict[str, int], dict[tuple[str, str], int], dict[int, str]]:
    """encoder.json, merge ranks and GPT-2's byte->unicode map, read independently of tiktoken."""
    folder = tok.bpe_files_dir()
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    merges = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    ranks = {tuple(line.split()): rank for rank, line in enumerate(merges)}
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    byte_to_unicode = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in byte_to_unicode:
            byte_to_unicode[b] = chr(256 + extra)
            extra += 1
    return encoder, ranks, byte_to_unicode


def _reference_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """GPT-2's original encoder.py merge loop: repeatedly merge the lowest-ranked adjacent pair."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def reference_encode(text: str) -> list[int]:
    """An independent GPT-2 encoder (the 2019 release's pattern and algorithm, `regex` instead of tiktoken)."""
    encoder, ranks, byte_to_unicode = _reference_tables()
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ids = []
    for piece in pattern.findall(text):
        word = "".join(byte_to_unicode[b] for b in piece.encode("utf-8"))
        ids.extend(encoder[part] for part in _reference_bpe(word, ranks))
    return ids


def test_well_known_ids():
    encoding = tok.gpt2_encoding()
    assert encoding.encode_ordinary("Hello world") == [15496, 995]
    assert encoding.encode_ordinary(" the") == [262]
    assert encoding.encode_ordinary("\n") == [198]
    assert encoding.eot_token == tok.EOT_ID == 50256
    assert encoding.n_vocab == tok.VOCAB_SIZE == 50257
    assert encoding.name == "gpt2"


@pytest.mark.parametrize("text", SAMPLE)
def test_matches_independent_reference_encoder(text):
    assert tok.gpt2_encoding().encode_ordinary(text) == reference_encode(text)


def test_literal_end_of_text_is_ordinary_text():
    ids = tok.gpt2_encoding().encode_ordinary("a <|endoftext|> b")
    assert tok.EOT_ID not in ids
    assert tok.gpt2_encoding().decode(ids) == "a <|endoftext|> b"


def test_encode_document_appends_one_eot_per_document():
    encoded = [tok.encode_document(text) for text in ["Hello world", "", "<|endoftext|>"]]
    assert encoded[0].tolist() == [15496, 995, tok.EOT_ID]
    assert encoded[1].tolist() == [tok.EOT_ID]
    assert encoded[2].tolist() == tok.gpt2_encoding().encode_ordinary("<|endoftext|>") + [tok.EOT_ID]
    assert all(ids.dtype == np.uint16 for ids in encoded)


@pytest.mark.parametrize("text", SAMPLE)
def test_encode_document_equals_encode_ordinary(text):
    assert tok.encode_document(text).tolist() == tok.gpt2_encoding().encode_ordinary(text) + [tok.EOT_ID]


def test_hash_constants_are_the_ones_tiktoken_declares():
    import tiktoken_ext.openai_public as openai_public

    source = Path(openai_public.__file__).read_text()
    gpt2_source = source[source.index("def gpt2(") : source.index("def r50k_base(")]
    assert re.search(r'vocab_bpe_hash="([0-9a-f]{64})"', gpt2_source).group(1) == tok.VOCAB_BPE_SHA256
    assert re.search(r'encoder_json_hash="([0-9a-f]{64})"', gpt2_source).group(1) == tok.ENCODER_JSON_SHA256


def test_tampered_file_is_refused_with_a_clear_error(tmp_path):
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(tok.bpe_files_dir() / name, tmp_path / name)
    with open(tmp_path / "vocab.bpe", "a", encoding="utf-8") as handle:
        handle.write("Ġx Ġy\n")
    with pytest.raises(tok.TokenizerError, match=r"vocab\.bpe has sha256 .* expected 1ce16647"):
        tok.load_gpt2_encoding(tmp_path)
    with pytest.raises(tok.TokenizerError, match="vocab.bpe"):
        tok.hf_gpt2_tokenizer(tmp_path)
    (tmp_path / "encoder.json").unlink()
    with pytest.raises(tok.TokenizerError, match="encoder.json is missing"):
        tok.load_gpt2_encoding(tmp_path)


def test_digest_is_stable_and_hex():
    assert tok.tokenizer_digest() == tok.tokenizer_digest()
    assert re.fullmatch(r"[0-9a-f]{64}", tok.tokenizer_digest())


def test_hf_tokenizer_matches_tiktoken():
    hf = tok.hf_gpt2_tokenizer()
    encoding = tok.gpt2_encoding()
    assert len(hf) == tok.VOCAB_SIZE
    assert hf.eos_token_id == hf.bos_token_id == hf.unk_token_id == tok.EOT_ID
    for text in SAMPLE:
        assert hf(text)["input_ids"] == encoding.encode_ordinary(text), text
    assert hf.decode([15496, 995]) == "Hello world"


SUBPROCESS_CHECK = """
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(sys.argv[2])
print(json.dumps({"ids": [tokenizer(t)["input_ids"] for t in texts], "eos": tokenizer.eos_token_id}))
"""


def test_saved_tokenizer_loads_offline_in_a_fresh_process(tmp_path):
    tok.save_hf_tokenizer(tmp_path / "checkpoint")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_CHECK, str(tmp_path / "checkpoint"), json.dumps(SAMPLE)],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["eos"] == tok.EOT_ID
    assert loaded["ids"] == [tok.gpt2_encoding().encode_ordinary(text) for text in SAMPLE]


# ----- tokenizers that follow the teacher (SPEC §8) ------------------------------------------------
from tiny_teachers import FAMILIES, train_bpe, wide_word_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def llama_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama_tok")
    train_bpe("llama").save_pretrained(str(folder))
    return folder


def test_hf_document_ends_with_eos_and_has_no_bos(llama_tokenizer_dir):
    text = "The State of the Union is strong. </s> <s> stays text"
    tokenizer = tok.load_tokenizer(str(llama_tokenizer_dir))
    ids = tokenizer.encode_document(text)
    hf = tokenizer.hf()
    # Independent reference: the Rust backend's own pieces for the text (no special-token parsing), then EOS.
    pieces = hf.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    expected = [token.id for piece, _ in pieces for token in hf.backend_tokenizer.model.tokenize(piece)]
    assert ids.tolist() == expected + [hf.convert_tokens_to_ids("</s>")]
    assert ids.dtype == np.uint16 and hf.convert_tokens_to_ids("<s>") not in ids.tolist()
    assert tokenizer.eos_id == hf.convert_tokens_to_ids("</s>") and ids.tolist().count(tokenizer.eos_id) == 1


def test_teacher_tokenizer_comes_from_the_teacher_folder(llama_tokenizer_dir):
    assert tok.load_tokenizer("teacher", llama_tokenizer_dir).digest == tok.hf_tokenizer(llama_tokenizer_dir).digest
    with pytest.raises(tok.TokenizerError, match="tokenizer.name=teacher needs the teacher's local folder"):
        tok.load_tokenizer("teacher")
    with pytest.raises(tok.TokenizerError, match="expected 'gpt2', 'teacher' or a folder"):
        tok.load_tokenizer("/no/such/folder")


def test_saved_hf_tokenizer_loads_with_stock_autotokenizer(tmp_path, llama_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = tok.load_tokenizer(str(llama_tokenizer_dir))
    tokenizer.save(tmp_path / "checkpoint")
    stock = AutoTokenizer.from_pretrained(str(tmp_path / "checkpoint"))
    text = "Congress shall make no law"
    assert stock(text, add_special_tokens=False)["input_ids"] == tokenizer.encode_ordinary(text)
    assert stock.eos_token_id == tokenizer.eos_id


def test_vocabulary_above_uint16_gives_uint32_documents(tmp_path):
    folder = wide_word_tokenizer(tmp_path / "wide", ["union", "state"])
    tokenizer = tok.load_tokenizer(str(folder))
    assert tokenizer.vocab_size == 70_004 and tokenizer.dtype == np.uint32
    assert tokenizer.encode_document("state union nope").tolist() == [70_003, 70_002, 70_000, 70_001]


def test_token_dtype_boundary():
    assert tok.token_dtype(65_536) == np.uint16 and tok.token_dtype(65_537) == np.uint32


def test_student_vocab_size_follows_the_tokenizer(llama_tokenizer_dir):
    llama = tok.load_tokenizer(str(llama_tokenizer_dir))
    assert llama.vocab_size == FAMILIES["llama"][2]
    assert tok.student_vocab_size(llama) == 832  # 800 padded up to a multiple of 64
    assert tok.student_vocab_size(tok.gpt2_tokenizer()) == 50257  # the paper presets: unpadded
    with pytest.raises(tok.TokenizerError, match="vocab_size=700 is smaller than the tokenizer's 800 ids"):
        tok.student_vocab_size(llama, configured=700)


def test_mismatched_teacher_tokenizer_is_refused_naming_both(tmp_path, llama_tokenizer_dir):
    train_bpe("gpt_neox").save_pretrained(str(tmp_path / "neox"))
    llama, neox = tok.load_tokenizer(str(llama_tokenizer_dir)), tok.load_tokenizer(str(tmp_path / "neox"))
    with pytest.raises(tok.TokenizerError, match=r"teacher's tokenizer \(.*neox: 900 ids.*students' \(.*llama_tok.*800 ids"):
        tok.check_same_tokenizer(neox, llama)
    with pytest.raises(tok.TokenizerError, match="50257 ids"):
        tok.check_same_tokenizer(neox, tok.gpt2_tokenizer())
    tok.check_same_tokenizer(llama, tok.load_tokenizer(str(llama_tokenizer_dir)))  # the same one passes
