"""The flow with compute.train.nodes=2, and a second flow started beside it on the same fresh stores.

Locally Metaflow runs a gang's nodes as processes of this machine (main node 127.0.0.1), and
every node runs its `accelerate launch` part of one gloo process group. The trained weights
must equal, bit for bit, one process taking the same global batches in 2 accumulation steps.
The gang flow trains the CoCoMix arm alone: a gang's path differs between kinds only in what the
trainer reads (CoCoMix: the label cache), and the NTP gang is checked, bit for bit too, by
tests/test_gang.py's relaunched gang; a second gang here would cost ~40 CPU-seconds of tasks.

A plain one-node flow with the same settings but two seeds starts at the same moment, on the same
new SQLite store and storage root (its own Metaflow datastore): the race of issue 14, where two
flows creating a store at once killed one in alembic's migration. Its two seeds of each arm are
also the flow-level check of several seeds as one estimate (the t-interval verdict; every arm kind
is trained by tests/test_flow_arms.py, with one seed). One pair of runs covers all three.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FLOW_RUNS_GROUP
from mlflow.tracking import MlflowClient
from test_flow import ARMS, FLOW, flow_env, metaflow_query
from test_gang import accumulated_reference, assert_bitwise_equal

from cocomix_core.training.trainer import final_checkpoint
from settings import load_settings

# two flow runs at once, one with two gangs of two nodes: minutes on 2 cores
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(FLOW_RUNS_GROUP)]

SHORT = ["train.steps=4", "train.eval_every=4", "train.checkpoint_every=4"]
GANG_ARMS = ("cocomix",)  # the smoke preset's arm of that name, as the other flow trains it
TWO_FLOWS_AT_ONCE_LIMIT_S = 900


@dataclass
class TwoFlows:
    root: Path  # the gang flow's working folder and datastore; the store and storage root are beside it
    env: dict[str, str]  # the gang flow's environment
    racer_env: dict[str, str]  # the two-seed flow's
    gang_output: str
    racer_output: str
    client: MlflowClient


@pytest.fixture(scope="module")
def two_flows(tmp_path_factory: pytest.TempPathFactory) -> TwoFlows:
    """The gang flow and a one-node flow with the same settings and two seeds, started together on one fresh store
    and storage root.

    The gang flow is given no storage root and no MLflow store: both default to beside the run's .metaflow
    (`root`, where flow_env puts Metaflow's local datastore), not beside the package the flow imports. The
    other flow names that same store and storage root; it has a Metaflow datastore of its own.
    """
    root = tmp_path_factory.mktemp("gang")
    # eval.tasks=[]: validation perplexity is all these check, and no evaluate task pays lm-eval's import.
    overrides = [*SHORT, "eval.tasks=[]"]
    arms = load_settings("smoke").arms
    gang_arms = {arm: arms[arm].model_dump(mode="json") for arm in GANG_ARMS}  # JSON is YAML: one --set value
    gang_env = flow_env(root)
    store = gang_env.pop("MLFLOW_TRACKING_URI")
    racer_folder = root / "racer"
    racer_folder.mkdir()
    racer_env = flow_env(root) | {"MLFLOW_TRACKING_URI": store, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(racer_folder)}
    commands = [
        (["--set", "; ".join([*overrides, "compute.train.nodes=2", f"arms={json.dumps(gang_arms)}"])], gang_env, root),
        (["--set", "; ".join([*overrides, "sweep.seeds=[0, 1]", f"compute.storage_root={root / 'artifacts'}"])],
         racer_env, racer_folder),
    ]
    flows = [subprocess.Popen([sys.executable, str(FLOW), "run", "--settings", "smoke", *args], env=env, cwd=cwd,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for args, env, cwd in commands]
    outputs = []
    for flow in flows:
        output, _ = flow.communicate(timeout=TWO_FLOWS_AT_ONCE_LIMIT_S)
        assert flow.returncode == 0, output[-5000:]
        outputs.append(output)
    return TwoFlows(root, gang_env, racer_env, outputs[0], outputs[1], MlflowClient(store))


def test_two_node_gangs_train_like_one_process_with_two_accumulation_steps(two_flows: TwoFlows):
    for arm in GANG_ARMS:
        assert f"{arm} node 1 of 2: trained to step 4" in two_flows.gang_output, arm  # the worker node trained, and said so
    gang_run = metaflow_query("print(json.dumps(Flow('CocomixFlow').latest_run.id))", two_flows.env)

    # Node 0 of each gang published the run folder; the reference reads the flow's own data and labels.
    storage = two_flows.root / "artifacts"
    (data,) = (storage / "data").iterdir()
    # the label cache, beside its small files (cards, validation labels) under "<key>-concepts"
    (labels,) = [path for path in (storage / "labels").iterdir() if not path.name.endswith("-concepts")]
    run_folder = storage / "runs" / gang_run  # the gang flow's own: the storage root defaulted to beside .metaflow
    for arm in GANG_ARMS:
        reference = accumulated_reference(arm, SHORT, data, two_flows.root / f"accum-{arm}",
                                          labels if arm == "cocomix" else None)
        assert_bitwise_equal(final_checkpoint(run_folder / arm) / "model.safetensors", reference)

    # Each gang is a control task and a worker task; global rank 0 alone logged, once per step, and the
    # published checkpoint was evaluated after the gang finished.
    tasks = metaflow_query(
        "print(json.dumps([task.id for task in Flow('CocomixFlow').latest_run['train_gang']]))", two_flows.env
    )
    assert len(tasks) == 2 * len(GANG_ARMS) and sum(task.endswith("_node_1") for task in tasks) == len(GANG_ARMS), tasks
    client = two_flows.client  # the MLflow store defaulted to beside .metaflow too
    experiment = client.get_experiment_by_name("cocomix-flow")
    for arm in GANG_ARMS:
        (run,) = [run for run in client.search_runs([experiment.experiment_id], f"attributes.run_name = 'train/{arm}'")
                  if run.data.tags["metaflow.run_id"] == gang_run]
        assert run.info.status == "FINISHED"
        assert [point.step for point in client.get_metric_history(run.info.run_id, "train/loss")] == [4]
        assert run.data.tags["world_size"] == "2"  # the trainer saw one process group over both nodes
        assert run.data.tags["metaflow.step"] == "train_gang"  # the split-switch sent the branch to the gang
        assert [point.step for point in client.get_metric_history(run.info.run_id, "eval/val_ppl")] == [4]


def test_two_flows_started_together_on_one_fresh_store_both_finish(two_flows: TwoFlows):
    """Both finish, nothing lands in "Default", every branch run has each checkpoint's metric once (issue 14:
    one died in alembic's migration)."""
    said = two_flows.gang_output + two_flows.racer_output
    # One storage root: each cached product is built by one flow and reused by the other, which says so.
    for built, reused in (("SAE fitted at", "SAE already fitted at"),
                          ("labels (attribution) of", "labels (attribution) already cached at")):
        assert (said.count(built), said.count(reused)) == (1, 1), (built, said[-5000:])
    client = two_flows.client
    experiments = {experiment.name: experiment.experiment_id for experiment in client.search_experiments()}
    if "Default" in experiments:
        assert client.search_runs([experiments["Default"]]) == []
    runs = client.search_runs([experiments["cocomix-flow"]])
    parents = [run for run in runs if run.info.run_name.startswith("CocomixFlow/")]
    assert len(parents) == 2 and all(run.info.status == "FINISHED" for run in runs)
    branch_runs = [run for run in runs if run.info.run_name.startswith("train/")]
    assert len(branch_runs) == len(GANG_ARMS) + 4  # the gang flow's arm, the other's two arms × two seeds
    for run in branch_runs:
        steps = [point.step for point in client.get_metric_history(run.info.run_id, "eval/val_ppl")]
        assert steps == [4], run.info.run_name
        losses = [point.step for point in client.get_metric_history(run.info.run_id, "train/loss")]
        assert losses and len(losses) == len(set(losses)), run.info.run_name


def test_two_seeds_of_an_arm_are_one_estimate_with_a_t_interval_verdict(two_flows: TwoFlows):
    """Each seed trains a branch of its own (with its bootstrap intervals); the verdict takes the seeds of an arm as
    one estimate: mean and t-interval, from the t-interval of the per-seed paired differences."""
    client = two_flows.client
    racer_run = metaflow_query("print(json.dumps(Flow('CocomixFlow').latest_run.id))", two_flows.racer_env)
    runs = [run for run in client.search_runs([client.get_experiment_by_name("cocomix-flow").experiment_id])
            if run.data.tags["metaflow.run_id"] == racer_run]
    for arm in ARMS:
        for seed in (0, 1):
            (run,) = [run for run in runs if run.info.run_name == f"train/{arm}-s{seed}"]
            assert run.data.params["branch.seed"] == str(seed) and run.data.params["arm.kind"] == arm
            values = {metric: [(point.step, point.value) for point in client.get_metric_history(run.info.run_id, metric)]
                      for metric in ("eval/val_ppl", "eval/val_ppl_lo", "eval/val_ppl_hi")}
            (low,), (value,), (high,) = (values[f"eval/val_ppl{end}"] for end in ("_lo", "", "_hi"))
            assert low[0] == value[0] == high[0] == 4 and low[1] < high[1], (arm, seed)
            assert low[1] <= value[1] <= high[1], (arm, seed)
    (parent,) = [run for run in runs if run.info.run_name.startswith("CocomixFlow/")]
    content = json.loads(Path(client.download_artifacts(parent.info.run_id, "report/report.json")).read_text())
    assert sorted(row["branch"] for row in content["table"]) == sorted(f"{arm}-s{seed}" for arm in ARMS for seed in (0, 1))
    (line,) = [line for line in content["verdict"] if line.startswith("cocomix vs ntp:")]
    assert "(2 seeds: mean, t-interval)" in line and "(paired t)" in line and "training FLOPs/token" in line, line
    (row,) = content["verdicts"]
    assert (row["arm"], row["reference"], row["seeds"]) == ("cocomix", "ntp", 2)
