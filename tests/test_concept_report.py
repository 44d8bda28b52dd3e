"""Concepts a person can look at (SPEC §11): cards from the label pass, concept prediction, steering, the page."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cocomix_core.concepts.cards import (
    CONTEXT_BEFORE,
    NO_TOKEN,
    CardCollector,
    ConceptCards,
)
from cocomix_core.concepts.labels import (
    Attribution,
    ConceptExtractor,
    LabelCache,
    build_label_cache,
)
from cocomix_core.concepts.sae import TopKSAE
from cocomix_core.concepts.steering import greedy, steer
from cocomix_core.data.tokenizer import gpt2_tokenizer
from cocomix_core.data.windows import TrainWindows
from cocomix_core.evaluation.concept_quality import frequency_overlap, topk_overlap
from cocomix_core.model.modeling_cocomix import CoCoMixConfig, CoCoMixForCausalLM
from cocomix_core.reporting.concepts_report import (
    ConceptsContent,
    SteeringView,
    card_views,
    to_html,
    to_markdown,
)

VOCAB, WIDTH, PLANTED_TOKEN, PLANTED_LATENT = 50, 64, 7, 5


# ----- cards ---------------------------------------------------------------------------------------
def identity_teacher() -> GPT2LMHeadModel:
    """A one-block GPT-2 whose block adds nothing and whose positions are zero: the residual is the token's embedding."""
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=1, n_head=2, n_positions=32))
    with torch.no_grad():
        teacher.transformer.wpe.weight.zero_()
        for projection in (teacher.transformer.h[0].attn.c_proj, teacher.transformer.h[0].mlp.c_proj):
            projection.weight.zero_()
            projection.bias.zero_()
    return teacher


def planted_sae(teacher: GPT2LMHeadModel) -> TopKSAE:
    """An SAE whose latent PLANTED_LATENT reads the normalised embedding of PLANTED_TOKEN, above a threshold that
    only that token passes; the other latents are constant and positive, so they fill the rest of the support."""
    sae = TopKSAE(num_latents=16, width=WIDTH, k=4)
    embeddings = teacher.transformer.wte.weight.detach()
    normalised = (embeddings - embeddings.mean(-1, keepdim=True)) / embeddings.std(-1, keepdim=True)
    with torch.no_grad():
        sae.encoder.weight.zero_()
        sae.encoder.weight[PLANTED_LATENT] = normalised[PLANTED_TOKEN] / WIDTH  # its own token: about 1, others ~±0.13
        sae.latent_bias.fill_(0.05)
        sae.latent_bias[PLANTED_LATENT] = -0.5
        sae.decoder.weight.normal_()
    return sae


def test_a_planted_latent_s_card_lists_contexts_around_its_token(tmp_path):
    rng = np.random.default_rng(0)
    stream = rng.choice([token for token in range(VOCAB) if token != PLANTED_TOKEN], size=400)
    planted_at = [13, 50, 77, 120, 160, 201, 240, 277, 301, 333, 350, 371, 390]
    stream[planted_at] = PLANTED_TOKEN
    windows = TrainWindows(stream.astype(np.uint16), block_size=16, seed=0)
    teacher = identity_teacher()
    cache = LabelCache(build_label_cache(ConceptExtractor(teacher, planted_sae(teacher), 0), windows,
                                         num_samples=windows.windows_per_epoch, batch_size=5, k=2,
                                         out_dir=tmp_path / "labels", provenance={"teacher": "identity"}))
    cards = cache.cards()
    visited = windows.batch(0, windows.windows_per_epoch)
    # The latent fires on the planted token and nowhere else: once per visit of that token.
    assert cards.active_counts[PLANTED_LATENT] == (visited == PLANTED_TOKEN).sum() > 10
    assert cards.tokens == visited.size and cards.label_counts.sum() == visited.size * 2
    contexts = [ids for _, ids in cards.used_contexts(PLANTED_LATENT)]
    assert len(contexts) == 10  # the ten strongest of more than ten visits, each planted offset at most once
    assert all(ids[CONTEXT_BEFORE] == PLANTED_TOKEN for ids in contexts)
    shown = {tuple(int(i) for i in ids) for ids in contexts}
    assert len(shown) == 10 and shown <= {tuple(_around(stream, at)) for at in planted_at}  # the stream around them


def _around(stream: np.ndarray, at: int) -> list[int]:
    return [int(stream[i]) if 0 <= i < len(stream) else NO_TOKEN for i in range(at - CONTEXT_BEFORE, at + 4)]


def test_a_card_keeps_the_strongest_activations_at_distinct_offsets():
    collector = CardCollector(num_latents=4, top=2)
    latents = torch.tensor([[[3], [3], [1]]])  # one window of 3 tokens, support of one latent each
    first = Attribution(scores=torch.zeros(1, 3, 1), indices=latents, latents=torch.tensor([[[5.0], [7.0], [2.0]]]))
    collector.update(first, torch.zeros(1, 3, 1, dtype=torch.long), np.array([[10, 11, 12]]))
    # The same corpus offset 10 again (overlapping windows), stronger; and a weaker new offset 20.
    second = Attribution(scores=torch.zeros(1, 2, 1), indices=torch.tensor([[[3], [3]]]),
                         latents=torch.tensor([[[5.5], [1.0]]]))
    collector.update(second, torch.zeros(1, 2, 1, dtype=torch.long), np.array([[10, 20]]))
    assert collector.values[3].tolist() == [7.0, 5.5] and collector.offsets[3].tolist() == [11, 10]
    assert collector.values[1].tolist() == [2.0, -np.inf] and collector.offsets[1].tolist() == [12, NO_TOKEN]
    assert collector.active_counts.tolist() == [0, 1, 0, 4] and collector.label_counts.tolist() == [5, 0, 0, 0]


# ----- the page ------------------------------------------------------------------------------------
def test_corpus_text_is_escaped_in_the_html_page_and_the_card():
    tokenizer = gpt2_tokenizer()
    ids = tokenizer.encode_ordinary("ok <script>alert('x')</script> & done")[:12]
    contexts = np.full((1, 10, 12), NO_TOKEN)
    contexts[0, 0, : len(ids)] = ids
    cards = ConceptCards(active_counts=np.array([3]), label_counts=np.array([2]), tokens=100,
                         top_values=np.array([[1.5] + [-np.inf] * 9], dtype=np.float32), contexts=contexts)
    (view,) = card_views(cards, [0], tokenizer.hf())
    assert "".join(view.contexts[0][1]).startswith("ok <script>")
    steering = SteeringView(concept=0, strength=20, unsteered_rate=0.1, steered_rate=0.5, prompts=["<b>prompt</b>"],
                            unsteered=["</table>"], steered=["<img src=x onerror=alert(1)>"])
    content = ConceptsContent(cards=[view], overlap={"cocomix": [(128, 0.25)]}, floor=0.1, steering=[steering])
    page = to_html(content, plot=None)
    # The firing token (the 9th, "</") is marked; every corpus character is an entity or plain text.
    assert "ok &lt;script&gt;alert(&#x27;x&#x27;)<mark>&lt;/</mark>script&gt; &amp;" in page
    assert "<script" not in page and "</script" not in page
    assert "<img src=x" not in page and "<b>prompt" not in page and "&lt;/table&gt;" in page
    markdown = to_markdown(content)
    assert "<script>" not in markdown and "\\<script\\>" in markdown
    assert all(f"## {title}" in markdown for title in ("Concept cards", "Concept prediction", "Steering"))
    assert "Latent 0: chosen as a label 2 times, active on 3.00% of tokens" in page


# ----- concept prediction --------------------------------------------------------------------------
def test_topk_overlap_and_the_frequency_floor_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0, 0.0],   # top 2: {1, 3}
                           [5.0, 4.0, 0.0, 0.0, 0.0, 0.0]])  # top 2: {0, 1}
    labels = torch.tensor([[3, 5], [1, 0]])
    assert topk_overlap(logits, labels).tolist() == [0.5, 1.0]
    counts = np.array([1, 9, 3, 9, 0, 2])  # the two most chosen: 1 and 3
    assert frequency_overlap(counts, labels.numpy()) == 0.5  # 3 and 1 of the four labels


# ----- steering ------------------------------------------------------------------------------------
CLASSES, RUN = 4, 6  # tokens 4c..4c+3 form class c; text comes in runs of one class


def class_runs(rng: np.random.Generator, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    runs = rng.integers(0, CLASSES, size=(batch, length // RUN + 1)).repeat(RUN, axis=1)[:, :length]
    ids = runs * 4 + rng.integers(0, 4, size=(batch, length))
    return torch.from_numpy(ids), torch.from_numpy(runs)[..., None]


@pytest.fixture(scope="module")
def class_model() -> CoCoMixForCausalLM:
    """A tiny CoCoMix student trained to predict, as its one concept per token, the class of the token."""
    torch.manual_seed(0)
    config = CoCoMixConfig(vocab_size=CLASSES * 4, n_embd=32, n_head=2, n_layer=2, n_positions=64, resid_pdrop=0,
                           embd_pdrop=0, attn_pdrop=0, bos_token_id=None, eos_token_id=None, concept_dim=8,
                           concept_num=2, insert_layer_index=1)
    model = CoCoMixForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic, so the same model, on any machine
    try:
        for _ in range(400):
            ids, labels = class_runs(rng, 8, 18)
            output = model(input_ids=ids, labels=ids, concept_labels=labels, use_cache=False)
            optimizer.zero_grad()
            (output.loss + 0.1 * output.concept_loss).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


PROMPTS = [[0, 1, 2, 3, 0, 1], [4, 5, 6, 7, 5, 4], [12, 13, 14, 12, 13, 15]]


def test_steering_a_concept_hard_makes_the_model_predict_it_more(class_model):
    results = steer(class_model, PROMPTS, list(range(CLASSES)), strength=20.0, k=1, new_tokens=12)
    unsteered = np.mean([result.unsteered_rate for result in results])
    steered = np.mean([result.steered_rate for result in results])
    # Unsteered, each class is predicted about a quarter of the time; steered, it dominates the generations.
    assert unsteered < 0.4 and steered > unsteered + 0.4, [(r.unsteered_rate, r.steered_rate) for r in results]
    assert all(result.unsteered == results[0].unsteered for result in results)  # the same prompts, no steering


def test_unsteered_generation_is_plain_greedy_generate(class_model):
    together = greedy(class_model, PROMPTS, 12)
    for prompt, text in zip(PROMPTS, together):
        plain = class_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        assert text == plain[0, len(prompt):].tolist()  # one prompt at a time, as generate() alone does it
    with pytest.raises(ValueError, match="one length"):
        greedy(class_model, [[1, 2], [3]], 4)
    assert class_model.transformer.concept_steering == {}  # steering was switched off again


# ----- settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "named"), [
    ("concepts.show=[3, -1]", "concepts.show holds negative latent ids [-1]"),
    ("concepts.show=[256]", "concepts.show=[256] are not latents of an SAE of sae.num_latents=256"),
    ("concepts.steer_strength=.inf", "steer_strength"),
])
def test_concept_settings_that_name_no_latent_are_refused_by_name(override: str, named: str):
    from settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=re.escape(named)):
        load_settings("smoke", [override])


def test_what_the_report_shows_does_not_change_the_label_cache_key():
    from cocomix_core.concepts.stage import label_cache_key
    from settings import load_settings

    shown = load_settings("smoke", ["concepts.show=[1, 2]", "concepts.steer_strength=5", "concepts.cards=3"])
    plain, other_k = load_settings("smoke"), load_settings("smoke", ["concepts.labels_per_token=2"])
    provenance = {"teacher": "t"}
    assert label_cache_key(shown, provenance, 8) == label_cache_key(plain, provenance, 8)
    assert label_cache_key(other_k, provenance, 8) != label_cache_key(plain, provenance, 8)
    assert label_cache_key(plain, provenance, 4) != label_cache_key(plain, provenance, 8)  # fewer validation windows


def test_without_a_label_cache_the_sections_say_why_they_are_empty():
    from cocomix_core.reporting.concepts_report import gather_concepts
    from settings import load_settings

    options = load_settings("smoke", ["concepts.label_source=online"]).concepts
    content = gather_concepts(None, gpt2_tokenizer().hf(), options, overlap={})
    markdown = to_markdown(content)
    assert content.cards == [] and content.steering == [] and content.floor is None
    assert "no concept cards: no label cache with cards \\(concepts\\.label\\_source=online" in markdown
    assert "no concept prediction measured" in markdown and "nothing steered: no concept cards" in markdown
