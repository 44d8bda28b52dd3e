"""Steering a CoCoMix student (SPEC §7, §11): greedy generation with one concept's logit raised before the TopK.

    prompts = fixed_prompts(val_tokens, count, length)
    results = steer(model, prompts, concepts, strength, k, new_tokens)

The effect is measured on the text itself: the unsteered model reads each generation, and the
share of generated tokens at which `concept` is among its K largest concept logits is compared
between the steered and the unsteered generations. (A model's own concept logits are computed
before the TopK step, so steering changes them only through the tokens it made the model write.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GENERATED_TOKENS = 32
PROMPT_TOKENS = 16


@dataclass(frozen=True)
class SteeringResult:
    """One concept steered on every prompt: generations (prompt excluded) and how often the concept is predicted."""

    concept: int
    strength: float
    unsteered: list[list[int]]
    steered: list[list[int]]
    unsteered_rate: float  # share of generated tokens whose top-K concept logits hold `concept`
    steered_rate: float


def fixed_prompts(val_tokens: np.ndarray, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens at evenly spaced offsets of the validation split (the same every run)."""
    if len(val_tokens) < length:
        raise ValueError(f"the validation split has {len(val_tokens)} tokens, fewer than one prompt of {length}")
    starts = np.linspace(0, len(val_tokens) - length, num=count).astype(np.int64)
    return [np.asarray(val_tokens[start : start + length], dtype=np.int64).tolist() for start in starts]


def prompt_and_new_tokens(positions: int) -> tuple[int, int]:
    """(prompt length, tokens to generate) that fit a model of `positions` positions: 16 and 32 when they fit."""
    prompt = min(PROMPT_TOKENS, positions // 4)
    return prompt, min(GENERATED_TOKENS, positions - prompt)


@torch.inference_mode()
def greedy(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int,
           offsets: dict[int, float] | None = None) -> list[list[int]]:
    """Greedy continuations (new tokens only, each ending at its first end-of-text) of equally long `prompts`,
    generated as one batch, with `offsets` added to the concept logits before TopK."""
    if len({len(prompt) for prompt in prompts}) != 1:
        raise ValueError("greedy generates prompts of one length in one batch (no padding)")
    ids = torch.tensor(prompts, device=next(model.parameters()).device)
    eos = model.config.eos_token_id
    # The padding only fills rows that ended (cut off below); an id no prompt ends with, so that transformers does
    # not take a prompt ending at a document boundary (end-of-text) for a right-padded one.
    pad = min(set(range(len(prompts) + 1)) - {prompt[-1] for prompt in prompts})
    with model.steer_concepts(offsets or {}):
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=pad)
    texts = output[:, ids.shape[1]:].tolist()
    return [text[: text.index(eos) + 1] if eos in text else text for text in texts]


@torch.inference_mode()
def concept_hits(model: torch.nn.Module, prompt: list[int], generated: list[int], concept: int, k: int) -> int:
    """Generated tokens at which the (unsteered) model ranks `concept` among its k largest concept logits."""
    if not generated:  # the generation ended at once (an end-of-text token)
        return 0
    ids = torch.tensor([prompt + generated], device=next(model.parameters()).device)
    with model.steer_concepts({}):
        logits = model(input_ids=ids, use_cache=False).concept_logits[0, len(prompt):]
    return int((logits.topk(k, dim=-1).indices == concept).any(-1).sum())


def concept_rate(model: torch.nn.Module, prompts: list[list[int]], texts: list[list[int]], concept: int, k: int) -> float:
    """Share of all generated tokens (every prompt pooled) at which `concept` is among the k largest logits."""
    hits = sum(concept_hits(model, prompt, text, concept, k) for prompt, text in zip(prompts, texts))
    return hits / max(sum(len(text) for text in texts), 1)


def steer(model: torch.nn.Module, prompts: list[list[int]], concepts: list[int], strength: float, k: int,
          new_tokens: int) -> list[SteeringResult]:
    """Greedy generations from every prompt without and with each concept raised by `strength`, and how often each
    concept is then predicted; the unsteered generations are made once and shared."""
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    # One token at a time of a small batch: operations too small to share between threads, which on a busy
    # machine wait for each other (cpu preset, 2 cores under load: 40 s with 2 threads, 4.5 s with one).
    torch.set_num_threads(1)
    try:
        unsteered = greedy(model, prompts, new_tokens)
        results = []
        for concept in concepts:
            steered = greedy(model, prompts, new_tokens, {concept: strength})
            results.append(SteeringResult(
                concept=concept, strength=strength, unsteered=unsteered, steered=steered,
                unsteered_rate=concept_rate(model, prompts, unsteered, concept, k),
                steered_rate=concept_rate(model, prompts, steered, concept, k),
            ))
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    return results
