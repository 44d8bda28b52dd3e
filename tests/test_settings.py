"""Settings: presets, files, overrides, validation messages, flat params and digests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from settings import (
    SettingsError,
    dump_yaml,
    flat_params,
    load_settings,
    preset_names,
    settings_digest,
    training_branches,
)
from settings.loader import MLFLOW_PARAM_LIMIT

PAPER_PRESETS = {
    # name: (cocomix width, ntp width, depth, heads, lr, min lr, warmup, steps, batch, insert layer)
    "gpt2_69m": (512, 624, 8, 8, 6e-4, 6e-5, 130, 40_000, 512, 3),
    "gpt2_386m": (1024, 1072, 24, 16, 3e-4, 3e-5, 130, 40_000, 512, 5),
    "gpt2_1b": (2048, 2096, 24, 16, 2e-4, 2e-5, 65, 20_000, 1024, 5),
}


def test_every_shipped_preset_loads():
    assert {"cpu", "smoke", *PAPER_PRESETS} <= set(preset_names())
    for name in preset_names():
        assert load_settings(name).preset == name


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
def test_paper_presets_match_spec_table(name):
    cocomix_w, ntp_w, depth, heads, lr, min_lr, warmup, steps, batch, insert = PAPER_PRESETS[name]
    s = load_settings(name)
    assert (s.arms["cocomix"].model.width, s.arms["ntp"].model.width) == (cocomix_w, ntp_w)
    for arm in s.arms.values():
        assert (arm.model.depth, arm.model.heads) == (depth, heads)
    assert (s.train.lr, s.train.min_lr, s.train.warmup_steps, s.train.steps, s.train.batch_size) == (
        lr, min_lr, warmup, steps, batch,
    )
    assert s.arms["cocomix"].insert_layer_index == insert
    assert s.data.block_size == 1024 and s.sae.layer_index == 5
    assert (s.sae.num_latents, s.sae.k, s.concepts.labels_per_token) == (32768, 32, 4)
    assert (s.arms["cocomix"].concept_num, s.arms["cocomix"].lam_concept) == (32, 0.1)
    assert s.train.betas == (0.9, 0.95) and s.train.adam_eps == 1e-8
    assert (s.train.weight_decay, s.train.grad_clip) == (0.1, 1.0)
    # 20B training tokens: steps × batch × block.
    assert s.train.steps * s.train.batch_size * s.data.block_size == pytest.approx(20e9, rel=0.1)


def test_dotted_overrides_are_typed_and_applied():
    s = load_settings("cpu", ["train.lr=3e-4", "arms.cocomix.lam_concept=0.05", "eval.tasks=[cocomix_choice]"])
    assert s.train.lr == pytest.approx(3e-4) and isinstance(s.train.lr, float)
    assert s.arms["cocomix"].lam_concept == 0.05
    assert s.eval.tasks == ["cocomix_choice"]


def test_yaml_file_with_extends(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: smoke\ntrain: {steps: 8, eval_every: 4, checkpoint_every: 4}\n")
    s = load_settings(str(path))
    assert s.train.steps == 8
    assert s.data.block_size == load_settings("smoke").data.block_size
    assert s.preset == "mine"


def test_unknown_key_is_an_error_naming_the_path():
    with pytest.raises(SettingsError, match=r"train\.lrr: unknown setting"):
        load_settings("cpu", ["train.lrr=1e-3"])
    with pytest.raises(SettingsError, match=r"arms\.cocomix\.model\.widht"):
        load_settings("cpu", ["arms.cocomix.model.widht=64"])


def test_bad_value_names_field_and_value():
    with pytest.raises(SettingsError) as error:
        load_settings("cpu", ["train.lr=fast"])
    assert "train.lr" in str(error.value) and "'fast'" in str(error.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("arms.cocomix.model.heads=3", r"heads=3 must divide width=128"),
        ("arms.cocomix.insert_layer_index=4", r"insert_layer_index=4 must be < depth=4"),
        ("arms.cocomix.concept_num=4096", r"concept_num=4096 exceeds sae.num_latents=2048"),
        ("sae.k=4096", r"k=4096 exceeds num_latents=2048"),
        ("concepts.labels_per_token=33", r"labels_per_token=33 exceeds sae.k=32"),
        ("train.eval_every=500", r"eval_every=500 exceeds steps=64"),
        ("train.checkpoint_every=0", r"train.checkpoint_every"),
        ("train.grad_accum_steps=3", r"grad_accum_steps=3 does not divide batch_size=4"),
        ("train.min_lr=1.0", r"min_lr=1.0 is larger than lr"),
        ("data.source=files", r"data.path is required"),
    ],
)
def test_cross_field_checks(override, message):
    with pytest.raises(SettingsError, match=message):
        load_settings("cpu", [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("sae.layer_index=2", r"sae.layer_index=2 must be < teacher.model.depth=2"),
        ("arms.ntp.model.vocab_size=50000", r"arms.ntp.model.vocab_size=50000 is smaller than the GPT-2 tokenizer's 50257"),
        ("tokenizer.name=teacher", r"tokenizer.name=teacher needs teacher.pretrained"),
    ],
)
def test_cross_field_checks_of_a_trained_gpt2_teacher(override, message):
    with pytest.raises(SettingsError, match=message):
        load_settings("smoke", [override])


def test_unknown_preset_lists_known_ones():
    with pytest.raises(SettingsError, match=r"unknown preset 'cpux'.*cpu.*smoke"):
        load_settings("cpux")


def test_malformed_override_and_missing_file(tmp_path: Path):
    with pytest.raises(SettingsError, match="dotted.key=value"):
        load_settings("cpu", ["train.lr"])
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(str(tmp_path / "absent.yaml"))
    with pytest.raises(SettingsError, match=r"train.lr is a value"):
        load_settings("cpu", ["train.lr.x=1"])


@pytest.mark.parametrize(
    "text, key, line, first",
    [
        # Two `ntp:` arms: plain YAML kept the second (a CoCoMix arm) and silently dropped the baseline.
        ("extends: smoke\narms:\n  ntp:\n    kind: ntp\n  ntp:\n    kind: cocomix\n", "ntp", 5, 3),
        ("extends: smoke\ntrain:\n  lr: 0.001\n  steps: 12\n  lr: 0.1\n", "lr", 5, 3),
        ("extends: smoke\ntrain: {lr: 0.001, lr: 0.1}\n", "lr", 2, 2),
        ("extends: smoke\nextends: cpu\n", "extends", 2, 1),
    ],
)
def test_duplicate_yaml_key_is_an_error_naming_key_and_lines(tmp_path: Path, text, key, line, first):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=rf"duplicate key '{key}' on line {line} \(first given on line {first}\)") as info:
        load_settings(str(path))
    assert str(path) in str(info.value)


def test_same_key_in_sibling_sections_is_fine(tmp_path: Path):
    path = tmp_path / "ok.yaml"
    path.write_text("extends: smoke\ntrain:\n  lr: 0.002\nsae:\n  lr: 0.003\n")
    settings = load_settings(str(path))
    assert (settings.train.lr, settings.sae.lr) == (0.002, 0.003)


def test_settings_file_that_is_not_utf8_is_named(tmp_path: Path):
    path = tmp_path / "utf16.yaml"
    path.write_bytes("extends: smoke\n".encode("utf-16"))
    with pytest.raises(SettingsError, match=rf"{path}: not UTF-8 text"):
        load_settings(str(path))


def test_flat_params_are_dotted_and_bounded():
    s = load_settings("cpu", ["data.path=" + "x" * 10_000, "data.source=files"])
    params = flat_params(s)
    assert params["train.lr"] == str(s.train.lr)
    assert params["arms.cocomix.model.width"] == "128"
    assert params["data.source"] == "files"
    assert all(len(value) <= MLFLOW_PARAM_LIMIT for value in params.values())
    assert params["data.path"].endswith("...")


def test_digest_is_stable_and_sensitive():
    a, b = load_settings("cpu"), load_settings("cpu")
    assert settings_digest(a) == settings_digest(b)
    assert settings_digest(a) != settings_digest(load_settings("cpu", ["train.lr=1e-3"]))
    # Where results are logged does not change what is computed.
    assert settings_digest(a) == settings_digest(load_settings("cpu", ["tracking.experiment_name=other"]))


def test_dumped_yaml_loads_back_to_the_same_settings(tmp_path: Path):
    s = load_settings("smoke", ["train.lr=1e-3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(s))
    assert settings_digest(load_settings(str(path))) == settings_digest(s)
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 1e-3


def test_training_branches_expand_seeds_and_lambdas():
    s = load_settings("cpu")
    assert [(b.name, b.kind) for b in training_branches(s)] == [("ntp", "ntp"), ("cocomix", "cocomix")]
    swept = load_settings("cpu", ["sweep.seeds=[1,2]", "sweep.lam_concept=[0.05,0.2]"])
    names = [b.name for b in training_branches(swept)]
    assert names == ["ntp-s1", "ntp-s2", "cocomix-s1-lam0.05", "cocomix-s1-lam0.2", "cocomix-s2-lam0.05",
                     "cocomix-s2-lam0.2"]
    lams = {b.lam_concept for b in training_branches(swept) if b.kind == "cocomix"}
    assert lams == {0.05, 0.2}
    assert {b.lam_concept for b in training_branches(swept) if b.kind == "ntp"} == {0.1}


@pytest.mark.parametrize(
    ("override", "message"),
    [("sweep.seeds=[0,0]", r"sweep.seeds=\[0, 0\] repeats a seed"),
     ("sweep.lam_concept=[0.1,0.1000001]", r"sweep.lam_concept=\[0.1, 0.1000001\] has values that name the same branch")],
)
def test_sweep_values_that_would_name_two_branches_alike_are_refused(override, message):
    with pytest.raises(SettingsError, match=message):
        load_settings("cpu", [override])
