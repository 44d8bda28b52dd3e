"""Settings -> models and jobs: shapes, seeding, concept fields, job digests."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from cocomix_core.model.build import build_model, job_for_branch, teacher_job
from cocomix_core.model.modeling_cocomix import CoCoMixForCausalLM
from settings import ModelShape, load_settings, settings_digest, training_branches

SHAPE = ModelShape(width=32, depth=2, heads=2)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_ntp_model_has_the_shape_no_dropout_and_a_seeded_init():
    state_before = torch.get_rng_state()
    model = build_model("ntp", SHAPE, block_size=48, seed=3)
    assert torch.equal(torch.get_rng_state(), state_before)  # the global RNG is left alone
    assert isinstance(model, GPT2LMHeadModel)
    config = model.config
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions, config.vocab_size) == (32, 2, 2, 48, 50257)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.0
    assert same_weights(model, build_model("ntp", SHAPE, block_size=48, seed=3))
    assert not same_weights(model, build_model("ntp", SHAPE, block_size=48, seed=4))


def test_cocomix_model_carries_the_concept_fields():
    model = build_model("cocomix", SHAPE, 32, concept_dim=64, concept_num=4, insert_layer_index=1, seed=0)
    assert isinstance(model, CoCoMixForCausalLM)
    assert (model.config.concept_dim, model.config.concept_num, model.config.insert_layer_index) == (64, 4, 1)
    assert model.transformer.concept_predictor.out_features == 64
    with pytest.raises(ValueError, match="concept_dim, concept_num"):
        build_model("cocomix", SHAPE, 32, insert_layer_index=1, seed=0)


def test_jobs_resolve_every_field_from_the_settings():
    settings = load_settings("smoke", ["sweep.seeds=[0,1]"])
    jobs = {b.name: job_for_branch(settings, b) for b in training_branches(settings)}
    cocomix = jobs["cocomix-s1"]
    gpt2_sized = settings.arms["cocomix"].model.model_copy(update={"vocab_size": 50257})  # GPT-2 tokenizer's size
    assert (cocomix.kind, cocomix.seed, cocomix.shape) == ("cocomix", 1, gpt2_sized)
    assert (cocomix.concept_dim, cocomix.concept_num, cocomix.insert_layer_index, cocomix.labels_per_token) == (256, 8, 1, 4)
    assert cocomix.lam_concept == 0.1 and cocomix.block_size == 32 and cocomix.settings_digest == settings_digest(settings)
    ntp = jobs["ntp-s0"]
    assert ntp.concept_dim is None and ntp.lam_concept == 0.0
    assert isinstance(ntp.build_model(), GPT2LMHeadModel)
    teacher = teacher_job(settings)
    teacher_shape = settings.teacher.model.model_copy(update={"vocab_size": 50257})
    assert (teacher.name, teacher.kind, teacher.shape, teacher.train) == ("teacher", "ntp", teacher_shape, settings.teacher.train)


def test_job_digest_ignores_threads_and_names_but_not_the_recipe():
    def ntp_job(*overrides):
        settings = load_settings("smoke", list(overrides))
        return job_for_branch(settings, training_branches(settings)[0])

    base = ntp_job().digest()
    assert ntp_job("train.cpu_threads=1", "train.log_every=2", "eval.limit=3").digest() == base
    assert ntp_job("train.lr=1e-3").digest() != base
    assert ntp_job("data.window_seed=5").digest() != base


def test_teacher_job_needs_teacher_train_settings():
    settings = load_settings("smoke", ["teacher.pretrained=openai-community/gpt2", "teacher.train=null"])
    with pytest.raises(ValueError, match="nothing to train"):
        teacher_job(settings)


def test_jobs_of_another_tokenizer_take_its_vocabulary_size(tmp_path):
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    settings = load_settings("smoke", [f"tokenizer.name={tokenizer_dir}"])
    branch = training_branches(settings)[0]
    with pytest.raises(ValueError, match="pass the tokenizer's vocab_size"):
        job_for_branch(settings, branch)
    assert job_for_branch(settings, branch, vocab_size=49152).build_model().config.vocab_size == 49152
