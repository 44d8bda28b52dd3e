"""Corpus -> tokens: tokenizers (GPT-2 BPE offline, or the teacher's own), token shards, training windows; the `prepare` stage."""
