"""The flow with compute.train.nodes=2: each branch trains as a Metaflow @parallel gang of two local nodes.

Locally Metaflow runs a gang's nodes as processes of this machine (main node 127.0.0.1), and
every node runs its `accelerate launch` part of one gloo process group. The trained weights
must equal, bit for bit, one process taking the same global batches in 2 accumulation steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_flow import ARMS, flow_env, metaflow_query, run_flow, tail
from test_gang import accumulated_reference, assert_bitwise_equal

from cocomix_core.training.trainer import final_checkpoint

pytestmark = pytest.mark.slow  # a whole flow run with two gangs of two nodes: minutes on 2 cores

SHORT = ["train.steps=4", "train.eval_every=4", "train.checkpoint_every=4"]


def test_two_node_gangs_train_like_one_process_with_two_accumulation_steps(tmp_path: Path):
    # No storage root and no MLflow store given: both default to beside the run's .metaflow (here tmp_path,
    # where flow_env puts Metaflow's local datastore), not beside the package the flow imports.
    storage = tmp_path / "artifacts"
    # eval.tasks=[]: validation perplexity is all this checks, and no evaluate task pays lm-eval's import.
    overrides = [*SHORT, "compute.train.nodes=2", "eval.tasks=[]"]
    env = flow_env(tmp_path)
    del env["MLFLOW_TRACKING_URI"]
    result = run_flow(["run", "--settings", "smoke", "--set", "; ".join(overrides)], env, cwd=tmp_path)
    assert result.returncode == 0, tail(result)
    output = result.stdout + result.stderr
    for arm in ARMS:
        assert f"{arm} node 1 of 2: trained to step 4" in output, arm  # the worker node trained, and said so

    # Node 0 of each gang published the run folder; the reference reads the flow's own data and labels.
    (data,) = (storage / "data").iterdir()
    # the label cache, beside its small files (cards, validation labels) under "<key>-concepts"
    (labels,) = [path for path in (storage / "labels").iterdir() if not path.name.endswith("-concepts")]
    (run_folder,) = (storage / "runs").iterdir()
    for arm in ARMS:
        reference = accumulated_reference(arm, SHORT, data, tmp_path / f"accum-{arm}",
                                          labels if arm == "cocomix" else None)
        assert_bitwise_equal(final_checkpoint(run_folder / arm) / "model.safetensors", reference)

    # Each gang is a control task and a worker task; global rank 0 alone logged, once per step, and the
    # published checkpoint was evaluated after the gang finished.
    tasks = metaflow_query(
        "print(json.dumps([task.id for task in Flow('CocomixFlow').latest_run['train_gang']]))", env
    )
    assert len(tasks) == 4 and sum(task.endswith("_node_1") for task in tasks) == 2, tasks
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("cocomix-flow")
    for arm in ARMS:
        (run,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = 'train/{arm}'")
        assert run.info.status == "FINISHED"
        assert [point.step for point in client.get_metric_history(run.info.run_id, "train/loss")] == [4]
        assert run.data.tags["world_size"] == "2"  # the trainer saw one process group over both nodes
        assert run.data.tags["metaflow.step"] == "train_gang"  # the split-switch sent the branch to the gang
        assert [point.step for point in client.get_metric_history(run.info.run_id, "eval/val_ppl")] == [4]
