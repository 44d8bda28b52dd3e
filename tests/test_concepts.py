"""Concept extractor against a naive float64 reference of SPEC §2, and the label cache."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cocomix_core.concepts.labels import (
    ConceptExtractor,
    LabelCache,
    build_label_cache,
    capture_residual,
    load_teacher,
    next_token_loss,
    next_token_loss_and_grad,
)
from cocomix_core.concepts.sae import TopKSAE
from cocomix_core.data.windows import TrainWindows
from cocomix_core.model import modeling_cocomix as modeling

VOCAB, WIDTH, LAYERS, C = 96, 32, 3, 256


class ScaledLogitsGPT2(GPT2LMHeadModel):
    """Logits that are not the output layer's alone (like a soft-cap or logit scale): the extractor must notice."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 1.5
        return output


def make_teacher(kind: str) -> torch.nn.Module:
    torch.manual_seed(1)
    if kind.startswith("gpt2"):
        config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=WIDTH, n_layer=LAYERS, n_head=4,
                            bos_token_id=0, eos_token_id=0)
        model = (ScaledLogitsGPT2 if kind == "gpt2_scaled_logits" else GPT2LMHeadModel)(config)
    else:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than default init so the gradients are far from zero
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    return model.eval()


def make_sae(k: int = 8, seed: int = 0, width: int = WIDTH, num_latents: int = C) -> TopKSAE:
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(num_latents, width, k)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return sae


def blocks_of(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def naive_scores(teacher, sae, ids, layer):
    """SPEC §2 in float64 with full autograd (parameter grads on) through a deep copy of the teacher."""
    model = copy.deepcopy(teacher).double().eval()
    model.requires_grad_(True)
    captured = []
    handle = blocks_of(model)[layer].register_forward_hook(
        lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o)
    )
    logits = model(input_ids=ids).logits
    handle.remove()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    x = captured[0]
    (g,) = torch.autograd.grad(loss, x)
    x, g = x.detach(), g.detach()
    w_enc, w_dec = sae.encoder.weight.detach().double(), sae.decoder.weight.detach().double()
    pre_bias, latent_bias = sae.pre_bias.detach().double(), sae.latent_bias.detach().double()
    d = x.shape[-1]
    mu = x.sum(-1, keepdim=True) / d
    sigma = (((x - mu) ** 2).sum(-1, keepdim=True) / (d - 1)).sqrt()
    pre = ((x - mu) / (sigma + 1e-5) - pre_bias) @ w_enc.T + latent_bias
    top = pre.topk(sae.k, dim=-1)
    a = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0.0))
    return (g @ w_dec) * a, x


def ids_for(seed=0, batch=2, length=12):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_labels_are_dense_topk(labels, dense, k, require_untied=False):
    """Scores at the chosen labels equal the dense top-k scores; distinct labels; sets equal when untied."""
    assert labels.shape == (*dense.shape[:-1], k) and labels.dtype == torch.int64
    assert (labels.sort(-1).values.diff(dim=-1) != 0).all(), "labels repeat within a token"
    chosen = dense.gather(-1, labels).sort(-1, descending=True).values
    best = dense.topk(k, dim=-1)
    torch.testing.assert_close(chosen, best.values, rtol=0, atol=1e-12)
    kth_plus_one = dense.topk(k + 1, dim=-1).values[..., -1]
    untied = best.values[..., -1] > kth_plus_one
    assert untied.any() or not require_untied
    for pos in untied.nonzero():
        assert set(labels[tuple(pos)].tolist()) == set(best.indices[tuple(pos)].tolist())


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt2_scaled_logits"])
@pytest.mark.parametrize("layer", [1, LAYERS - 1])
def test_attribution_and_labels_match_naive_float64(kind, layer):
    teacher = make_teacher(kind)
    sae = make_sae(k=8)
    ids = ids_for()
    reference, _ = naive_scores(teacher, sae, ids, layer)
    extractor = ConceptExtractor(copy.deepcopy(teacher).double(), copy.deepcopy(sae).double(), layer)
    # the loss gradient comes from the output layer directly unless the logits are more than that layer
    assert (extractor.output_layer is None) == (kind == "gpt2_scaled_logits")
    scores = extractor.attribution_scores(ids)
    assert scores.shape == (2, 12, C)
    assert float(reference.abs().max()) > 1e-4  # a test on all-zero gradients would prove nothing
    torch.testing.assert_close(scores, reference, rtol=1e-9, atol=1e-12)
    assert ((scores != 0).sum(-1) <= sae.k).all()
    for k in (1, 4, 8):
        assert_labels_are_dense_topk(extractor.concept_labels(ids, k), reference, k, require_untied=k == 1)

    # float32 extractor agrees with the float64 reference to float32 accuracy
    fp32 = ConceptExtractor(copy.deepcopy(teacher), sae, layer)
    scale = float(reference.abs().max())
    torch.testing.assert_close(fp32.attribution_scores(ids).double(), reference, rtol=0, atol=1e-4 * scale)


def test_next_token_loss_and_grad_equals_autograd_over_row_chunks(monkeypatch):
    monkeypatch.setattr(modeling, "CHUNK_ELEMENTS", 3 * VOCAB + 7)  # many chunks, the last one short
    torch.manual_seed(2)
    output_layer = torch.nn.Linear(WIDTH, VOCAB, bias=True).double()
    hidden = torch.randn(2, 12, WIDTH, dtype=torch.float64, requires_grad=True)
    ids = ids_for()
    loss, grad = next_token_loss_and_grad(hidden.detach(), output_layer, ids)
    expected = next_token_loss(output_layer(hidden), ids)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_labels_fill_with_zero_scores_before_negative_ones():
    # K == k_sae: most tokens have negative scores on their support, which the dense top-K
    # ranks below the zeros of latents off the support
    teacher = make_teacher("gpt2").double()
    sae = make_sae(k=4, seed=5).double()
    ids = ids_for(seed=3)
    reference, _ = naive_scores(teacher, sae, ids, 1)
    labels = ConceptExtractor(teacher, sae, 1).concept_labels(ids, 4)
    negative_on_support = (reference < 0).sum(-1)
    assert (negative_on_support > 0).any()
    assert_labels_are_dense_topk(labels, reference, 4)
    assert (reference.gather(-1, labels) >= 0).all()


def test_residual_capture_matches_hidden_states():
    for kind in ("gpt2", "llama"):
        teacher = make_teacher(kind)
        ids = ids_for()
        with torch.no_grad():
            out = teacher(input_ids=ids, output_hidden_states=True)
        for layer in range(LAYERS - 1):
            torch.testing.assert_close(capture_residual(teacher, ids, layer), out.hidden_states[layer + 1])
        # the last block: hidden_states[-1] is after the final norm, the capture is before it
        last = capture_residual(teacher, ids, LAYERS - 1)
        final_norm = teacher.transformer.ln_f if kind == "gpt2" else teacher.model.norm
        assert not torch.allclose(last, out.hidden_states[-1])
        torch.testing.assert_close(final_norm(last), out.hidden_states[-1])


def test_no_parameter_grads_and_backward_stops_at_sae_layer():
    teacher = make_teacher("gpt2")
    for param in teacher.parameters():
        param.requires_grad_(True)  # the extractor must freeze them itself
    sae = make_sae()
    layer = 2
    extractor = ConceptExtractor(teacher, sae, layer)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    below, above, grads_seen = [], [], []

    def watch(store):
        def hook(_m, _i, output):
            tensor = output[0] if isinstance(output, tuple) else output
            store.append(tensor.requires_grad)
            if tensor.requires_grad:
                tensor.register_hook(lambda grad: grads_seen.append(grad.shape))
        return hook

    handles = [blocks_of(teacher)[i].register_forward_hook(watch(below)) for i in range(layer)]
    handles.append(blocks_of(teacher)[layer].register_forward_hook(watch(above)))
    extractor.concept_labels(ids_for(), 4)
    for handle in handles:
        handle.remove()
    assert below == [False] * layer, "autograd reaches blocks below the SAE layer"
    assert above == [False]  # the block itself runs without a graph; its output is swapped for a leaf
    assert not grads_seen
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in sae.parameters())


def test_bad_inputs():
    teacher = make_teacher("gpt2")
    with pytest.raises(ValueError, match="hidden size 32"):
        ConceptExtractor(teacher, make_sae(width=24), 1)
    with pytest.raises(ValueError, match="3 blocks"):
        ConceptExtractor(teacher, make_sae(), 3)
    with pytest.raises(ValueError, match="3 blocks"):
        ConceptExtractor(teacher, make_sae(), -1)
    extractor = ConceptExtractor(teacher, make_sae(k=4), 1)
    with pytest.raises(ValueError, match="SAE's k=4"):
        extractor.concept_labels(ids_for(), 5)
    with pytest.raises(ValueError, match="between 1"):
        extractor.concept_labels(ids_for(), 0)


def test_concept_dim_must_fit_uint16(tmp_path):
    extractor = ConceptExtractor(make_teacher("gpt2"), TopKSAE(65537, WIDTH, 4), 1)
    windows = TrainWindows(np.arange(200, dtype=np.uint16) % VOCAB, 12, seed=0)
    with pytest.raises(ValueError, match="uint16"):
        build_label_cache(extractor, windows, 2, 2, 4, tmp_path / "cache", {"teacher": "t"})


def test_label_cache_matches_online_labels_and_is_reused(tmp_path, monkeypatch):
    extractor = ConceptExtractor(make_teacher("llama"), make_sae(k=8), 1)
    tokens = np.random.default_rng(0).integers(0, VOCAB, 400).astype(np.uint16)
    windows = TrainWindows(tokens, 12, seed=7)
    provenance = {"data_sha256": "abc", "teacher": "tiny-llama", "sae": "rand-0", "layer_index": 1}
    out = build_label_cache(extractor, windows, num_samples=7, batch_size=3, k=4, out_dir=tmp_path / "labels",
                            provenance=provenance)
    cache = LabelCache(out)
    assert cache.manifest["num_samples"] == 7 and cache.manifest["k"] == 4 and cache.manifest["concept_dim"] == C
    assert cache.manifest["windows_seed"] == 7 and cache.manifest["block_size"] == 12
    assert cache.verify_file()
    online = extractor.concept_labels(torch.from_numpy(windows.batch(2, 4)), 4)
    cached = cache.labels(2, 4)
    assert cached.dtype == torch.int64 and torch.equal(cached, online)
    assert torch.equal(cache.labels(6, 1), extractor.concept_labels(torch.from_numpy(windows.batch(6, 1)), 4))
    with pytest.raises(IndexError, match="0..6"):
        cache.labels(5, 3)

    cache.check({"k": 4, "teacher": "tiny-llama", "provenance": provenance})
    with pytest.raises(ValueError, match="teacher"):
        cache.check({"teacher": "gpt2"})
    with pytest.raises(ValueError, match="windows_seed"):
        cache.check({"windows_seed": 8, "k": 4})

    # same request again: nothing is computed
    calls = []
    original = extractor.labels_and_attribution  # the label pass: labels and, from the same pass, the concept cards
    monkeypatch.setattr(extractor, "labels_and_attribution", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    before = (out / "labels.u16").stat().st_mtime_ns
    build_label_cache(extractor, windows, 7, 3, 4, tmp_path / "labels", provenance)
    assert calls == [] and (out / "labels.u16").stat().st_mtime_ns == before
    # a different provenance rebuilds
    build_label_cache(extractor, windows, 7, 3, 4, tmp_path / "labels", dict(provenance, sae="rand-1"))
    assert len(calls) == 3
    assert LabelCache(out).manifest["provenance"]["sae"] == "rand-1"
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_load_teacher_from_local_folder(tmp_path):
    make_teacher("gpt2").save_pretrained(tmp_path / "teacher")
    teacher = load_teacher(tmp_path / "teacher")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.config.n_embd == WIDTH


# ----- any architecture, any precision (SPEC §8) -------------------------------------------------
from tiny_teachers import DEPTH, random_teacher  # noqa: E402

from cocomix_core.concepts.labels import capture_residual as _capture  # noqa: E402
from cocomix_core.concepts.labels import teacher_blocks as _blocks  # noqa: E402


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_residual_is_the_block_output_before_the_final_norm_in_every_family(family):
    teacher = random_teacher(family, vocab_size=300, eos_id=0).eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states  # [embeddings, block 0, ...]
    assert len(_blocks(teacher)) == DEPTH
    for layer in range(DEPTH - 1):  # HF's last entry has the final norm applied; ours never does
        assert torch.allclose(_capture(teacher, ids, layer), hidden[layer + 1], atol=1e-6)
    last = _capture(teacher, ids, DEPTH - 1)
    assert not torch.allclose(last, hidden[-1], atol=1e-3)  # hidden[-1] is normed


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_attribution_of_other_families_matches_autograd_and_bf16_approximates_it(family):
    teacher = random_teacher(family, vocab_size=300, eos_id=0).double().eval()
    sae = TopKSAE(64, teacher.config.hidden_size, 8)
    torch.nn.init.normal_(sae.encoder.weight, std=0.3)
    sae = sae.double()
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    scores = ConceptExtractor(teacher, sae, 1).attribution_scores(ids)
    # Reference: full-model autograd, x taken from output_hidden_states (float64 throughout).
    embeddings = teacher.get_input_embeddings()(ids).requires_grad_(True)  # the frozen model still builds a graph
    out = teacher(inputs_embeds=embeddings, output_hidden_states=True)
    x = out.hidden_states[2]
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1))
    (grad,) = torch.autograd.grad(loss, x)
    latents, _ = sae.encode(x.detach())
    expected = (grad @ sae.decoder.weight) * latents
    assert torch.allclose(scores, expected, atol=1e-10)

    bf16 = ConceptExtractor(teacher.to(torch.bfloat16), sae.float(), 1).attribution_scores(ids)
    assert bf16.dtype == torch.float32  # SAE math in fp32 on a bf16 teacher
    # bf16 moves some tokens' TopK support, so compare the whole score field, not each entry.
    cosine = F.cosine_similarity(bf16.double().flatten(), expected.detach().flatten(), dim=0)
    assert cosine > 0.95, float(cosine)
