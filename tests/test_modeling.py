"""Tests for cocomix_core.model.modeling_cocomix against a naive float64 re-derivation of SPEC §3."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from cocomix_core.model import modeling_cocomix as modeling
from cocomix_core.model.modeling_cocomix import (
    CoCoMixConfig,
    CoCoMixForCausalLM,
    compress_sparse_concepts,
    concept_loss,
    concept_loss_and_topk,
    load_released_state_dict,
)

VOCAB, WIDTH, HEADS, LAYERS, CONCEPTS, K_MIX, K_LABELS = 61, 32, 4, 3, 48, 6, 4
LAMBDA = 0.1


def tiny_config(**overrides) -> CoCoMixConfig:
    settings = dict(
        vocab_size=VOCAB, n_embd=WIDTH, n_head=HEADS, n_layer=LAYERS, n_positions=64,
        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=None, eos_token_id=None,
        concept_dim=CONCEPTS, concept_num=K_MIX, insert_layer_index=1,
    )
    settings.update(overrides)
    return CoCoMixConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> CoCoMixForCausalLM:
    torch.manual_seed(seed)
    model = CoCoMixForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # non-zero pre_bias and LN affine so that every term of the formulas is exercised
        for name, param in model.named_parameters():
            if name.endswith("pre_bias") or ".ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


# ---------------------------------------------------------------- naive float64 reference of SPEC §3

def ref_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_gelu_new(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_block(p, i, x, n_head):
    """Pre-LN GPT-2 block, causal attention over all positions; Conv1D weights are (in, out)."""
    pre = f"transformer.h.{i}."
    B, T, d = x.shape
    hd = d // n_head
    a = ref_layer_norm(x, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"])
    qkv = a @ p[pre + "attn.c_attn.weight"] + p[pre + "attn.c_attn.bias"]
    q, k, v = (t.reshape(B, T, n_head, hd).transpose(1, 2) for t in qkv.split(d, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    attn = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, d)
    x = x + attn @ p[pre + "attn.c_proj.weight"] + p[pre + "attn.c_proj.bias"]
    m = ref_layer_norm(x, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"])
    hidden = ref_gelu_new(m @ p[pre + "mlp.c_fc.weight"] + p[pre + "mlp.c_fc.bias"])
    return x + hidden @ p[pre + "mlp.c_proj.weight"] + p[pre + "mlp.c_proj.bias"]


def ref_forward(p, cfg, ids):
    """Returns (logits, concept logits z or None) straight from SPEC §3 and §9 (cfg.mix), dense compress,
    explicit interleave loop."""
    B, T = ids.shape
    h = p["transformer.wte.weight"][ids] + p["transformer.wpe.weight"][torch.arange(T)]
    for i in range(cfg.insert_layer_index):
        h = ref_block(p, i, h, cfg.n_head)
    z = None
    if cfg.mix == "pause":  # one learned vector in place of every c_t
        c = p["transformer.pause_vector"].expand(B, T, -1)
    else:
        d = h.shape[-1]
        mu = h.mean(-1, keepdim=True)
        sigma = torch.sqrt(((h - mu) ** 2).sum(-1, keepdim=True) / (d - 1))  # Bessel
        h_hat = (h - mu) / (sigma + 1e-5)
        z = (h_hat - p["transformer.pre_bias"]) @ p["transformer.concept_predictor.weight"].T
        z = z + p["transformer.concept_predictor.bias"]
    if cfg.mix in ("insert", "add"):
        top = torch.topk(z, cfg.concept_num, dim=-1).indices
        keep = torch.zeros_like(z, dtype=torch.bool).scatter(-1, top, True)
        z_k = torch.where(keep, z, torch.zeros_like(z))  # signed values, no ReLU
        compressed = z_k @ p["transformer.compress_layer.weight"].T + p["transformer.compress_layer.bias"]
        c = (compressed + p["transformer.pre_bias"]) * sigma + mu
    if cfg.mix in ("insert", "pause"):
        mixed = []
        for t in range(T):
            mixed += [h[:, t], c[:, t]]
        x = torch.stack(mixed, dim=1)
    else:
        x = h + c if cfg.mix == "add" else h
    for i in range(cfg.insert_layer_index, cfg.n_layer):
        x = ref_block(p, i, x, cfg.n_head)
    outputs = x[:, 1::2] if cfg.mix in ("insert", "pause") else x
    out = ref_layer_norm(outputs, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
    return out @ p["transformer.wte.weight"].T, z


def ref_losses(logits, z, ids, concept_labels):
    B, T, _ = logits.shape
    logp = torch.log_softmax(logits, -1)
    ntp = -torch.stack([logp[b, t, ids[b, t + 1]] for b in range(B) for t in range(T - 1)]).mean()
    logq = torch.log_softmax(z, -1)
    per_token = [-logq[b, t, concept_labels[b, t]].mean() for b in range(B) for t in range(T)]
    return ntp, torch.stack(per_token).mean()


def random_batch(B=2, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    concept_labels = torch.randint(0, CONCEPTS, (B, T, K_LABELS), generator=g)
    return ids, concept_labels


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("loss_from", ["forward", "concept_logits"])  # the trainer's fused path, the documented one
@pytest.mark.parametrize("insert_layer_index", [0, 1, 2])
def test_forward_losses_and_grads_match_float64_reference(insert_layer_index, loss_from):
    model = tiny_model(insert_layer_index=insert_layer_index).double()
    ids, concept_labels = random_batch()
    out = model(ids, labels=ids, concept_labels=concept_labels)
    concept = out.concept_loss if loss_from == "forward" else concept_loss(out.concept_logits, concept_labels)
    total = out.loss + LAMBDA * concept
    total.backward()

    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ref_logits, ref_z = ref_forward(params, model.config, ids)
    ref_ntp, ref_concept = ref_losses(ref_logits, ref_z, ids, concept_labels)
    (ref_ntp + LAMBDA * ref_concept).backward()

    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.concept_logits, ref_z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.loss, ref_ntp, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.concept_loss, ref_concept, rtol=1e-9, atol=1e-9)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad, rtol=1e-7, atol=1e-9, msg=f"grad of {name}")
    assert model.transformer.compress_layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mix", ["add", "none", "pause"])
def test_ablation_and_pause_losses_and_grads_match_float64_reference(mix):
    """SPEC §9: additive mixing, prediction only, pause vector; every parameter's gradient, pause vector included."""
    model = tiny_model(mix=mix).double()
    with torch.no_grad():
        for param in model.parameters():  # non-zero biases everywhere, so that wrong wiring shows
            param.add_(0.05 * torch.randn_like(param))
    ids, concept_labels = random_batch()
    out = model(ids, labels=ids, concept_labels=concept_labels if mix != "pause" else None)
    total = out.loss + (LAMBDA * out.concept_loss if mix != "pause" else 0)
    total.backward()

    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ref_logits, ref_z = ref_forward(params, model.config, ids)
    if mix == "pause":  # no concept loss: L = L_ntp
        ref_ntp, ref_concept = ref_losses(ref_logits, ref_logits, ids, ids[..., None])[0], None
        ref_ntp.backward()
    else:
        ref_ntp, ref_concept = ref_losses(ref_logits, ref_z, ids, concept_labels)
        (ref_ntp + LAMBDA * ref_concept).backward()

    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.loss, ref_ntp, rtol=1e-9, atol=1e-9)
    if mix == "pause":
        assert out.concept_logits is None and out.concept_loss is None
    else:
        torch.testing.assert_close(out.concept_loss, ref_concept, rtol=1e-9, atol=1e-9)
    assert {name for name, _ in model.named_parameters()} == set(params)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad, rtol=1e-7, atol=1e-9, msg=f"grad of {name}")
    if mix == "pause":
        assert model.transformer.pause_vector.grad.abs().sum() > 0


@pytest.mark.parametrize("mix", ["insert", "add", "none", "pause"])
def test_parameters_exist_only_where_the_arm_uses_them(mix):
    names = {name.removeprefix("transformer.").split(".")[0] for name, _ in tiny_model(mix=mix).named_parameters()}
    concept_layers = {"pre_bias", "concept_predictor", "compress_layer", "pause_vector"} & names
    assert concept_layers == {
        "insert": {"pre_bias", "concept_predictor", "compress_layer"},
        "add": {"pre_bias", "concept_predictor", "compress_layer"},
        "none": {"pre_bias", "concept_predictor"},
        "pause": {"pause_vector"},
    }[mix]


def test_pause_vector_is_initialised_like_gpt2_weights():
    torch.manual_seed(0)
    vectors = torch.stack([
        CoCoMixForCausalLM(tiny_config(mix="pause", n_embd=256, n_head=4)).transformer.pause_vector.detach()
        for _ in range(4)
    ])
    assert abs(vectors.std().item() - 0.02) < 0.002 and abs(vectors.mean().item()) < 0.002


@pytest.mark.parametrize("mix", ["add", "none", "pause"])
def test_cached_generation_matches_full_recompute(mix):
    model = tiny_model(mix=mix)
    ids, _ = random_batch(B=1, T=5)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    full = ids
    for _ in range(4):
        full = torch.cat([full, model(full, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, full)


def test_unknown_mix_is_refused_by_name():
    with pytest.raises(ValueError, match="mix must be one of insert, add, none, pause"):
        tiny_config(mix="concat")


def test_loss_is_next_token_only():
    model = tiny_model()
    ids, concept_labels = random_batch()
    out = model(ids, labels=ids, concept_labels=concept_labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert out.concept_loss > 0 and not torch.isclose(out.loss, out.loss + LAMBDA * out.concept_loss)


def released_key_names(n_layer: int) -> list[str]:
    """The released checkpoint's names, written out independently of the model."""
    keys = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
            "transformer.pre_bias", "transformer.concept_predictor.weight", "transformer.concept_predictor.bias",
            "transformer.compress_layer.weight", "transformer.compress_layer.bias", "lm_head.weight"]
    for i in range(n_layer):
        for sub in ["ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]:
            keys += [f"transformer.h.{i}.{sub}.weight", f"transformer.h.{i}.{sub}.bias"]
    return keys


def released_shapes() -> dict[str, tuple[int, ...]]:
    d = WIDTH
    shapes = {"transformer.wte.weight": (VOCAB, d), "transformer.wpe.weight": (64, d), "lm_head.weight": (VOCAB, d),
              "transformer.concept_predictor.weight": (CONCEPTS, d), "transformer.concept_predictor.bias": (CONCEPTS,),
              "transformer.compress_layer.weight": (d, CONCEPTS)}
    for sub, shape in [("attn.c_attn.weight", (d, 3 * d)), ("attn.c_attn.bias", (3 * d,)),
                       ("mlp.c_fc.weight", (d, 4 * d)), ("mlp.c_fc.bias", (4 * d,)),
                       ("attn.c_proj.weight", (d, d)), ("mlp.c_proj.weight", (4 * d, d))]:
        for i in range(LAYERS):
            shapes[f"transformer.h.{i}.{sub}"] = shape
    return shapes


def released_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    shapes = released_shapes()
    state = {key: torch.randn(shapes.get(key, (WIDTH,))) for key in released_key_names(LAYERS)}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def test_state_dict_uses_released_key_names_and_loads_strictly():
    model = tiny_model()
    assert sorted(model.state_dict()) == sorted(released_key_names(LAYERS))
    state = released_state_dict()
    model.load_state_dict(state, strict=True)
    load_released_state_dict(model, state)
    torch.testing.assert_close(model.transformer.compress_layer.weight, state["transformer.compress_layer.weight"])
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.transformer.pre_bias.shape == (WIDTH,)


def test_pre_bias_initialised_to_zero():
    torch.manual_seed(0)
    model = CoCoMixForCausalLM(tiny_config())
    assert torch.count_nonzero(model.transformer.pre_bias) == 0
    assert model.transformer.concept_predictor.weight.std() > 0


def test_missing_and_unexpected_keys_are_listed():
    model = tiny_model()
    state = released_state_dict()
    del state["transformer.pre_bias"]
    state["transformer.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing keys: \['transformer.pre_bias'\]") as err:
        load_released_state_dict(model, state)
    assert "transformer.extra_head.weight" in str(err.value)


def test_mismatched_concept_sizes_raise_clear_errors(tmp_path):
    small = tiny_model(concept_dim=CONCEPTS // 2)
    with pytest.raises(ValueError, match="transformer.concept_predictor.weight"):
        load_released_state_dict(tiny_model(), small.state_dict())
    small.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"transformer.concept_predictor.weight: checkpoint \(24, 32\)"):
        CoCoMixForCausalLM.from_pretrained(tmp_path, concept_dim=CONCEPTS)


@pytest.mark.parametrize(
    "overrides, message",
    [({"insert_layer_index": LAYERS}, "insert_layer_index"), ({"insert_layer_index": -1}, "insert_layer_index"),
     ({"concept_num": CONCEPTS + 1}, "concept_num"), ({"concept_num": 0}, "concept_num"),
     ({"concept_dim": 0}, "concept_dim"), ({"n_embd": 30}, "divisible")],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_accepts_gpt2_kwargs_and_serialises_concept_fields():
    cfg = tiny_config()
    assert cfg.model_type == "cocomix" and cfg.hidden_size == WIDTH and cfg.num_hidden_layers == LAYERS
    saved = cfg.to_dict()
    assert (saved["concept_dim"], saved["concept_num"], saved["insert_layer_index"]) == (CONCEPTS, K_MIX, 1)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model()
    ids, _ = random_batch()
    model.save_pretrained(tmp_path)
    assert {"model.safetensors", "config.json", "modeling_cocomix.py"} <= set(os.listdir(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling_cocomix.CoCoMixConfig",
                                  "AutoModelForCausalLM": "modeling_cocomix.CoCoMixForCausalLM"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CoCoMixForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_auto_class_loads_in_fresh_process_without_our_package(tmp_path):
    model = tiny_model()
    ids, _ = random_batch()
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / 'ids.pt')!r})).logits
        torch.save(logits, {str(tmp_path / 'logits.pt')!r})
        assert not any(name.startswith("cocomix_core") for name in sys.modules), "package leaked in"
        print(type(model).__module__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    result = subprocess.run([sys.executable, "-c", script], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("insert_layer_index", [0, 2])
def test_cached_greedy_generation_matches_uncached(insert_layer_index):
    model = tiny_model(insert_layer_index=insert_layer_index)
    ids, _ = random_batch(B=2, T=5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, min_new_tokens=6)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, uncached)


def test_cache_holds_one_entry_per_token_before_insert_and_two_after():
    model = tiny_model(insert_layer_index=1)
    ids, _ = random_batch(B=1, T=6)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        step = model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)  # pre-v5 names work too
    assert step.past_key_values is step.cache is out.cache
    lengths = [out.cache.get_seq_length(i) for i in range(LAYERS)]
    assert lengths == [7, 14, 14]
    with torch.no_grad():
        full = model(torch.cat([ids, ids[:, :1]], dim=1)).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_left_padded_batch_matches_single_sequences(implementation):
    model = tiny_model()
    model.set_attn_implementation(implementation)
    ids, _ = random_batch(B=2, T=8)
    lengths = [8, 5]
    padded = ids.clone()
    padded[1, : 8 - lengths[1]] = 0
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, 8 - n:] = 1
    with torch.no_grad():
        batched = model(padded, attention_mask=mask).logits
        for row, n in enumerate(lengths):
            alone = model(ids[row:row + 1, 8 - n:]).logits
            torch.testing.assert_close(batched[row:row + 1, 8 - n:], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batched).all()


def dense_compress(values, indices, layer):
    z_k = torch.zeros(*values.shape[:-1], layer.in_features, dtype=values.dtype).scatter(-1, indices, values)
    return layer(z_k)


def test_gather_compress_matches_dense_in_values_and_grads():
    torch.manual_seed(3)
    model = tiny_model().double()
    trunk = model.transformer
    h = torch.randn(2, 7, WIDTH, dtype=torch.float64)
    grads = []
    for compress in (compress_sparse_concepts, dense_compress):
        model.zero_grad()
        z = trunk.concept_predictor(h - trunk.pre_bias)
        values, indices = torch.topk(z, K_MIX, dim=-1)
        out = compress(values, indices, trunk.compress_layer)
        (out * torch.linspace(-1, 1, WIDTH, dtype=torch.float64)).sum().backward()
        grads.append((out.detach(), trunk.compress_layer.weight.grad.clone(), trunk.compress_layer.bias.grad.clone(),
                      trunk.concept_predictor.weight.grad.clone(), trunk.concept_predictor.bias.grad.clone()))
    for gathered, dense in zip(*grads):
        torch.testing.assert_close(gathered, dense, rtol=1e-12, atol=1e-12)
    assert grads[0][3].abs().sum() > 0


def test_concept_loss_matches_dense_cross_entropy():
    torch.manual_seed(4)
    z = torch.randn(3, 5, CONCEPTS, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, CONCEPTS, (3, 5, K_LABELS))
    fast = concept_loss(z, labels)
    (grad_fast,) = torch.autograd.grad(fast, z)
    dense = sum(F.cross_entropy(z.reshape(-1, CONCEPTS), labels[..., j].reshape(-1)) for j in range(K_LABELS)) / K_LABELS
    (grad_dense,) = torch.autograd.grad(dense, z)
    torch.testing.assert_close(fast, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_fast, grad_dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("uses", [("loss",), ("top_values",), ("loss", "top_values")])
def test_fused_concept_loss_and_topk_match_autograd_composition(uses, monkeypatch):
    monkeypatch.setattr(modeling, "CHUNK_ELEMENTS", 2 * CONCEPTS + 5)  # several row chunks, one ragged
    torch.manual_seed(5)
    z = torch.randn(3, 5, CONCEPTS, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, CONCEPTS, (3, 5, K_LABELS))
    labels[0, 0] = 7  # repeated labels count once each
    weights = torch.randn(3, 5, K_MIX, dtype=torch.float64)

    def objective(loss, top_values):
        terms = {"loss": 1.7 * loss, "top_values": (weights * top_values).sum()}
        return sum(terms[name] for name in uses)

    loss, top_values, top_indices = concept_loss_and_topk(z, labels, K_MIX)
    (grad_fused,) = torch.autograd.grad(objective(loss, top_values), z)
    plain_values, plain_indices = torch.topk(z, K_MIX, dim=-1)
    plain_loss = (torch.logsumexp(z, -1) - z.gather(-1, labels).mean(-1)).mean()
    (grad_plain,) = torch.autograd.grad(objective(plain_loss, plain_values), z)
    assert torch.equal(top_indices, plain_indices) and torch.equal(top_values, plain_values)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_fused, grad_plain, rtol=1e-12, atol=1e-12)


def test_concept_loss_under_steering_scores_the_unsteered_predictions():
    model = tiny_model()
    ids, concept_labels = random_batch()
    with torch.no_grad():
        plain = model(ids, concept_labels=concept_labels)
        with model.steer_concepts({3: 50.0}):
            steered = model(ids, concept_labels=concept_labels)
    torch.testing.assert_close(steered.concept_loss, plain.concept_loss)
    torch.testing.assert_close(steered.concept_loss, concept_loss(plain.concept_logits, concept_labels))
    assert (steered.logits - plain.logits).abs().max() > 1e-3


def test_concept_loss_is_float32_under_bf16():
    z = torch.randn(2, 3, CONCEPTS).bfloat16()
    labels = torch.randint(0, CONCEPTS, (2, 3, K_LABELS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = concept_loss(z, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, concept_loss(z.float(), labels))


def test_sdpa_and_eager_give_same_logits():
    ids, _ = random_batch()
    model = tiny_model()
    assert model.config._attn_implementation == "sdpa"
    eager = tiny_model()
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_runs_and_stays_close():
    model = tiny_model()
    ids, concept_labels = random_batch()
    with torch.no_grad():
        exact = model(ids, labels=ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids, labels=ids, concept_labels=concept_labels)
    assert low.loss.dtype == torch.float32 and low.concept_loss.dtype == torch.float32
    assert abs(low.loss.item() - exact.loss.item()) < 0.05
    assert (low.logits.float() - exact.logits).abs().max() < 0.1


def test_steering_forces_concept_into_topk_and_changes_logits():
    model = tiny_model()
    ids, _ = random_batch(B=1, T=6)
    trunk = model.transformer
    with torch.no_grad():
        z = model(ids).concept_logits
        never_selected = int(torch.topk(z, K_MIX, dim=-1).indices.flatten().bincount(minlength=CONCEPTS).argmin())
        plain = model(ids).logits
        with model.steer_concepts({never_selected: 100.0}):
            steered_support = torch.topk(trunk._apply_steering(z), K_MIX, dim=-1).indices  # what forward selects
            steered_out = model(ids)
            steered_text = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert trunk.concept_steering == {}
        restored = model(ids).logits
    assert (torch.topk(z, K_MIX, dim=-1).indices == never_selected).sum() == 0
    assert steered_support.eq(never_selected).any(-1).all()  # in z_k at every token
    assert (steered_out.logits - plain).abs().max() > 1e-3
    torch.testing.assert_close(steered_out.concept_logits, z)  # predictions themselves are not altered
    torch.testing.assert_close(restored, plain)
    assert steered_text.shape == (1, 10)
    with pytest.raises(ValueError, match="outside"):
        model.set_concept_steering({CONCEPTS: 1.0})
