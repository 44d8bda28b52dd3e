"""The experiment flow end to end: real Metaflow runs in subprocesses, checked in MLflow's store itself.

The slow tests share one `smoke` experiment that exercises the failure paths on the way: the
first training task fails once (and @retry continues it), `report` fails once, then `resume`
finishes the run. So one ~2-minute run covers the lineage, the retry and the resume.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FLOW = PROJECT_ROOT / "flows" / "cocomix_flow.py"
FLOW_TIMEOUT_S = 600
ARMS = ("ntp", "cocomix")


def flow_env(root: Path, **extra: str) -> dict[str, str]:
    """A minimal environment like a fresh container's: no USER, everything under `root`."""
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),  # the fail-once markers live here
        "LANG": "C.UTF-8",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns.db'}",
        # Cards ignore this and look for .metaflow upward from the working directory: keep both at `root`.
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root),
        "COCOMIX_CACHE": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    if "PYTHONPATH" in os.environ:  # a checkout put first on the path (a worktree) must stay first in the flow
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env | extra


def run_flow(
    args: list[str], env: dict[str, str], cwd: Path, timeout: int = FLOW_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """`python flows/cocomix_flow.py ARGS` in a subprocess, its output captured."""
    return subprocess.run(
        [sys.executable, str(FLOW), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def metaflow_query(code: str, env: dict[str, str]) -> Any:
    """Run Metaflow client code (which must print JSON) against the test's datastore, in a subprocess:
    the client reads its datastore location once, at import."""
    script = "import json\nfrom metaflow import Flow, namespace\nnamespace(None)\n" + code
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def tail(result: subprocess.CompletedProcess) -> str:
    """The end of a subprocess's output, for assertion messages."""
    return (result.stdout + result.stderr)[-5000:]


# ---------------------------------------------------------------- fast checks


@pytest.mark.parametrize(
    ("args", "named"),
    [(["--settings", "smoke", "--set", "train.lr=-1"], "train.lr"), (["--settings", "nonexistent"], "nonexistent"),
     (["--settings", "smoke", "--set", "train.stepz=3"], "train.stepz"),
     # a gang of 3 nodes cannot split the smoke preset's global batch of 4 sequences evenly
     (["--settings", "smoke", "--set", "compute.train.nodes=3"], "train.batch_size=4 does not split over compute.train.nodes=3")],
)
def test_a_bad_setting_fails_before_any_step_and_names_the_field(tmp_path: Path, args: list[str], named: str):
    result = run_flow(["run", *args], flow_env(tmp_path), cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert named in result.stderr
    assert not (tmp_path / ".metaflow").exists(), "no step may have run"


def test_the_flow_runs_without_a_user_name(tmp_path: Path):
    env = flow_env(tmp_path)
    assert "USER" not in env and "LOGNAME" not in env
    result = run_flow(["show"], env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, tail(result)
    assert "Step train" in result.stdout + result.stderr


# ---------------------------------------------------------------- the smoke experiment


@dataclass
class Experiment:
    root: Path
    env: dict[str, str]
    failed: subprocess.CompletedProcess
    resumed: subprocess.CompletedProcess
    client: MlflowClient
    runs: list[Any]  # every MLflow run of the experiment

    def named(self, name: str) -> list[Any]:
        return [run for run in self.runs if run.info.run_name == name]

    @property
    def parent(self) -> Any:
        (parent,) = [run for run in self.runs if "mlflow.parentRunId" not in run.data.tags]
        return parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Experiment:
    root = tmp_path_factory.mktemp("smoke")
    env = flow_env(root, COCOMIX_FAIL_ONCE="train_gang,report")
    overrides = f"compute.storage_root={root / 'artifacts'}"
    failed = run_flow(["run", "--settings", "smoke", "--set", overrides], env, cwd=root)
    resumed = run_flow(["resume"], env, cwd=root)
    assert resumed.returncode == 0, tail(resumed)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cocomix-flow")
    return Experiment(root, env, failed, resumed, client, client.search_runs([experiment.experiment_id]))


@pytest.mark.slow
def test_one_parent_run_with_a_child_per_piece_of_work(smoke: Experiment):
    parent = smoke.parent
    assert parent.info.status == "FINISHED"
    children = [run for run in smoke.runs if run is not parent]
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in children)
    assert sorted(run.info.run_name for run in children) == sorted(
        ["prepare", "teacher", "sae", "evaluation", *(f"train/{arm}" for arm in ARMS)]
    )
    assert all(run.info.status == "FINISHED" for run in children)


@pytest.mark.slow
def test_every_run_carries_its_lineage_tags_and_the_parent_the_flat_settings(smoke: Experiment):
    for run in smoke.runs:
        tags = run.data.tags
        assert tags["metaflow.flow"] == "CocomixFlow"
        assert tags["metaflow.task_pathspec"].startswith(f"CocomixFlow/{tags['metaflow.run_id']}/{tags['metaflow.step']}/")
        assert tags["git.commit"] and len(tags["settings.digest"]) == 64
    assert len({run.data.tags["settings.digest"] for run in smoke.runs}) == 1
    params = smoke.parent.data.params
    assert params["preset"] == "smoke" and params["train.steps"] == "12" and params["arms.cocomix.kind"] == "cocomix"
    cocomix = smoke.named("train/cocomix")[0].data.params
    assert cocomix["arm.kind"] == "cocomix" and cocomix["branch.name"] == "cocomix"
    assert smoke.named("teacher")[0].data.tags["metaflow.step"] == "concepts"
    assert smoke.named("train/ntp")[0].data.tags["metaflow.step"] == "train_gang"


@pytest.mark.slow
def test_prepared_data_is_a_dataset_input_with_the_manifests_digest(smoke: Experiment):
    from cocomix_core.data import data_digest, load_manifest

    (data_dir,) = (smoke.root / "artifacts" / "data").iterdir()
    digest = data_digest(load_manifest(data_dir))
    for name in ("prepare", "teacher", *(f"train/{arm}" for arm in ARMS)):
        (run,) = smoke.named(name)
        assert [item.dataset.digest for item in run.inputs.dataset_inputs] == [digest[:36]], name


@pytest.mark.slow
def test_both_arms_have_eval_metrics_at_every_checkpoint_step_in_their_own_runs(smoke: Experiment):
    for arm in ARMS:
        run_id = smoke.named(f"train/{arm}")[0].info.run_id
        for metric in ("eval/val_ppl", "eval/cocomix_lastword/acc", "eval/cocomix_choice/acc_norm", "checkpoint/tokens_seen"):
            history = smoke.client.get_metric_history(run_id, metric)
            # Exactly once per checkpoint: the resume cloned the evaluations instead of logging them again.
            assert sorted(point.step for point in history) == [4, 8, 12], (arm, metric)
        tokens = {point.step: point.value for point in smoke.client.get_metric_history(run_id, "eval/tokens_seen")}
        assert tokens == {4: 4 * 4 * 32, 8: 8 * 4 * 32, 12: 12 * 4 * 32}  # steps × batch × block
        assert smoke.client.get_metric_history(run_id, "train/loss"), "training metrics go to the same run"
        listed = json.loads(Path(smoke.client.download_artifacts(run_id, "checkpoints.json")).read_text())
        assert [entry["step"] for entry in listed] == [4, 8, 12]
        assert all(Path(entry["uri"], "config.json").is_file() for entry in listed)
    sae = smoke.named("sae")[0].data.metrics
    assert {"sae/fvu", "sae/dead_fraction", "sae/mean_l0"} <= set(sae)


@pytest.mark.slow
def test_the_report_is_logged_on_the_parent_and_shown_in_a_card(smoke: Experiment):
    parent_id = smoke.parent.info.run_id
    report_dir = Path(smoke.client.download_artifacts(parent_id, "report"))
    content = json.loads((report_dir / "report.json").read_text())
    assert sorted(row["branch"] for row in content["table"]) == sorted(ARMS)
    assert (report_dir / "report.md").read_text().strip()
    assert list((report_dir / "plots").glob("*.png"))
    assert any(name.endswith("final_val_ppl") for name in smoke.parent.data.metrics)
    cards = metaflow_query(
        "from metaflow.cards import get_cards\n"
        "task = Flow('CocomixFlow').latest_run['report'].task\n"
        "print(json.dumps([[card.id, card.get()] for card in get_cards(task)]))",
        smoke.env,
    )
    ((card_id, html),) = cards
    assert card_id == "report"
    # A blank card's HTML carries its components as base64-encoded JSON.
    (encoded,) = re.findall(r'__MF_DATA__\["[^"]+"\] = "([^"]+)"', html)
    content = base64.b64decode(encoded).decode()
    assert "Final checkpoints" in content and "data:image/png" in content
    # Plots are captioned in words, not with their file names; tables are split to fit the page.
    assert "cocomix_choice: accuracy by training tokens" in content and "cocomix_choice__acc" not in content
    table_rows = [line for line in "\n".join(_strings(json.loads(content))).splitlines() if line.startswith("|")]
    assert table_rows and max(line.count("|") - 1 for line in table_rows) <= 7


def _strings(tree: Any) -> list[str]:
    """Every string inside a JSON tree."""
    if isinstance(tree, str):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else []
    return [text for value in values for text in _strings(value)]


@pytest.mark.slow
def test_foreach_tasks_are_labelled_with_short_branch_and_checkpoint_names(smoke: Experiment):
    labels = metaflow_query(
        "run = Flow('CocomixFlow').latest_run\n"
        "print(json.dumps({step: sorted(task['_foreach_stack'].data[-1].value for task in run[step])"
        " for step in ('train', 'evaluate')}))",
        smoke.env,
    )
    assert labels == {"train": sorted(ARMS), "evaluate": sorted(["step_000004", "step_000008", "step_000012"] * 2)}


@pytest.mark.slow
def test_each_step_that_works_says_what_it_did(smoke: Experiment):
    output = smoke.failed.stdout + smoke.failed.stderr
    for line in ("prepared ", "teacher trained to step 12", "SAE fitted at",
                 "labels (attribution) of 48 training samples cached", "ntp: trained to step 12", "cocomix step_000012 (1,536 tokens): val ppl"):
        assert line in output, line


@pytest.mark.slow
def test_resume_reruns_only_the_failed_steps_and_links_both_runs(smoke: Experiment):
    assert smoke.failed.returncode != 0 and "COCOMIX_FAIL_ONCE=report" in smoke.failed.stdout + smoke.failed.stderr
    for name in ("prepare", "teacher", "sae", "evaluation", *(f"train/{arm}" for arm in ARMS)):
        assert len(smoke.named(name)) == 1, f"cloned step logged {name} again"
    runs = metaflow_query(
        "runs = list(Flow('CocomixFlow'))\n"
        "print(json.dumps({run.id: run['end'].task.metadata_dict.get('origin-run-id') if run.successful else None"
        " for run in runs}))",
        smoke.env,
    )
    assert len(runs) == 2
    (resumed_id,) = [run_id for run_id, origin in runs.items() if origin]
    origin_id = runs[resumed_id]
    tags = smoke.parent.data.tags
    assert tags["metaflow.run_id"] == origin_id
    assert tags["metaflow.resumed_run_id"] == resumed_id and tags["metaflow.origin_run_id"] == origin_id
    run_tags = metaflow_query(f"print(json.dumps(sorted(Flow('CocomixFlow')['{resumed_id}'].user_tags)))", smoke.env)
    assert f"origin_run:{origin_id}" in run_tags
    assert "resumed from run" in smoke.resumed.stdout + smoke.resumed.stderr


@pytest.mark.slow
def test_a_failed_training_task_is_retried_and_finishes(smoke: Experiment):
    attempts = metaflow_query(
        "run = [run for run in Flow('CocomixFlow') if not run.successful][0]\n"
        "print(json.dumps(sorted(task.current_attempt for task in run['train_gang'])))",
        smoke.env,
    )
    assert attempts == [0, 1]
