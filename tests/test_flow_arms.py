"""Every arm of SPEC §9 in one flow run: NTP, CoCoMix and its ablations, KD and pause vectors.

One smoke-size Metaflow run trains 8 branches (one seed each) for 4 steps, evaluates each final checkpoint
with its intervals, and writes the verdict of every arm against NTP (the ablations also against CoCoMix).
Several seeds of an arm as one estimate (branches per seed, the t-interval verdict) are checked on the
two-seed flow that runs beside the gang flow (tests/test_flow_gang.py): a second seed here would double
this run for the same code path. The `cpu_study` preset is checked here too: it must hold exactly the
study issue 11 asks for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import FLOW_RUNS_GROUP
from mlflow.tracking import MlflowClient
from test_flow import flow_env, run_flow, tail

from settings import load_settings, training_branches

pytestmark = pytest.mark.xdist_group(FLOW_RUNS_GROUP)  # one worker runs the flow-run modules in turn
STEPS = 4
TRUNK = {"width": 32, "depth": 2, "heads": 2}
COCOMIX = {"kind": "cocomix", "model": TRUNK, "concept_num": 8, "insert_layer_index": 1}
ARMS = {  # added to the smoke preset's `ntp` and `cocomix`; the CoCoMix-kind ones are ablations
    "kd": {"kind": "kd", "model": TRUNK, "kd_top_k": 16},
    "pause": {"kind": "pause", "model": TRUNK, "insert_layer_index": 1},
    "mix_add": COCOMIX | {"mix": "add"},
    "mix_none": COCOMIX | {"mix": "none"},
    "lam0": COCOMIX | {"lam_concept": 0.0},
    "activation": COCOMIX | {"label_selection": "activation"},
}
ABLATIONS = ("mix_add", "mix_none", "lam0", "activation")
ALL_ARMS = ("ntp", "cocomix", *ARMS)


def arms_settings(root: Path) -> Path:
    """A YAML file extending `smoke`: every arm, one seed, tiny steps and evaluation."""
    tree = {
        "extends": "smoke",
        "arms": ARMS,
        "teacher": {"train": {"steps": 4, "eval_every": 4, "checkpoint_every": 4}},
        "sae": {"steps": 6},
        "train": {"steps": STEPS, "eval_every": STEPS, "checkpoint_every": STEPS},
        # Verdicts and intervals come from validation perplexity: no lm-eval task, so no evaluate task pays
        # lm-eval's ~10 s import (16 of them here). Task metrics in the flow are checked by test_flow.py.
        "eval": {"tasks": [], "val_windows": 4, "bootstrap_samples": 200},
        "compute": {"storage_root": str(root / "artifacts")},
    }
    path = root / "arms.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@dataclass
class ArmsRun:
    root: Path
    output: str
    client: MlflowClient
    runs: list[Any]

    def branch_run(self, branch: str) -> Any:
        (run,) = [run for run in self.runs if run.info.run_name == f"train/{branch}"]
        return run


@pytest.fixture(scope="module")
def arms_run(tmp_path_factory: pytest.TempPathFactory) -> ArmsRun:
    root = tmp_path_factory.mktemp("arms")
    env = flow_env(root)
    # Four tasks at a time: 8 branches' processes at once would crowd a small machine's memory.
    command = ["run", "--max-workers", "4", "--settings", str(arms_settings(root))]
    result = run_flow(command, env, cwd=root, timeout=1800)
    assert result.returncode == 0, tail(result)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cocomix-flow")
    return ArmsRun(root, result.stdout + result.stderr, client, client.search_runs([experiment.experiment_id]))


def test_cpu_study_preset_is_ntp_cocomix_kd_and_pause_at_three_seeds_on_the_default_teacher():
    study, default = load_settings("cpu_study"), load_settings("cpu")
    assert {name: arm.kind for name, arm in study.arms.items()} == {
        "ntp": "ntp", "cocomix": "cocomix", "kd": "kd", "pause": "pause"}
    assert sorted(branch.name for branch in training_branches(study)) == sorted(
        f"{arm}-s{seed}" for arm in ("ntp", "cocomix", "kd", "pause") for seed in (0, 1, 2))
    # The default run's corpus, teacher, SAE and evaluation; arms, seeds and a longer training are added
    # (students that leave the unigram level: SPEC §10).
    for section in ("data", "teacher", "sae", "concepts", "eval"):
        assert getattr(study, section) == getattr(default, section), section
    assert study.train.steps * study.train.batch_size > 6 * default.train.steps * default.train.batch_size
    # The default preset stays at NTP and CoCoMix, one seed: its 10-minute budget has no room for more.
    assert [(branch.name, branch.kind) for branch in training_branches(default)] == [
        ("ntp", "ntp"), ("cocomix", "cocomix")]


@pytest.mark.slow
def test_the_concepts_step_caches_labels_per_selection_and_teacher_logits_once(arms_run: ArmsRun):
    samples = STEPS * 4  # steps × the smoke batch
    for line in (f"labels (attribution) of {samples} training samples cached",
                 f"labels (activation) of {samples} training samples cached",
                 f"teacher logits (tau1-top16) of {samples} training samples cached"):
        assert arms_run.output.count(line) == 1, line
    # one label cache per selection, each with its small files (cards, validation labels) under a key of its own
    caches = sorted(path.name for path in (arms_run.root / "artifacts" / "labels").iterdir())
    assert len(caches) == 4 and [name for name in caches if name.endswith("-concepts")] == [
        f"{name}-concepts" for name in caches if not name.endswith("-concepts")]
    assert len(list((arms_run.root / "artifacts" / "teacher_logits").iterdir())) == 1


@pytest.mark.slow
def test_every_branch_trains_and_mlflow_holds_its_evaluation_with_intervals(arms_run: ArmsRun):
    for arm in ALL_ARMS:
        run = arms_run.branch_run(arm)
        assert run.info.status == "FINISHED"
        assert run.data.params["branch.seed"] == "0"
        assert run.data.params["arm.kind"] == ARMS.get(arm, {"kind": arm})["kind"]
        values = {}
        for metric in ("eval/val_ppl", "eval/val_ppl_lo", "eval/val_ppl_hi"):
            history = arms_run.client.get_metric_history(run.info.run_id, metric)
            assert [point.step for point in history] == [STEPS], (arm, metric)
            values[metric] = history[0].value
        assert values["eval/val_ppl_lo"] <= values["eval/val_ppl"] <= values["eval/val_ppl_hi"], arm
        assert values["eval/val_ppl_lo"] < values["eval/val_ppl_hi"]
    kd = arms_run.branch_run("kd").data.metrics
    assert "train/kd_loss" in kd
    cocomix_kind = [arms_run.branch_run(arm).data.metrics for arm in ("cocomix", *ABLATIONS)]
    assert all("train/concept_loss" in metrics for metrics in cocomix_kind)


@pytest.mark.slow
def test_the_verdict_lists_each_arm_against_ntp_and_the_ablations_against_cocomix(arms_run: ArmsRun):
    parent = next(run for run in arms_run.runs if run.info.run_name.startswith("CocomixFlow/"))
    report_dir = Path(arms_run.client.download_artifacts(parent.info.run_id, "report"))
    markdown = (report_dir / "report.md").read_text()
    verdict = markdown.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    # one bullet per (arm, reference); then, for students at the unigram level, the pointer to cpu_study and the floor
    lines = [line.removeprefix("- ") for line in verdict.strip().splitlines()
             if line.startswith("- ") and " vs " in line.split(":", 1)[0]]
    pairs = [tuple(line.split(":", 1)[0].split(" vs ")) for line in lines]
    expected = [(arm, "ntp") for arm in ALL_ARMS if arm != "ntp"] + [(arm, "cocomix") for arm in ABLATIONS]
    assert sorted(pairs) == sorted(expected)
    # One seed: the bootstrap interval of the paired difference, with every arm's size printed (two seeds, the
    # t-interval: tests/test_flow_gang.py).
    assert all("(1 seed: bootstrap interval)" in line and "(paired bootstrap)" in line
               and "training FLOPs/token" in line for line in lines)
    assert "Unigram floor: validation perplexity" in verdict
    content = json.loads((report_dir / "report.json").read_text())
    assert sorted(row["branch"] for row in content["table"]) == sorted(ALL_ARMS)
