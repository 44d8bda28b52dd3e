"""The experiment flow end to end: real Metaflow runs in subprocesses, checked in MLflow's store itself.

The slow tests share one `smoke` experiment that exercises the failure paths on the way: the
first training task fails once (and @retry continues it), `report` fails once, then `resume`
finishes the run. So one ~2-minute run covers the lineage, the retry and the resume.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import FLOW_RUNS_GROUP, answer_ctrl_c
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.xdist_group(FLOW_RUNS_GROUP)  # one worker runs the flow-run modules in turn
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
    # Every bad field of one run is named at once: an infinite learning rate, an empty sweep (it once died in
    # Metaflow's foreach after the SAE was fitted) and a misspelt key.
    [(["--settings", "smoke", "--set", "train.lr=.inf; sweep.seeds=[]; train.stepz=3"],
      ("train.lr: Input should be a finite number", "sweep.seeds: List should have at least 1 item", "train.stepz")),
     (["--settings", "nonexistent"], ("nonexistent",)),
     # a gang of 3 nodes cannot split the smoke preset's global batch of 4 sequences evenly
     (["--settings", "smoke", "--set", "compute.train.nodes=3"],
      ("train.batch_size=4 does not split over compute.train.nodes=3",))],
)
def test_a_bad_setting_fails_before_any_step_and_names_the_field(tmp_path: Path, args: list[str], named: tuple[str, ...]):
    result = run_flow(["run", *args], flow_env(tmp_path), cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert all(words in result.stderr for words in named), result.stderr[-3000:]
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
    failed: subprocess.CompletedProcess  # the first run (the only one when nothing made it fail)
    resumed: subprocess.CompletedProcess | None
    client: MlflowClient
    runs: list[Any]  # every MLflow run of the experiment
    steps: tuple[int, ...]  # the checkpoints of each branch

    def read_stored(self, uri: str) -> bytes:
        """A file the flow stored: a local path, or an object of the test's S3 server."""
        if not uri.startswith("s3://"):
            return Path(uri).read_bytes()
        from conftest import S3Server

        bucket, key = uri.removeprefix("s3://").split("/", 1)
        s3 = S3Server(self.env["AWS_ENDPOINT_URL_S3"], bucket).client()
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    @property
    def output(self) -> str:
        """Everything the runs printed, as the user saw it."""
        return "".join(result.stdout + result.stderr for result in (self.failed, self.resumed) if result is not None)

    def named(self, name: str) -> list[Any]:
        return [run for run in self.runs if run.info.run_name == name]

    @property
    def parent(self) -> Any:
        (parent,) = [run for run in self.runs if run.info.run_name.startswith("CocomixFlow/")]
        return parent


def read_experiment(root: Path, env: dict[str, str], experiment_name: str, first: subprocess.CompletedProcess,
                    resumed: subprocess.CompletedProcess | None, steps: tuple[int, ...]) -> Experiment:
    """The experiment's runs as its tracking store holds them now."""
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(experiment_name)
    return Experiment(root, env, first, resumed, client, client.search_runs([experiment.experiment_id]), steps)


def run_interrupted(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """`python flows/cocomix_flow.py ARGS`, given Ctrl-C (SIGINT to its process group, as a terminal sends it) as
    soon as a branch reports a training step; everything it printed."""
    flow = subprocess.Popen([sys.executable, str(FLOW), *args], env=env, cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=answer_ctrl_c)
    seen, deadline = [], time.monotonic() + FLOW_TIMEOUT_S
    for line in flow.stdout:  # a training progress line: the branch is between its steps
        seen.append(line)
        if "/train_one_node/" in line and re.search(r"\] step \d+/\d+", line) or time.monotonic() > deadline:
            break
    os.killpg(flow.pid, signal.SIGINT)
    seen.append(flow.communicate(timeout=120)[0])
    return subprocess.CompletedProcess(flow.args, flow.returncode, "".join(seen), "")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Experiment:
    """The smoke experiment, storage under its folder: the first training task and `report` fail once, then `resume`.

    Two checkpoints per branch (6 and 12): each is an evaluate task, a fresh process importing torch and MLflow.
    """
    root = tmp_path_factory.mktemp("smoke")
    env = flow_env(root, COCOMIX_FAIL_ONCE="train_one_node,report")
    overrides = (f"compute.storage_root={root / 'artifacts'}; tracking.experiment_name=cocomix-flow; "
                 "tracking.register_best=cocomix-smoke; train.checkpoint_every=6")
    first = run_flow(["run", "--settings", "smoke", "--set", overrides], env, cwd=root)
    resumed = run_flow(["resume"], env, cwd=root)
    assert resumed.returncode == 0, tail(resumed)
    return read_experiment(root, env, "cocomix-flow", first, resumed, steps=(6, 12))


def check_lineage(experiment: Experiment) -> None:
    """The checks every store must pass: the run tree, lineage tags, dataset inputs, metrics once per checkpoint,
    the report on the parent."""
    check_run_tree(experiment)
    check_lineage_tags(experiment)
    check_dataset_inputs(experiment)
    check_eval_metrics(experiment)
    check_report_on_parent(experiment)


@pytest.mark.slow
def test_one_parent_run_with_a_child_per_piece_of_work(smoke: Experiment):
    check_run_tree(smoke)


def check_run_tree(smoke: Experiment) -> None:
    parent = smoke.parent
    assert parent.info.status == "FINISHED"
    children = [run for run in smoke.runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.info.run_name for run in children) == sorted(["prepare", "teacher", "sae", "evaluation"])
    # Branch runs are top level (the UI then charts them unfolded), tied to the parent by a tag.
    branches = [run for run in smoke.runs if run.data.tags.get("cocomix.experiment_run") == parent.info.run_id]
    assert sorted(run.info.run_name for run in branches) == sorted(f"train/{arm}" for arm in ARMS)
    assert not any("mlflow.parentRunId" in run.data.tags for run in branches)
    assert len(smoke.runs) == 1 + len(children) + len(branches)
    assert all(run.info.status == "FINISHED" for run in children + branches)


@pytest.mark.slow
def test_every_run_carries_its_lineage_tags_and_the_parent_the_flat_settings(smoke: Experiment):
    check_lineage_tags(smoke)


def check_lineage_tags(smoke: Experiment) -> None:
    for run in smoke.runs:
        tags = run.data.tags
        assert tags["metaflow.flow"] == "CocomixFlow"
        assert tags["metaflow.task_pathspec"].startswith(f"CocomixFlow/{tags['metaflow.run_id']}/{tags['metaflow.step']}/")
        assert tags["git.commit"] and len(tags["settings.digest"]) == 64
    assert len({run.data.tags["settings.digest"] for run in smoke.runs}) == 1
    params = smoke.parent.data.params
    assert params["preset"] == "smoke" and params["arms.cocomix.kind"] == "cocomix"
    assert params["train.steps"] == str(smoke.steps[-1])
    cocomix = smoke.named("train/cocomix")[0].data.params
    assert cocomix["arm.kind"] == "cocomix" and cocomix["branch.name"] == "cocomix"
    assert smoke.named("teacher")[0].data.tags["metaflow.step"] == "concepts"
    # One node per branch: trained in a plain step, never a gang (a JobSet on Kubernetes).
    assert smoke.named("train/ntp")[0].data.tags["metaflow.step"] == "train_one_node"


@pytest.mark.slow
def test_prepared_data_is_a_dataset_input_with_the_manifests_digest(smoke: Experiment):
    check_dataset_inputs(smoke)


def check_dataset_inputs(smoke: Experiment) -> None:
    from cocomix_core.data.corpus import MANIFEST_FILE, data_digest

    (prepared,) = [item.dataset for item in smoke.named("prepare")[0].inputs.dataset_inputs]
    # The digest of the manifest as stored, computed here, not the one the flow logged.
    stored_at = json.loads(prepared.source)["uri"]
    digest = data_digest(json.loads(smoke.read_stored(f"{stored_at}/{MANIFEST_FILE}")))
    for name in ("prepare", "teacher", *(f"train/{arm}" for arm in ARMS)):
        (run,) = smoke.named(name)
        assert [item.dataset.digest for item in run.inputs.dataset_inputs] == [digest[:36]], name


@pytest.mark.slow
def test_the_data_command_line_prepares_what_the_flow_prepared(smoke: Experiment, tmp_path: Path):
    """`python -m cocomix_core.data` with the smoke run's settings writes the manifest the flow's `prepare` wrote."""
    from cocomix_core.data.corpus import MANIFEST_FILE, data_digest

    (prepared,) = [item.dataset for item in smoke.named("prepare")[0].inputs.dataset_inputs]
    flow_digest = data_digest(json.loads(smoke.read_stored(f"{json.loads(prepared.source)['uri']}/{MANIFEST_FILE}")))
    result = subprocess.run([sys.executable, "-m", "cocomix_core.data", "--settings", "smoke", "--out", str(tmp_path / "out")],
                            env=smoke.env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, tail(result)
    assert json.loads(result.stdout[result.stdout.index("{"):])["data_digest"] == flow_digest


@pytest.mark.slow
def test_both_arms_have_eval_metrics_at_every_checkpoint_step_in_their_own_runs(smoke: Experiment):
    check_eval_metrics(smoke)


def check_eval_metrics(smoke: Experiment) -> None:
    for arm in ARMS:
        run_id = smoke.named(f"train/{arm}")[0].info.run_id
        for metric in ("eval/val_ppl", "eval/cocomix_lastword/acc", "eval/cocomix_choice/acc_norm", "checkpoint/tokens_seen"):
            history = smoke.client.get_metric_history(run_id, metric)
            # Exactly once per checkpoint: the resume cloned the evaluations instead of logging them again.
            assert sorted(point.step for point in history) == list(smoke.steps), (arm, metric)
        tokens = {point.step: point.value for point in smoke.client.get_metric_history(run_id, "eval/tokens_seen")}
        assert tokens == {step: step * 4 * 32 for step in smoke.steps}  # steps × batch × block
        assert smoke.client.get_metric_history(run_id, "train/loss"), "training metrics go to the same run"
        listed = json.loads(Path(smoke.client.download_artifacts(run_id, "checkpoints.json")).read_text())
        assert [entry["step"] for entry in listed] == list(smoke.steps)
        assert all(json.loads(smoke.read_stored(f"{entry['uri']}/config.json")) for entry in listed)
        by_tokens = smoke.client.get_metric_history(run_id, "by_tokens/eval/val_ppl")  # the chart view's token axis
        assert sorted(point.step for point in by_tokens) == [step * 4 * 32 for step in smoke.steps]
        check_checkpoint_models(smoke, arm, run_id, listed)
    sae = smoke.named("sae")[0].data.metrics
    assert {"sae/fvu", "sae/dead_fraction", "sae/mean_l0"} <= set(sae)


def check_checkpoint_models(smoke: Experiment, arm: str, run_id: str, listed: list[dict[str, Any]]) -> None:
    """Each published checkpoint of the branch is an external LoggedModel of its run, found by tag, at its storage
    URI, with the branch's settings as params and its evaluation's metrics linked (once, despite the resume)."""
    from cocomix_core.plumbing import tracking

    experiment = smoke.parent.info.experiment_id
    models = tracking.find_checkpoint_models(
        experiment, {"cocomix.branch": arm, "cocomix.experiment_run": smoke.parent.info.run_id}, smoke.env["MLFLOW_TRACKING_URI"])
    by_step = {int(model.tags["cocomix.step"]): model for model in models}
    assert sorted(by_step) == list(smoke.steps), arm
    for entry in listed:
        model = by_step[entry["step"]]
        assert model.source_run_id == run_id and model.tags[tracking.CHECKPOINT_URI_TAG] == entry["uri"]
        assert model.tags["cocomix.tokens_seen"] == str(entry["tokens_seen"]) and model.tags["cocomix.kind"] == arm
        assert model.params["branch.name"] == arm and model.tags["mlflow.model.isExternal"] == "true"
        linked = [point.key for point in smoke.client.get_logged_model(model.model_id).metrics]
        assert linked.count("eval/val_ppl") == 1, (arm, entry["step"], linked)


def check_report_on_parent(smoke: Experiment) -> None:
    """The report's files, its headline numbers and each branch's curves against tokens, on the parent run."""
    parent_id = smoke.parent.info.run_id
    report_dir = Path(smoke.client.download_artifacts(parent_id, "report"))
    content = json.loads((report_dir / "report.json").read_text())
    assert sorted(row["branch"] for row in content["table"]) == sorted(ARMS)
    assert (report_dir / "report.md").read_text().strip()
    assert list((report_dir / "plots").glob("*.png"))
    assert any(name.endswith("final_val_ppl") for name in smoke.parent.data.metrics)
    for arm in ARMS:  # the parent's chart view compares the arms: val ppl at each checkpoint's steps × 4 × 32 tokens
        history = smoke.client.get_metric_history(parent_id, f"{arm}/eval/val_ppl")
        assert sorted(point.step for point in history) == [step * 4 * 32 for step in smoke.steps], arm
    assert content["verdict"] and all(f"- {line}" in smoke.parent.data.tags["mlflow.note.content"]
                                      for line in content["verdict"])
    # the verdicts as structured rows, and the unigram floor from `prepare` on the parent and the prepare run
    (row,) = content["verdicts"]
    assert (row["arm"], row["reference"], row["metric"], row["seeds"]) == ("cocomix", "ntp", "eval/val_ppl", 1)
    assert {"value", "lo", "hi"} <= set(row["difference"]) and row["difference"]["method"] == "paired bootstrap"
    assert row["claim"] in ("better", "worse", "no detectable difference", "degenerate")
    assert row["min_detectable_difference"] > 0 and row["arm_estimate"]["lo"] <= row["arm_estimate"]["value"]
    floor = smoke.parent.data.metrics["data/unigram_val_ppl"]
    assert content["unigram_ppl"] == floor == smoke.named("prepare")[0].data.metrics["data/unigram_val_ppl"]
    assert smoke.parent.data.metrics["report/unigram_val_ppl"] == floor
    assert f"Unigram floor: validation perplexity {floor:.4g}" in smoke.parent.data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_the_report_is_logged_on_the_parent_and_shown_in_a_card(smoke: Experiment):
    check_report_on_parent(smoke)
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
    assert content.index("Verdict") < content.index("Final checkpoints")  # the card opens with the verdict
    assert "Unigram floor: validation perplexity" in content and "paired difference" in content
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
    assert labels == {"train": sorted(ARMS), "evaluate": sorted([f"step_{step:06d}" for step in smoke.steps] * 2)}


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
        "print(json.dumps(sorted(task.current_attempt for task in run['train_one_node'])))",
        smoke.env,
    )
    assert attempts == [0, 1]


# Metaflow's own lines about a task, not what the step printed.
_SYSTEM_MESSAGES = ("Task is starting", "Task finished successfully", "Task failed", "Cloning", "Sleeping",
                    "This failed task will", "[KILLED BY ORCHESTRATOR]", "Retrying", "Workflow", "Pre-Inited")
# Third-party warnings the flow hushes (issue 13): none may appear at all.
_HUSHED = ("`pretrained` model kwarg is not of type `str`", "HF model type is neither marked as CausalLM",
           "Passed an already-initialized model", "exceeds model's maximum length", "Writing model shards",
           "Loading weights")
_TASK_LINE = re.compile(r"\[(\d+)/(\w+)/(\d+) \(pid \d+\)\] (.*)")


@pytest.mark.slow
def test_the_output_is_lines_a_person_reads_and_every_step_says_something(smoke: Experiment):
    output = smoke.output
    assert "\r" not in output, "progress redraws in captured output"
    for noise in _HUSHED:
        assert noise not in output, noise
    said: dict[tuple[str, str, str], list[str]] = {}  # (run, step, task): what the task printed
    for match in map(_TASK_LINE.search, output.splitlines()):
        if match and not match.group(4).startswith(_SYSTEM_MESSAGES):
            said.setdefault(match.group(1, 2, 3), []).append(match.group(4))
    steps = ("start", "prepare", "concepts", "train", "train_one_node", "evaluate", "join_checkpoints", "report", "end")
    assert [step for step in steps if not any(task[1] == step for task in said)] == [], sorted(said)
    for task, lines in said.items():  # a warning comes once per task, never once per input or batch
        repeated = {line: count for line, count in Counter(lines).items() if count > 1 and "warn" in line.lower()}
        assert not repeated, (task, repeated)


@pytest.mark.slow
def test_the_end_step_prints_the_verdict_and_links_to_runs_that_exist(smoke: Experiment):
    end_lines = [match.group(4) for match in map(_TASK_LINE.search, smoke.resumed.stdout.splitlines())
                 if match and match.group(2) == "end"]
    text = "\n".join(end_lines)
    content = json.loads(Path(smoke.client.download_artifacts(smoke.parent.info.run_id, "report/report.json"))
                         .read_text())
    assert "Verdict (95% intervals):" in text
    assert all(line in text for line in content["verdict"]), text
    assert f"Unigram floor: validation perplexity {content['unigram_ppl']:.4g}" in text
    if content["verdicts"][0]["claim"] == "degenerate":  # students at the unigram level: the text says where to go
        assert "--settings cpu_study" in text
    store = smoke.env["MLFLOW_TRACKING_URI"]
    assert f"mlflow ui --backend-store-uri {store}" in text
    assert re.search(r"card view \d+/report --id report", text), text
    # The chart link opens the Model-training view as charts, listing exactly this run's branch runs.
    experiment, query = re.search(r"#/experiments/(\w+)/runs\?(\S+)", text).groups()
    query = urllib.parse.parse_qs(query)
    assert query["workflowType"] == ["machine_learning"] and query["compareRunsMode"] == ["CHART"]
    listed = smoke.client.search_runs([experiment], query["searchFilter"][0])
    assert sorted(run.info.run_name for run in listed) == sorted(f"train/{arm}" for arm in ARMS)
    experiment, parent = re.search(r"#/experiments/(\w+)/runs/(\w+)", text).groups()
    assert parent == smoke.parent.info.run_id and experiment == smoke.parent.info.experiment_id


@pytest.mark.slow
def test_the_end_step_prints_where_the_time_went_by_step(smoke: Experiment):
    end_lines = [match.group(4) for match in map(_TASK_LINE.search, smoke.resumed.stdout.splitlines())
                 if match and match.group(2) == "end"]
    start = next(index for index, line in enumerate(end_lines) if line.startswith("Where the time went"))
    rows = {}  # Metaflow's log strips the indentation: the table ends at the first empty line
    for line in itertools.takewhile(str.strip, end_lines[start + 1:]):
        rows[line.split()[0]] = line
    # every step before `end` has its row, those that call the library with the calls they made
    assert {"start", "prepare", "concepts", "train", "train_one_node", "evaluate", "report"} <= set(rows), rows
    assert "end" not in rows
    assert "prepare_data" in rows["prepare"] and "fit_sae" in rows["concepts"] and "build_labels" in rows["concepts"]
    assert re.search(rf"{len(ARMS)} tasks, .* of task time; inside the library: train_branch", rows["train_one_node"])
    assert "evaluate_checkpoint" in rows["evaluate"] and "write_report" in rows["report"]


@pytest.mark.slow
def test_the_best_final_checkpoint_is_registered_at_its_uri_with_the_verdict(smoke: Experiment):
    from transformers import AutoModelForCausalLM

    (version,) = smoke.client.search_model_versions("name = 'cocomix-smoke'")
    content = json.loads(Path(smoke.client.download_artifacts(smoke.parent.info.run_id, "report/report.json")).read_text())
    best = min(content["table"], key=lambda row: row["final_val_ppl"])["branch"]
    assert version.run_id == smoke.named(f"train/{best}")[0].info.run_id
    assert version.source.endswith(f"/{best}/checkpoints/step_{smoke.steps[-1]:06d}")
    assert all(line in version.description for line in content["verdict"])
    assert version.run_link.endswith(f"/runs/{smoke.parent.info.run_id}")
    assert f"registered the best final checkpoint as cocomix-smoke version {version.version}" in smoke.output
    loaded = AutoModelForCausalLM.from_pretrained(version.source)
    assert loaded.config.model_type == {"ntp": "gpt2", "cocomix": "cocomix"}[best]


@pytest.mark.slow
def test_ctrl_c_on_object_storage_and_a_tracking_server_then_resume_passes_the_same_lineage_checks(
    tmp_path, s3_server, mlflow_server
):
    """A cluster's run: Metaflow's datastore and every large folder in S3 (steps share no filesystem), MLflow
    behind `http://…`, both branches logging at once through the server; Ctrl-C while a branch trains.

    No MLflow run stays RUNNING (the parent and evaluation end KILLED); `resume` finishes with every run FINISHED,
    one point per step of every branch metric, nothing in "Default", no cocomix-* folder left in the run's
    private TMPDIR, and the checks above all hold.
    """
    prefix, name = "flow-s3", "cocomix-flow-served"
    env = flow_env(tmp_path, **s3_server.env, METAFLOW_DATASTORE_SYSROOT_S3=f"s3://{s3_server.bucket}/{prefix}",
                   MLFLOW_TRACKING_URI=mlflow_server.url)
    # 40 steps: the branches still train when the first progress line comes. One checkpoint per arm keeps the
    # evaluation short; the shape of the work is the same.
    overrides = f"tracking.experiment_name={name}; train.steps=40; train.checkpoint_every=40; train.eval_every=40"
    first = run_interrupted(["--datastore", "s3", "run", "--settings", "smoke", "--set", overrides], env, tmp_path)
    assert first.returncode != 0, tail(first)
    assert "/train_one_node/" in first.stdout and "Workflow interrupted" in first.stdout, tail(first)
    statuses = {run.info.run_name: run.info.status for run in read_experiment(tmp_path, env, name, first, None, ()).runs}
    assert "RUNNING" not in statuses.values(), statuses
    parent_name = next(run_name for run_name in statuses if run_name.startswith("CocomixFlow/"))
    assert statuses[parent_name] == statuses["evaluation"] == "KILLED", statuses

    resumed = run_flow(["--datastore", "s3", "resume"], env, cwd=tmp_path)
    assert resumed.returncode == 0, tail(resumed)
    served = read_experiment(tmp_path, env, name, first, resumed, steps=(40,))
    check_lineage(served)
    for run in served.runs:
        if run.info.run_name.startswith("train/"):
            for metric in run.data.metrics:
                steps = Counter(point.step for point in served.client.get_metric_history(run.info.run_id, metric))
                assert set(steps.values()) == {1}, (run.info.run_name, metric, steps)
    default = served.client.get_experiment_by_name("Default")
    assert default is None or served.client.search_runs([default.experiment_id]) == []
    assert not list((tmp_path / "tmp").glob("cocomix-*/")), list((tmp_path / "tmp").iterdir())

    s3 = s3_server.client()
    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix)
            for item in page.get("Contents", [])]
    stored = [key.split("/cocomix-storage/", 1)[1] for key in keys if "/cocomix-storage/" in key]
    for kind in ("data", "teacher", "sae", "labels"):
        assert any(key.startswith(f"{kind}/") and key.endswith("/_COMPLETE") for key in stored), kind
    for arm in ARMS:
        assert any(f"/{arm}/checkpoints/step_000040/model.safetensors" in key for key in stored), arm
    assert not (tmp_path / "artifacts").exists(), "a large folder was written to the local disk's storage root"
    for arm in ARMS:
        run_id = served.named(f"train/{arm}")[0].info.run_id
        listed = json.loads(Path(served.client.download_artifacts(run_id, "checkpoints.json")).read_text())
        assert listed[0]["uri"].startswith(f"s3://{s3_server.bucket}/{prefix}/cocomix-storage/runs/"), arm


def _card_text(smoke: Experiment) -> str:
    """The report card's components, decoded: everything it shows."""
    ((_, html),) = metaflow_query(
        "from metaflow.cards import get_cards\n"
        "task = Flow('CocomixFlow').latest_run['report'].task\n"
        "print(json.dumps([[card.id, card.get()] for card in get_cards(task)]))",
        smoke.env,
    )
    (encoded,) = re.findall(r'__MF_DATA__\["[^"]+"\] = "([^"]+)"', html)
    return base64.b64decode(encoded).decode()


@pytest.mark.slow
def test_the_card_shows_concept_cards_concept_prediction_and_steering(smoke: Experiment):
    from cocomix_core.evaluation.concept_quality import FREQUENCY_METRIC, OVERLAP_METRIC

    content = _card_text(smoke)
    sections = [content.index(f"## {title}") for title in ("Concept cards", "Concept prediction", "Steering")]
    assert sections == sorted(sections) and "Latent " in content and "raised by 20" in content
    cocomix = smoke.named("train/cocomix")[0].info.run_id
    overlap = smoke.client.get_metric_history(cocomix, OVERLAP_METRIC)
    assert sorted(point.step for point in overlap) == list(smoke.steps) and all(0 <= p.value <= 1 for p in overlap)
    assert not smoke.client.get_metric_history(smoke.named("train/ntp")[0].info.run_id, OVERLAP_METRIC)
    assert 0 <= smoke.parent.data.metrics[FREQUENCY_METRIC] <= 1
    page = Path(smoke.client.download_artifacts(smoke.parent.info.run_id, "concepts/concepts.html")).read_text()
    assert page.count("<section>") == 24 and "data:image/png;base64," in page  # 24 cards, the overlap plot inlined


@pytest.mark.slow
def test_the_concepts_command_line_reads_any_teacher_sae_and_checkpoint(smoke: Experiment, tmp_path: Path):
    storage = smoke.root / "artifacts"
    (sae,) = storage.glob("sae/*/sae.safetensors")
    (data,) = [path.parent for path in storage.glob("data/*/manifest.json")]
    (checkpoint,) = storage.glob("runs/*/cocomix/checkpoints/step_000012")
    (teacher,) = storage.glob("teacher/*/checkpoints/step_000012")
    out = tmp_path / "concepts"
    result = subprocess.run(
        [sys.executable, "-m", "cocomix_core.concepts_report", str(sae), str(checkpoint), "--data", str(data),
         "--out", str(out), "--teacher", str(teacher), "--samples", "8", "--settings", "smoke"],
        env=smoke.env, capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, tail(result)
    content = json.loads((out / "concepts.json").read_text())
    assert content["cards"] and len(content["steering"]) == 3 and content["floor"] is not None
    assert list(content["overlap"]) == ["step_000012"]
    assert all(f"<h2>{title}</h2>" in (out / "concepts.html").read_text()
               for title in ("Concept cards", "Concept prediction", "Steering"))
