"""Logs a person reads: plain progress lines in captured output, third-party noise hushed or summarised once."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from cocomix_core.concepts.sae_fit import train_sae
from cocomix_core.data.tokenizer import VOCAB_SIZE, hf_gpt2_tokenizer
from cocomix_core.data.windows import TrainWindows
from cocomix_core.evaluation.evaluator import run_lm_eval
from cocomix_core.evaluation.offline_tasks import build_offline_tasks
from cocomix_core.plumbing import progress
from cocomix_core.plumbing.progress import Progress, quiet_third_party

REPO_ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\[(?P<name>[^\]]+)\] (?P<unit>\w+) (?P<done>[\d,]+)/(?P<total>[\d,]+) \((?P<percent>\d+)%\)")
REDRAWS = ("\r", "\x1b[")  # carriage returns and cursor moves: what a captured tqdm bar leaves behind


def progress_lines(text: str) -> list[re.Match]:
    return [match for line in text.splitlines() if (match := LINE.match(line))]


def test_captured_progress_prints_a_line_every_tenth_and_at_the_end(capsys):
    with Progress("job", 95, terminal=False, every_s=3600) as bar:
        for step in range(95):
            bar.set_values(loss=1.0 / (step + 1))
            bar.update()
    err = capsys.readouterr().err
    assert not any(mark in err for mark in REDRAWS)
    done = [int(match["done"]) for match in progress_lines(err)]
    # first count at or past each multiple of 9.5 (10% of 95), then the end
    assert done == [10, 19, 29, 38, 48, 57, 67, 76, 86, 95]
    last = err.splitlines()[-1]
    assert last.startswith("[job] step 95/95 (100%) loss=0.01053 ") and "ETA" not in last
    assert "ETA" in err.splitlines()[0]


def test_captured_progress_resumed_counts_from_its_start_and_ticks_by_time(capsys):
    with Progress("resumed", 1000, initial=500, terminal=False, every_s=0.05) as bar:
        bar.update(10)  # 51%: before the 60% mark and before the time mark
        time.sleep(0.06)
        bar.update(10)  # the time mark passed
    lines = progress_lines(capsys.readouterr().err)
    assert [int(match["done"]) for match in lines] == [520]  # close() adds nothing: the last line is current


def test_unknown_total_prints_counts_and_rate(capsys):
    items = list(progress.track(iter(range(7)), "encoding", unit="document"))
    assert items == list(range(7))
    err = capsys.readouterr().err
    assert re.fullmatch(r"\[encoding\] 7 documents elapsed 0:00:00 \S+ document/s\n", err), err


def test_disabled_progress_prints_nothing(capsys):
    with Progress("other rank", 10, enabled=False) as bar:
        bar.update(10)
    assert capsys.readouterr() == ("", "")


class Kept(logging.Handler):
    """Keeps the messages that reach a logger's handlers, i.e. that its filters let through."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture()
def lm_eval_log():
    logger = logging.getLogger("lm_eval.models.huggingface")  # where lm-eval's HFLM logs these warnings
    kept = Kept()
    logger.addHandler(kept)
    yield logger, kept.messages
    logger.removeHandler(kept)


def test_quiet_drops_model_object_warnings_and_summarises_truncations_once(lm_eval_log, capsys):
    logger, reached = lm_eval_log
    truncation = "Combined length of context (108) and continuation ({}) exceeds model's maximum length (32). Truncating"
    with quiet_third_party() as noise:
        logger.warning("`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored.")
        with quiet_third_party() as inner:  # nested: the outer block keeps the count and prints the summary
            assert inner is noise
            for length in range(5):
                logger.warning(truncation.format(length))
        logger.warning("HF model type is neither marked as CausalLM or Seq2SeqLM.")
        logger.warning("something the user should see")
        assert reached == ["something the user should see"] and capsys.readouterr().err == ""
    assert capsys.readouterr().err == "5 inputs truncated to the model's 32-token context\n"
    logger.warning(truncation.format(1))  # outside the block: lm-eval's own behaviour again
    assert reached[-1] == truncation.format(1)


def test_quiet_turns_off_other_libraries_bars_in_captured_output(capsys):
    assert not sys.stderr.isatty()
    with quiet_third_party():
        for _ in tqdm.tqdm(range(3), desc="Running loglikelihood requests", disable=False):
            pass
    assert capsys.readouterr().err == ""
    for _ in tqdm.tqdm(range(3), desc="bar", disable=False):  # restored afterwards
        pass
    assert "bar" in capsys.readouterr().err


def test_sae_fit_reports_progress(capsys):
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    windows = TrainWindows(np.random.default_rng(0).integers(0, 128, 20_000).astype(np.uint16), 16, seed=1)
    train_sae(teacher, windows, layer_index=0, num_latents=64, k=4, steps=20, batch_tokens=64, teacher_batch_size=4)
    lines = progress_lines(capsys.readouterr().err)
    assert [(m["name"], int(m["done"])) for m in lines][-1] == ("sae", 20) and len(lines) == 10
    assert "nmse=" in lines[-1].string and "dead=" in lines[-1].string


def _run_captured(args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600, check=True)
    return result.stdout + result.stderr


def test_captured_training_run_is_plain_lines_without_third_party_noise(smoke_data, tmp_path):
    output = _run_captured(["-m", "cocomix_core.training.trainer", "--settings", "smoke", "--arm", "ntp", "--data", str(smoke_data),
                            "--out", str(tmp_path / "run"), "--threads", "1"])
    assert not any(mark in output for mark in REDRAWS), output
    for noise in ("Writing model shards", "Loading weights", "loss_type"):
        assert noise not in output
    repeated = {line: count for line, count in Counter(output.splitlines()).items() if count > 1}
    assert not repeated
    lines = progress_lines(output)
    assert lines and {match["name"] for match in lines} == {"ntp"}
    assert lines[-1].string.startswith("[ntp] step 12/12 (100%) loss=") and "tokens/s=" in lines[-1].string


@pytest.fixture(scope="module")
def short_context_model() -> GPT2LMHeadModel:
    """A 32-position model, as at the smoke preset: most offline-task items are longer and get truncated."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB_SIZE, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()


def test_lm_eval_truncations_are_summarised_once(smoke_data, tmp_path, short_context_model, lm_eval_log, capfd):
    _, reached = lm_eval_log
    tasks_dir = build_offline_tasks(smoke_data, tmp_path / "tasks", items=6, seed=0)
    arguments = (short_context_model, hf_gpt2_tokenizer(), ["cocomix_lastword", "cocomix_choice"], tasks_dir, None, 8)
    run_lm_eval.__wrapped__(*arguments)  # lm-eval as it is: one warning per truncated input
    truncated = sum("exceeds model's maximum length (32)" in message for message in reached)
    assert truncated > 1 and any("`pretrained` model kwarg is not of type `str`" in message for message in reached)
    capfd.readouterr()

    reached.clear()
    run_lm_eval(*arguments)
    quiet = capfd.readouterr()
    assert reached == [] and quiet.out == ""
    assert quiet.err == f"{truncated} inputs truncated to the model's 32-token context\n"
