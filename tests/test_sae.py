"""TopK SAE: SPEC §2 math against a naive float64 reference, OpenAI-format I/O, and training."""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cocomix_core.concepts.sae import TopKSAE, load_sae, openai_sae_url, save_sae
from cocomix_core.concepts.sae_fit import train_sae
from cocomix_core.data.windows import TrainWindows


def random_sae(num_latents=96, width=24, k=6, seed=0, dtype=torch.float64) -> TopKSAE:
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(num_latents, width, k).to(dtype)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=dtype) * 0.3)
    return sae


def naive_sae(x, pre_bias, w_enc, latent_bias, w_dec, k):
    """SPEC §2 spelled out per token in float64."""
    n, d = x.shape
    mu = x.sum(1, keepdim=True) / d
    sigma = (((x - mu) ** 2).sum(1, keepdim=True) / (d - 1)).sqrt()
    x_hat = (x - mu) / (sigma + 1e-5)
    pre = (x_hat - pre_bias) @ w_enc.T + latent_bias
    latents = torch.zeros_like(pre)
    for row in range(n):
        order = sorted(range(pre.shape[1]), key=lambda c: -float(pre[row, c]))[:k]
        for c in order:
            latents[row, c] = max(float(pre[row, c]), 0.0)
    recon = (latents @ w_dec.T + pre_bias) * sigma + mu
    return latents, recon, mu, sigma


def test_sae_matches_naive_reference():
    sae = random_sae()
    x = torch.randn(2, 7, 24, dtype=torch.float64) * 3 + 1
    latents, recon = sae(x)
    ref_latents, ref_recon, mu, sigma = naive_sae(
        x.reshape(-1, 24), *(t.detach() for t in (sae.pre_bias, sae.encoder.weight, sae.latent_bias, sae.decoder.weight)), sae.k
    )
    torch.testing.assert_close(latents.reshape(-1, 96), ref_latents, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(recon.reshape(-1, 24), ref_recon, rtol=1e-10, atol=1e-10)
    enc, info = sae.encode(x)
    torch.testing.assert_close(info["mu"].reshape(-1, 1), mu)
    torch.testing.assert_close(info["std"].reshape(-1, 1), sigma)
    torch.testing.assert_close(sae.decode(enc, info), recon)
    assert int((latents != 0).sum(-1).max()) <= sae.k
    # the sparse decode reads only the active columns and agrees with the dense one
    values, indices, _ = sae.encode_sparse(x)
    torch.testing.assert_close(sae.decode_sparse_normalized(values, indices), sae.decode_normalized(latents))


def test_relu_after_topk_can_zero_selected_latents():
    sae = random_sae()
    with torch.no_grad():
        sae.latent_bias.fill_(-100.0)  # every pre-activation negative: TopK keeps k, ReLU zeroes them
    latents, recon = sae(torch.randn(3, 24, dtype=torch.float64))
    assert torch.count_nonzero(latents) == 0
    assert torch.isfinite(recon).all()


def test_k_larger_than_dictionary_is_an_error():
    with pytest.raises(ValueError, match="dictionary size 8"):
        TopKSAE(8, 4, k=9)


def test_openai_format_round_trip():
    sae = random_sae(dtype=torch.float32)
    sd = sae.state_dict()
    assert sd["activation"] == "TopK"
    assert sd["activation_state_dict"] == {"k": 6, "postact_fn": "ReLU"}
    assert {"stats_last_nonzero", "latents_activation_frequency", "latents_mean_square"} <= set(sd)
    assert sd["stats_last_nonzero"].dtype == torch.long
    again = TopKSAE.from_state_dict(sd)
    assert again.k == 6 and again.normalize
    for key, value in sae.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(again.state_dict()[key], value), key
    # OpenAI's own dicts may say normalize explicitly; plain load_state_dict takes the full dict too
    with_normalize = dict(sd, normalize=True)
    third = TopKSAE(96, 24, 6)
    third.load_state_dict(with_normalize)
    assert torch.equal(third.encoder.weight, sae.encoder.weight)
    with pytest.raises(ValueError, match="k=5"):
        TopKSAE(96, 24, 5).load_state_dict(sd)
    # tensor-only dicts need k from the caller
    tensors_only = {key: value for key, value in sd.items() if isinstance(value, torch.Tensor)}
    with pytest.raises(ValueError, match="pass k"):
        TopKSAE.from_state_dict(tensors_only)
    assert TopKSAE.from_state_dict(tensors_only, k=6).k == 6


def test_nested_state_dict_stays_tensor_only():
    parent = torch.nn.Module()
    parent.sae = random_sae(dtype=torch.float32)
    sd = parent.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in sd.values())
    parent.load_state_dict(sd)


def test_from_state_dict_reports_missing_and_unexpected_keys():
    sd = random_sae(dtype=torch.float32).state_dict()
    del sd["latent_bias"]
    sd["encoder.bias"] = torch.zeros(96)
    with pytest.raises(ValueError) as error:
        TopKSAE.from_state_dict(sd)
    assert "latent_bias" in str(error.value) and "encoder.bias" in str(error.value)
    bad = random_sae(dtype=torch.float32).state_dict()
    bad["decoder.weight"] = torch.zeros(24, 95)
    with pytest.raises(ValueError, match="decoder.weight"):
        TopKSAE.from_state_dict(bad)
    relu = random_sae(dtype=torch.float32).state_dict()
    relu["activation"] = "ReLU"
    with pytest.raises(ValueError, match="TopK"):
        TopKSAE.from_state_dict(relu)


def test_safetensors_and_pt_round_trip(tmp_path):
    sae = random_sae(dtype=torch.float32)
    path = save_sae(sae, tmp_path / "sae.safetensors")
    loaded = load_sae(path)
    assert loaded.k == sae.k and loaded.normalize == sae.normalize
    x = torch.randn(5, 24)
    torch.testing.assert_close(loaded(x)[1], sae(x)[1], rtol=0, atol=0)
    assert not list(tmp_path.glob("*.partial*"))
    torch.save(sae.state_dict(), tmp_path / "sae.pt")
    torch.testing.assert_close(load_sae(tmp_path / "sae.pt")(x)[1], sae(x)[1], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "missing.pt")


def test_openai_url_and_http_loading(tmp_path):
    assert openai_sae_url() == (
        "https://openaipublic.blob.core.windows.net/sparse-autoencoder/gpt2-small/"
        "resid_post_mlp_v5_32k/autoencoders/5.pt"
    )
    with pytest.raises(ValueError):
        openai_sae_url(layer_index=12)
    serve = tmp_path / "serve" / "resid_post_mlp_v5_32k" / "autoencoders"
    serve.mkdir(parents=True)
    sae = random_sae(dtype=torch.float32)
    torch.save(sae.state_dict(), serve / "5.pt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "serve"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/resid_post_mlp_v5_32k/autoencoders/5.pt"
        loaded = load_sae(url, cache_dir=tmp_path / "cache")
        cached = list((tmp_path / "cache").rglob("5.pt"))
        assert len(cached) == 1
        x = torch.randn(4, 24)
        torch.testing.assert_close(loaded(x)[1], sae(x)[1], rtol=0, atol=0)
        with pytest.raises(OSError, match="could not download"):
            load_sae(url.replace("5.pt", "6.pt"), cache_dir=tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()
    # the cached copy serves later loads without the network
    assert load_sae(url, cache_dir=tmp_path / "cache").k == sae.k


@pytest.fixture(scope="module")
def tiny_teacher_and_windows():
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                         bos_token_id=0, eos_token_id=0))
    tokens = np.random.default_rng(0).integers(0, 128, 60_000).astype(np.uint16)
    return teacher, TrainWindows(tokens, 32, seed=1)


def test_training_reduces_fvu_and_keeps_unit_decoder(tiny_teacher_and_windows):
    teacher, windows = tiny_teacher_and_windows
    logs = []
    sae, metrics = train_sae(teacher, windows, layer_index=0, num_latents=512, k=8, steps=80, batch_tokens=256,
                             lr=4e-3, aux_k=32, dead_steps_threshold=3, teacher_batch_size=16, log_fn=logs.append,
                             log_every=10, seed=0)
    first_nmse = logs[0]["sae_nmse"]
    assert metrics["fvu"] < 0.35, metrics
    assert metrics["fvu"] < 0.5 * first_nmse
    assert 0.0 <= metrics["dead_fraction"] <= 1.0 and 0.0 <= metrics["eval_unused_fraction"] <= 1.0
    assert 0 < metrics["mean_l0"] <= 8
    assert any(record["sae_auxk"] > 0 for record in logs), "AuxK loss never ran"
    norms = sae.decoder.weight.norm(dim=0)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
    assert all(p.grad is None for p in teacher.parameters())
    assert 0.0 <= float(sae.latents_activation_frequency.max()) <= 1.0


def test_training_is_deterministic(tiny_teacher_and_windows):
    teacher, windows = tiny_teacher_and_windows
    kwargs = dict(layer_index=1, num_latents=256, k=8, steps=12, batch_tokens=128, dead_steps_threshold=2, seed=3)
    first, m1 = train_sae(teacher, windows, **kwargs)
    second, m2 = train_sae(teacher, windows, **kwargs)
    for key, value in first.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second.state_dict()[key]), key
    assert m1["fvu"] == m2["fvu"]
    other, _ = train_sae(teacher, windows, **dict(kwargs, seed=4))
    assert not torch.equal(other.decoder.weight, first.decoder.weight)


def test_training_from_plain_iterable_and_last_layer(tiny_teacher_and_windows):
    teacher, windows = tiny_teacher_and_windows
    batches = [windows.batch(i * 4, 4) for i in range(20)]
    sae, metrics = train_sae(teacher, iter(batches), layer_index=1, num_latents=128, k=4, steps=5,
                             batch_tokens=64, teacher_batch_size=4)
    assert sae.width == 64 and np.isfinite(metrics["fvu"])
    with pytest.raises(ValueError, match="k=300"):
        train_sae(teacher, windows, layer_index=0, num_latents=256, k=300, steps=1)


def test_captured_activations_are_reused_every_epoch(tiny_teacher_and_windows):
    """activation_tokens: the teacher runs only to fill the pool; training still converges on it."""
    teacher, windows = tiny_teacher_and_windows
    calls = []
    handle = teacher.transformer.h[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        # pool of 2048 tokens = 4 teacher calls of 16 windows x 32; 60 steps x 256 tokens = 7.5 epochs over it
        sae, metrics = train_sae(teacher, windows, layer_index=0, num_latents=256, k=8, steps=60, batch_tokens=256,
                                 lr=4e-3, aux_k=32, dead_steps_threshold=3, teacher_batch_size=16,
                                 activation_tokens=2048, seed=0)
    finally:
        handle.remove()
    assert len(calls) == 1 + 4  # the held-out batch, then the pool; never again
    assert metrics["tokens_seen"] == 60 * 256 and metrics["fvu"] < 0.5, metrics
