"""Bad input, run the way a user meets it: every case fails early, names the culprit, shows no traceback.

Three kinds of cases: library CLIs as subprocesses (what a user sees on stderr), the same CLIs'
`main` in this process (the same code path, without an interpreter start each), and the
flow-level `preflight`, which the flow's start step runs before any work. Plus the two
guarantees that are not about one bad input: concurrent store creation and bounded waits on
addresses that never answer.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from conftest import free_port
from transformers import GPT2Config, GPT2LMHeadModel

from cocomix_core.concepts.sae import TopKSAE, download, save_sae
from cocomix_core.plumbing import preflight as pf
from cocomix_core.plumbing.files import sha256_file
from cocomix_core.training.checkpoints import (
    capture_rng_state,
    save_checkpoint,
    save_trainer_state,
)
from settings import SettingsError, load_settings

REPO = Path(__file__).resolve().parents[1]
TEACHER_WIDTH = 32  # the smoke preset's teacher width, and the tiny pretrained teacher's
SMOKE_LATENTS = 256  # the smoke preset's sae.num_latents
FAST_S = 1.0  # network probe timeout in these tests


# ----- shared inputs -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, smoke_data: Path) -> dict[str, Path]:
    """Good and bad files, made once: a tiny GPT-2 teacher, SAE files, a checkpoint, corpora."""
    root = tmp_path_factory.mktemp("bad_input")
    torch.manual_seed(0)
    paths: dict[str, Path] = {"data": smoke_data, "root": root}
    config = GPT2Config(n_embd=TEACHER_WIDTH, n_layer=2, n_head=2, n_positions=64, vocab_size=50257)
    model = GPT2LMHeadModel(config).eval()
    paths["teacher"] = root / "teacher"
    model.save_pretrained(paths["teacher"])

    paths["teacher_bad_config"] = _copy_tree(paths["teacher"], root / "teacher_bad_config")
    (paths["teacher_bad_config"] / "config.json").write_text('{"model_type": "gpt2", "n_embd": 32,')
    paths["teacher_truncated"] = _copy_tree(paths["teacher"], root / "teacher_truncated")
    _truncate(paths["teacher_truncated"] / "model.safetensors")

    paths["sae"] = save_sae(TopKSAE(SMOKE_LATENTS, TEACHER_WIDTH, k=8), root / "sae.safetensors")
    paths["sae_128"] = save_sae(TopKSAE(128, TEACHER_WIDTH, k=8), root / "sae_128.safetensors")
    paths["sae_narrow"] = save_sae(TopKSAE(SMOKE_LATENTS, 16, k=8), root / "sae_narrow.safetensors")
    paths["sae_truncated"] = root / "sae_truncated.safetensors"
    shutil.copy(paths["sae"], paths["sae_truncated"])
    _truncate(paths["sae_truncated"])
    paths["sae_corrupt"] = root / "sae_corrupt.pt"
    paths["sae_corrupt"].write_bytes(b"not a torch file " * 100)

    paths["checkpoint"] = save_checkpoint(model, root / "arm", {"step": 1, "tokens_seen": 64, "kind": "ntp"})
    paths["checkpoint_truncated"] = _copy_tree(paths["checkpoint"], root / "ckpt_truncated")
    _truncate(paths["checkpoint_truncated"] / "model.safetensors")
    paths["checkpoint_bad_config"] = _copy_tree(paths["checkpoint"], root / "ckpt_bad_config")
    (paths["checkpoint_bad_config"] / "config.json").write_text("{not json")
    paths["checkpoint_zeroed"] = _copy_tree(paths["checkpoint"], root / "ckpt_zeroed")
    _zero_tensors_in_place(paths["checkpoint_zeroed"] / "model.safetensors")
    paths["checkpoint_wrong_config"] = _copy_tree(paths["checkpoint"], root / "ckpt_wrong_config")
    _vouch_for_a_wider_config(paths["checkpoint_wrong_config"])
    paths["out_of_another_job"] = root / "out_of_another_job"
    save_trainer_state(paths["out_of_another_job"], {"model": {}, "optimizer": {}, "rng": capture_rng_state()},
                       {"step": 1, "job_digest": "0" * 64, "val_loss": 1.0})

    paths["data_corrupt"] = _copy_tree(smoke_data, root / "data_corrupt")
    _truncate(paths["data_corrupt"] / "train.bin")

    paths["utf16"] = root / "utf16" / "speech.txt"
    paths["utf16"].parent.mkdir()
    paths["utf16"].write_text("We the people of the United States. " * 50, encoding="utf-16")
    paths["utf16_nobom"] = root / "utf16_nobom" / "speech.txt"
    paths["utf16_nobom"].parent.mkdir()
    paths["utf16_nobom"].write_bytes(("We the people. " * 50).encode("utf-16-le"))
    paths["broken_jsonl"] = root / "broken.jsonl"
    paths["broken_jsonl"].write_text('{"text": "fine"}\n{"text": broken\n')
    paths["dup_yaml"] = root / "dup.yaml"
    paths["dup_yaml"].write_text("extends: smoke\narms:\n  ntp:\n    kind: ntp\n  ntp:\n    kind: cocomix\n")
    paths["a_file"] = root / "a_file"
    paths["a_file"].write_text("a file, not a folder")
    paths["not_sqlite"] = root / "not_sqlite.db"
    paths["not_sqlite"].write_bytes(b"these bytes are no SQLite database " * 10)
    return paths


def _copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _zero_tensors_in_place(path: Path) -> None:
    """Overwrite every tensor byte of a safetensors file with zeros: same size, valid header, other weights."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        handle.seek(8 + header_len)
        handle.write(bytes(size - 8 - header_len))
    assert path.stat().st_size == size


def _vouch_for_a_wider_config(folder: Path) -> None:
    """A hand-made checkpoint: config.json widened (it no longer describes the weights), its digest recorded anew."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"n_embd": 2 * config["n_embd"]}))
    meta = json.loads((folder / "checkpoint.json").read_text())
    meta["files_sha256"]["config.json"] = sha256_file(folder / "config.json")
    (folder / "checkpoint.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def silent_url() -> Iterator[str]:
    """An address that accepts TCP connections (the kernel's backlog) and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.fixture(scope="module")
def refused_url() -> str:
    """An address whose port refuses connections: bound once, then closed."""
    return f"http://127.0.0.1:{free_port()}"


# ----- library CLIs as the user runs them ---------------------------------------------------------
SUBPROCESS_CASES = {
    # name: (argv after `python -m`, words the one-line message must hold)
    "train_missing_data": (
        lambda p: ["cocomix_core.training.trainer", "--settings", "smoke", "--arm", "ntp", "--data", str(p["root"] / "absent"),
                   "--out", str(p["root"] / "out_missing")],
        lambda p: [str(p["root"] / "absent"), "manifest.json"],
    ),
    "evaluate_truncated_weights": (
        lambda p: ["cocomix_core.evaluation.evaluator", str(p["checkpoint_truncated"]), "--data", str(p["data"]), "--settings", "smoke"],
        lambda p: [str(p["checkpoint_truncated"] / "model.safetensors"), "truncated"],
    ),
    "train_diverging_loss": (  # a finite but absurd learning rate: the loss stops being finite at the second step
        lambda p: ["cocomix_core.training.trainer", "--settings", "smoke", "--arm", "ntp", "--data", str(p["data"]),
                   "--out", str(p["root"] / "out_diverging"), "--set", "train.lr=1e30", "--threads", "1"],
        lambda p: ["non-finite", "optimizer step", "last good checkpoint"],
    ),
    "evaluate_weights_zeroed_in_place": (
        lambda p: ["cocomix_core.evaluation.evaluator", str(p["checkpoint_zeroed"]), "--data", str(p["data"]), "--settings", "smoke"],
        lambda p: [str(p["checkpoint_zeroed"] / "model.safetensors"), "sha256"],
    ),
    "data_utf16_corpus": (
        lambda p: ["cocomix_core.data", "--settings", "smoke", "--set", "data.source=files",
                   "--set", f"data.path={p['utf16'].parent}", "--out", str(p["root"] / "out_utf16")],
        lambda p: [str(p["utf16"]), "UTF-16"],
    ),
}


@pytest.fixture(scope="module")
def cli_runs(inputs: dict[str, Path]) -> dict[str, subprocess.CompletedProcess]:
    """Every subprocess case, started together (each pays an interpreter and torch import)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = {
        name: subprocess.Popen([sys.executable, "-m", *argv(inputs)], cwd=inputs["root"], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, (argv, _) in SUBPROCESS_CASES.items()
    }
    results = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=240)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_cli_subprocess_fails_with_one_line_naming_the_culprit(case, inputs, cli_runs):
    run = cli_runs[case]
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    message = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == 1, run.stderr
    for word in SUBPROCESS_CASES[case][1](inputs):
        assert word in message[0]


def _exit_message(main: Callable[[list[str]], None], argv: list[str]) -> str:
    """Run a CLI's main in this process; it must exit non-zero with a message (an exception is a bug)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    return str(exit_info.value.code)


def _train_argv(p: dict[str, Path], *extra: str, arm: str = "cocomix", data: str = "data") -> list[str]:
    return ["--settings", "smoke", "--arm", arm, "--data", str(p[data]), "--out", str(p["root"] / f"out_{arm}"), *extra]


TRAIN_CASES = {
    # name: (argv, words the message must hold)
    "corrupted_data_folder": (lambda p: _train_argv(p, arm="ntp", data="data_corrupt"),
                              lambda p: [str(p["data_corrupt"] / "train.bin"), "manifest"]),
    "missing_teacher_folder": (lambda p: _train_argv(p, "--teacher", str(p["root"] / "no_teacher"), "--sae", str(p["sae"])),
                               lambda p: [str(p["root"] / "no_teacher"), "--teacher"]),
    "teacher_invalid_config": (lambda p: _train_argv(p, "--teacher", str(p["teacher_bad_config"]), "--sae", str(p["sae"])),
                               lambda p: [str(p["teacher_bad_config"] / "config.json"), "not valid JSON"]),
    "teacher_truncated_weights": (lambda p: _train_argv(p, "--teacher", str(p["teacher_truncated"]), "--sae", str(p["sae"])),
                                  lambda p: [str(p["teacher_truncated"] / "model.safetensors"), "truncated"]),
    "sae_missing": (lambda p: _train_argv(p, "--teacher", str(p["teacher"]), "--sae", str(p["root"] / "no_sae.safetensors")),
                    lambda p: [str(p["root"] / "no_sae.safetensors"), "not found"]),
    "sae_truncated": (lambda p: _train_argv(p, "--teacher", str(p["teacher"]), "--sae", str(p["sae_truncated"])),
                      lambda p: [str(p["sae_truncated"]), "not a usable SAE file"]),
    "sae_corrupt": (lambda p: _train_argv(p, "--teacher", str(p["teacher"]), "--sae", str(p["sae_corrupt"])),
                    lambda p: [str(p["sae_corrupt"]), "not a usable SAE file"]),
    "sae_wrong_width": (lambda p: _train_argv(p, "--teacher", str(p["teacher"]), "--sae", str(p["sae_narrow"])),
                        lambda p: [str(p["sae_narrow"]), "width 16", "hidden size 32"]),
    # The silently-wrong case of the probe: a 128-latent SAE trained a head sized for 256.
    "sae_fewer_latents_than_settings": (lambda p: _train_argv(p, "--teacher", str(p["teacher"]), "--sae", str(p["sae_128"])),
                                        lambda p: ["128 latents", f"sae.num_latents={SMOKE_LATENTS}"]),
    "unwritable_out": (lambda p: ["--settings", "smoke", "--arm", "ntp", "--data", str(p["data"]),
                                  "--out", str(p["a_file"] / "run")],
                       lambda p: ["--out", str(p["a_file"] / "run"), "not a writable folder"]),
    "infinite_lr": (lambda p: ["--settings", "smoke", "--arm", "ntp", "--data", str(p["data"]), "--out",
                               str(p["root"] / "out_inf"), "--set", "train.lr=.inf"],
                    lambda p: ["train.lr", "finite"]),
    "out_written_by_another_job": (lambda p: ["--settings", "smoke", "--arm", "ntp", "--data", str(p["data"]),
                                              "--out", str(p["out_of_another_job"]), "--threads", "1"],
                                   lambda p: [str(p["out_of_another_job"]), "different job"]),
    "duplicate_yaml_key": (lambda p: ["--settings", str(p["dup_yaml"]), "--arm", "ntp", "--data", str(p["data"]),
                                      "--out", str(p["root"] / "out_dup")],
                           lambda p: [str(p["dup_yaml"]), "duplicate key 'ntp' on line 5"]),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_cli_names_the_bad_input(case, inputs):
    from cocomix_core.training.trainer import main

    argv, words = TRAIN_CASES[case]
    message = _exit_message(main, argv(inputs))
    for word in words(inputs):
        assert word in message


def test_train_cli_unknown_mlflow_run_id(inputs, tmp_path):
    from cocomix_core.training.trainer import main

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    message = _exit_message(main, _train_argv(inputs, "--mlflow-run-id", "0123456789abcdef", arm="ntp")
                            + ["--set", f"tracking.mlflow_uri={uri}"])
    assert "0123456789abcdef" in message and uri in message


def test_train_cli_silent_tracking_server_fails_within_seconds(inputs, silent_url, monkeypatch):
    from cocomix_core.plumbing import tracking
    from cocomix_core.training.trainer import main

    monkeypatch.setattr(tracking, "PROBE_TIMEOUT_S", FAST_S)
    started = time.monotonic()
    message = _exit_message(main, _train_argv(inputs, "--mlflow-run-id", "abc", arm="ntp")
                            + ["--set", f"tracking.mlflow_uri={silent_url}"])
    assert time.monotonic() - started < 10 * FAST_S
    assert silent_url in message and "did not answer" in message


EVALUATE_CASES = {
    "invalid_config_json": (lambda p: [str(p["checkpoint_bad_config"])],
                            lambda p: [str(p["checkpoint_bad_config"] / "config.json"), "not valid JSON"]),
    "unknown_task": (lambda p: [str(p["checkpoint"]), "--set", "eval.tasks=[cocomix_choice, no_such_task]"],
                     lambda p: ["no_such_task", "unknown task"]),
    "missing_checkpoint": (lambda p: [str(p["root"] / "no_checkpoint")], lambda p: [str(p["root"] / "no_checkpoint")]),
    "config_not_matching_weights": (lambda p: [str(p["checkpoint_wrong_config"])],
                                    lambda p: [str(p["checkpoint_wrong_config"]), "cannot load the model"]),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_evaluate_cli_names_the_bad_input(case, inputs):
    from cocomix_core.evaluation.evaluator import main

    argv, words = EVALUATE_CASES[case]
    message = _exit_message(main, [*argv(inputs), "--data", str(inputs["data"]), "--settings", "smoke"])
    for word in words(inputs):
        assert word in message


DATA_CASES = {
    "utf16_without_bom": (lambda p: ["--set", "data.source=files", "--set", f"data.path={p['utf16_nobom']}"],
                          lambda p: [str(p["utf16_nobom"]), "NUL byte"]),
    "broken_local_jsonl_as_hf_dataset": (
        lambda p: ["--set", "data.source=huggingface", "--set", f"data.hf_dataset={p['broken_jsonl']}"],
        lambda p: [str(p["broken_jsonl"]), "data.hf_dataset"],
    ),
    "missing_corpus": (lambda p: ["--set", "data.source=files", "--set", f"data.path={p['root'] / 'no_corpus'}"],
                       lambda p: [str(p["root"] / "no_corpus"), "does not exist"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_data_cli_names_the_bad_input(case, inputs, tmp_path):
    from cocomix_core.data.__main__ import main

    argv, words = DATA_CASES[case]
    message = _exit_message(main, ["--settings", "smoke", *argv(inputs), "--out", str(tmp_path / "out")])
    for word in words(inputs):
        assert word in message
    assert not (tmp_path / "out" / "manifest.json").exists()  # nothing half-written that looks valid


# ----- settings refused before any work, naming the field --------------------------------------
@pytest.mark.parametrize(("override", "field", "words"), [
    ("sweep.seeds=[]", "sweep.seeds", "at least 1 item"),
    ("sweep.lam_concept=[]", "sweep.lam_concept", "at least 1 item"),
    ("train.lr=.inf", "train.lr", "finite number"),
    ("train.lr=.nan", "train.lr", "finite number"),
    ("train.lr=0", "train.lr", "greater than 0"),
    ("sae.lr=-1e-3", "sae.lr", "greater than 0"),
    ("arms.cocomix.lam_concept=.inf", "arms.cocomix.lam_concept", "finite number"),
    ("train.betas=[.nan, 0.95]", "train.betas.0", "finite number"),
])
def test_settings_refuse_empty_sweeps_and_non_finite_or_non_positive_rates(override, field, words):
    with pytest.raises(SettingsError) as info:
        load_settings("smoke", [override])
    assert f"{field}: " in str(info.value) and words in str(info.value)


# ----- preflight: the flow-level cases -----------------------------------------------------------
@pytest.fixture()
def good(inputs: dict[str, Path], tmp_path: Path) -> dict[str, str]:
    """Arguments under which the smoke settings pass preflight."""
    return {"storage_root": str(tmp_path / "storage"), "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}"}


def test_preflight_passes_good_settings_local_and_pretrained(inputs, good):
    assert pf.preflight(load_settings("smoke"), **good, timeout_s=FAST_S) == []
    pretrained = load_settings("smoke", [f"teacher.pretrained={inputs['teacher']}", f"sae.pretrained={inputs['sae']}"])
    assert pf.preflight(pretrained, **good, timeout_s=FAST_S) == []
    assert not list(Path(good["storage_root"]).iterdir())  # the probe object is gone


NONE = lambda p, u: {}  # noqa: E731  (no preflight argument replaced)
PREFLIGHT_CASES = {
    # name: (overrides, replaced preflight arguments, environment, (setting, words of the message))
    "data_path_missing": (lambda p, u: ["data.source=files", f"data.path={p['root'] / 'nothing'}"], NONE, {},
                          lambda p, u: ("data.source=files", [str(p["root"] / "nothing"), "does not exist"])),
    "data_utf16": (lambda p, u: ["data.source=files", f"data.path={p['utf16'].parent}"], NONE, {},
                   lambda p, u: ("data.path", [str(p["utf16"]), "not UTF-8"])),
    "teacher_folder_missing": (lambda p, u: [f"teacher.pretrained={p['root'] / 'no_teacher'}"], NONE, {},
                               lambda p, u: ("teacher.pretrained", [str(p["root"] / "no_teacher"), "not a folder"])),
    "teacher_invalid_config": (lambda p, u: [f"teacher.pretrained={p['teacher_bad_config']}"], NONE, {},
                               lambda p, u: ("teacher.pretrained", [str(p["teacher_bad_config"] / "config.json")])),
    "teacher_truncated": (lambda p, u: [f"teacher.pretrained={p['teacher_truncated']}"], NONE, {},
                          lambda p, u: ("teacher.pretrained", [str(p["teacher_truncated"] / "model.safetensors"), "truncated"])),
    "teacher_hub_name_offline": (lambda p, u: ["teacher.pretrained=no-such-org/no-such-model"], NONE, {"HF_HUB_OFFLINE": "1"},
                                 lambda p, u: ("teacher.pretrained", ["no-such-org/no-such-model", "HF_HUB_OFFLINE"])),
    "sae_missing": (lambda p, u: [f"sae.pretrained={p['root'] / 'no.safetensors'}"], NONE, {},
                    lambda p, u: ("sae.pretrained", [str(p["root"] / "no.safetensors"), "not found"])),
    "sae_corrupt": (lambda p, u: [f"sae.pretrained={p['sae_corrupt']}"], NONE, {},
                    lambda p, u: ("sae.pretrained", [str(p["sae_corrupt"]), "not a usable SAE"])),
    "sae_truncated": (lambda p, u: [f"sae.pretrained={p['sae_truncated']}"], NONE, {},
                      lambda p, u: ("sae.pretrained", [str(p["sae_truncated"]), "not a usable SAE"])),
    "sae_fewer_latents": (lambda p, u: [f"sae.pretrained={p['sae_128']}"], NONE, {},
                          lambda p, u: ("sae.num_latents", [f"{SMOKE_LATENTS} but", "has 128 latents"])),
    "sae_width_vs_pretrained_teacher": (
        lambda p, u: [f"teacher.pretrained={p['teacher']}", f"sae.pretrained={p['sae_narrow']}"], NONE, {},
        lambda p, u: ("sae.pretrained", [str(p["sae_narrow"]), "width 16", "hidden size is 32"])),
    "sae_url_refused": (lambda p, u: [f"sae.pretrained={u['refused']}/sae.pt"], NONE, {},
                        lambda p, u: ("sae.pretrained", [f"{u['refused']}/sae.pt", "unreachable"])),
    "sae_url_silent": (lambda p, u: [f"sae.pretrained={u['silent']}/sae.pt"], NONE, {},
                       lambda p, u: ("sae.pretrained", [f"{u['silent']}/sae.pt", "unreachable"])),
    "unknown_eval_task": (lambda p, u: ["eval.tasks=[cocomix_choice, lambada_openai, hellaswagg]"], NONE, {},
                          lambda p, u: ("eval.tasks", ["hellaswagg", "unknown task"])),
    "tracking_server_refused": (lambda p, u: [], lambda p, u: {"tracking_uri": u["refused"]}, {},
                                lambda p, u: ("tracking.mlflow_uri", [u["refused"], "unreachable"])),
    "tracking_server_silent": (lambda p, u: [], lambda p, u: {"tracking_uri": u["silent"]}, {},
                               lambda p, u: ("tracking.mlflow_uri", [u["silent"], "did not answer"])),
    "tracking_sqlite_unwritable": (lambda p, u: [], lambda p, u: {"tracking_uri": f"sqlite:///{p['a_file']}/mlruns.db"}, {},
                                   lambda p, u: ("tracking.mlflow_uri", [str(p["a_file"]), "not a writable folder"])),
    "tracking_sqlite_not_a_database": (lambda p, u: [], lambda p, u: {"tracking_uri": f"sqlite:///{p['not_sqlite']}"}, {},
                                       lambda p, u: ("tracking.mlflow_uri", [str(p["not_sqlite"]), "not a SQLite database"])),
    "tracking_uri_unknown_scheme": (lambda p, u: [], lambda p, u: {"tracking_uri": None},
                                    {"MLFLOW_TRACKING_URI": "garbage://x"},
                                    lambda p, u: ("tracking.mlflow_uri", ["garbage://x", "MLFLOW_TRACKING_URI",
                                                                          "sqlite://", "http://"])),
    "storage_root_unwritable": (lambda p, u: [], lambda p, u: {"storage_root": str(p["a_file"] / "storage")}, {},
                                lambda p, u: ("compute.storage_root", [str(p["a_file"] / "storage"), "does not accept a write"])),
    "s3_endpoint_refused": (lambda p, u: [], lambda p, u: {"storage_root": "s3://bucket/prefix"},
                            {"AWS_ENDPOINT_URL_S3": "refused", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                             "AWS_DEFAULT_REGION": "us-east-1"},
                            lambda p, u: ("compute.storage_root", ["s3://bucket/prefix", "does not accept a write"])),
    "s3_endpoint_silent": (lambda p, u: [], lambda p, u: {"storage_root": "s3://bucket/prefix"},
                           {"AWS_ENDPOINT_URL_S3": "silent", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                            "AWS_DEFAULT_REGION": "us-east-1"},
                           lambda p, u: ("compute.storage_root", ["s3://bucket/prefix", "does not accept a write"])),
}


@pytest.mark.parametrize("case", sorted(PREFLIGHT_CASES))
def test_preflight_names_each_problem(case, inputs, good, silent_url, refused_url, monkeypatch):
    urls = {"silent": silent_url, "refused": refused_url}
    overrides, replaced, env, expected = PREFLIGHT_CASES[case]
    for name, value in env.items():
        monkeypatch.setenv(name, urls.get(value, value))
    settings = load_settings("smoke", overrides(inputs, urls))
    started = time.monotonic()
    problems = pf.preflight(settings, **(good | replaced(inputs, urls)), timeout_s=FAST_S)
    assert time.monotonic() - started < 8 * FAST_S  # bounded even when an address never answers
    setting, words = expected(inputs, urls)
    assert [problem.setting for problem in problems] == [setting], problems
    for word in words:
        assert word in problems[0].message


def test_preflight_s3_root_accepts_a_write(s3_root):
    assert pf.check_storage_root(s3_root, timeout_s=FAST_S) == []


def test_require_lists_every_problem_in_one_error(inputs, good):
    settings = load_settings("smoke", [f"sae.pretrained={inputs['sae_128']}", "eval.tasks=[nope]"])
    with pytest.raises(pf.PreflightError, match=r"2 problem\(s\)") as info:
        pf.require(settings, **good, timeout_s=FAST_S)
    assert [problem.setting for problem in info.value.problems] == ["sae.num_latents", "eval.tasks"]


@pytest.fixture(scope="module")
def answering_url() -> Iterator[str]:
    """A local HTTP server that answers /health with 200, as an MLflow tracking server does."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the handler's required name)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("via", ["argument", "MLFLOW_TRACKING_URI"])
def test_preflight_refuses_register_best_with_a_tracking_server_and_local_storage(via, good, answering_url, monkeypatch):
    """A tracking server refuses a local path as a model version source: say so before any work, not in `end`."""
    settings = load_settings("smoke", ["tracking.register_best=cocomix-best"])
    if via == "MLFLOW_TRACKING_URI":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", answering_url)
    uri = answering_url if via == "argument" else None
    problems = pf.preflight(settings, storage_root=good["storage_root"], tracking_uri=uri, timeout_s=FAST_S)
    assert [problem.setting for problem in problems] == ["tracking.register_best"], problems
    for words in ("compute.storage_root", good["storage_root"], "MLFLOW_TRACKING_URI", answering_url,
                  "expected an s3:// compute.storage_root, or no tracking.register_best"):
        assert words in problems[0].message
    assert "\n" not in str(problems[0])
    # Each of the three alone is fine: no register_best, an S3 root, or a SQLite store.
    assert pf.preflight(load_settings("smoke"), storage_root=good["storage_root"], tracking_uri=uri, timeout_s=FAST_S) == []
    assert pf.check_registration(settings, "s3://bucket/prefix", answering_url) == []
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert pf.preflight(settings, **good, timeout_s=FAST_S) == []


# ----- network-bound calls return within seconds -------------------------------------------------
@pytest.mark.parametrize("which", ["silent", "refused"])
def test_sae_download_fails_fast_naming_the_url(which, silent_url, refused_url, tmp_path):
    url = f"{silent_url if which == 'silent' else refused_url}/autoencoders/5.pt"
    started = time.monotonic()
    with pytest.raises(OSError, match="could not download SAE from " + url):
        download(url, tmp_path, timeout=FAST_S)
    assert time.monotonic() - started < 5 * FAST_S
    assert not list(tmp_path.rglob("*.pt"))


# ----- two processes on one fresh store (two whole flows at once: tests/test_flow_gang.py) --------
RACER = """
import sys, time
from pathlib import Path
from cocomix_core.plumbing import tracking
uri, barrier, racers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
(barrier / f"ready-{sys.argv[4]}").touch()
while len(list(barrier.iterdir())) < racers:  # every racer has imported MLflow: their first store calls coincide
    time.sleep(0.005)
experiment_id = tracking.ensure_experiment("race", uri)
run_id = tracking.create_run(experiment_id, "racer", tracking_uri=uri)
with tracking.active_run(run_id, uri) as tracker:
    tracker.log_metrics({"m": 1.0}, step=1)
"""


def test_concurrent_creation_of_a_fresh_sqlite_store(tmp_path):
    """Two processes create schema and experiment at once on a fresh store.

    Without the lock in ensure_experiment one of the two dies in alembic's migration (5 of 5 tries, measured
    with the lock taken out).
    """
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, uri, str(barrier), "2", str(i)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for i in range(2)]
    for racer in racers:
        _, stderr = racer.communicate(timeout=180)
        assert racer.returncode == 0, stderr
    client = MlflowClient(tracking_uri=uri)
    experiments = {e.name: e.experiment_id for e in client.search_experiments()}
    assert set(experiments) <= {"race", "Default"} and "race" in experiments
    if "Default" in experiments:
        assert client.search_runs([experiments["Default"]]) == []
    runs = client.search_runs([experiments["race"]])
    assert len(runs) == 2
    assert [client.get_metric_history(run.info.run_id, "m")[0].value for run in runs] == [1.0, 1.0]


# ----- the flow itself: its start step runs preflight before any work -------------------------------
FLOW_PROBLEMS = {
    # problem: (`--set` override (p: paths), extra environment (p, silent url), words its line must hold)
    "missing_corpus": (lambda p: "data.source=files; data.path=" + str(p["root"] / "no_corpus"), lambda p, url: {},
                       lambda p: ["data.path", str(p["root"] / "no_corpus")]),
    "unknown_eval_task": (lambda p: 'eval.tasks=["cocomix_choice", "no_such_task"]', lambda p, url: {},
                          lambda p: ["eval.tasks", "no_such_task"]),
    "silent_tracking_server": (lambda p: "", lambda p, url: {"MLFLOW_TRACKING_URI": url},
                               lambda p: ["tracking.mlflow_uri", "did not answer"]),
    "unwritable_storage_root": (lambda p: f"compute.storage_root={p['root'] / 'a_file' / 'artifacts'}",
                                lambda p, url: {}, lambda p: ["compute.storage_root", str(p["root"] / "a_file")]),
}
FLOW_PROBE_LIMIT_S = 120  # Metaflow's start, the start step's imports and the probes: well under this, even loaded


@pytest.fixture(scope="module")
def flow_with_every_problem(inputs: dict[str, Path], silent_url: str, tmp_path_factory: pytest.TempPathFactory
                            ) -> tuple[subprocess.CompletedProcess, float]:
    """One flow run given every problem at once (preflight lists them all): its output and seconds."""
    from test_flow import FLOW, flow_env

    (inputs["root"] / "a_file").write_text("a file where the storage root's parent folder should be")
    root = tmp_path_factory.mktemp("flow_problems")
    environment = {name: value for _, env, _ in FLOW_PROBLEMS.values() for name, value in env(inputs, silent_url).items()}
    settings = "; ".join(part for override, _, _ in FLOW_PROBLEMS.values() if (part := override(inputs)))
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(FLOW), "run", "--settings", "smoke", "--set", settings],
                            env=flow_env(root, **environment), cwd=root, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=FLOW_PROBE_LIMIT_S * 2)
    return result, time.monotonic() - started


@pytest.mark.slow
def test_the_flow_stops_in_start_naming_every_culprit(inputs, flow_with_every_problem):
    result, seconds = flow_with_every_problem
    assert result.returncode != 0, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    assert f"{len(FLOW_PROBLEMS)} problem(s) before the run could start" in result.stdout, result.stdout[-3000:]
    lines = result.stdout.splitlines()
    for problem, (_, _, words) in FLOW_PROBLEMS.items():  # each problem on a line of its own, naming its culprit
        assert any(all(word in line for word in words(inputs)) for line in lines), (problem, result.stdout[-3000:])
    assert "/start/1" in result.stdout and "/prepare/" not in result.stdout  # it stopped in start: nothing else ran
    assert seconds < FLOW_PROBE_LIMIT_S, f"took {seconds:.0f} s"
