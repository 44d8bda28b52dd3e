"""The flow off one machine: its storage through a real (local) S3 server, and a Kubernetes deployment spec.

Steps on Kubernetes or AWS Batch share no filesystem, so these tests check that large files
move only through object storage and that the deployed spec requests the settings' resources.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from test_flow import ARMS, flow_env, run_flow, tail


def test_kubernetes_spec_runs_each_branch_as_a_gang_with_the_settings_resources(tmp_path: Path, s3_server):
    env = flow_env(
        tmp_path, **s3_server.env,
        METAFLOW_DATASTORE_SYSROOT_S3=f"s3://{s3_server.bucket}/k8s-spec",
        METAFLOW_KUBERNETES_NAMESPACE="cocomix",
        COCOMIX_SETTINGS="smoke",
        COCOMIX_SET="compute.train.nodes=2; compute.train.gpus=8; compute.train.cpus=16; compute.train.memory_mb=65536; "
                    "compute.train.retries=3; train.batch_size=16",  # 16 processes: one sequence each
    )
    result = run_flow(
        ["--datastore", "s3", "--with", "kubernetes", "argo-workflows", "create", "--only-json"], env, tmp_path, 180
    )
    assert result.returncode == 0, tail(result)
    spec = json.loads(result.stdout[result.stdout.index("{"):])
    templates = {template["name"]: template for template in spec["spec"]["templates"]}
    assert "nvidia.com/gpu" not in templates["prepare"]["container"]["resources"]["limits"]

    # The branch's gang is one JobSet: a control job (node 0) and nodes - 1 worker jobs, all with the same pod.
    gang = templates["train-gang"]
    workers = "{{=asInt(inputs.parameters.workerCount)}}"  # Argo fills it in unquoted, so the YAML quotes it here
    jobset = yaml.safe_load(gang["resource"]["manifest"].replace(workers, json.dumps(workers)))
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    jobs = {job["name"]: job for job in jobset["spec"]["replicatedJobs"]}
    assert set(jobs) == {"control", "worker"} and jobs["control"]["replicas"] == 1
    assert jobs["worker"]["replicas"] == workers
    (worker_count,) = {item["value"] for item in _dicts(spec) if item.get("name") == "workerCount" and "value" in item}
    assert "sub" in worker_count and "num-parallel" in worker_count, worker_count  # workerCount = num-parallel - 1
    for name, job in jobs.items():
        (container,) = job["template"]["spec"]["template"]["spec"]["containers"]
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == "8", name
        assert float(resources["requests"]["cpu"]) == 16 and resources["requests"]["memory"].startswith("65536")
        command = " ".join(container["command"] + container.get("args", []))
        assert "cocomix_flow.py" in command and "step train_gang" in command, command[-2000:]
        environment = {item["name"] for item in container.get("env", [])}
        assert "MF_MASTER_ADDR" in environment and "MF_WORLD_SIZE" in environment, name
    # A failed node fails the gang, and @retry recreates the whole gang (all nodes resume from the checkpoint).
    assert int(gang["retryStrategy"]["limit"]) == 3
    # The foreach step that starts each gang asks for its node count at run time.
    assert "num-parallel" in json.dumps(templates["train"].get("outputs", {}))
    parameters = {item["name"]: json.loads(item["value"]) for item in spec["spec"]["arguments"]["parameters"]}
    assert parameters["settings"] == "smoke", "the deployed default must match the resources it was built with"


def _dicts(tree: object) -> list[dict]:
    """Every mapping inside a JSON tree."""
    if isinstance(tree, dict):
        return [tree] + [found for value in tree.values() for found in _dicts(value)]
    return [found for value in tree for found in _dicts(value)] if isinstance(tree, list) else []


@pytest.mark.slow
def test_s3_datastore_moves_every_large_file_through_object_storage(tmp_path: Path, s3_server):
    import boto3

    prefix = "flow-s3"
    env = flow_env(tmp_path, **s3_server.env, METAFLOW_DATASTORE_SYSROOT_S3=f"s3://{s3_server.bucket}/{prefix}")
    # One checkpoint per arm and one task keep this run short; the shape of the work is the same.
    overrides = "train.steps=4; train.checkpoint_every=4; train.eval_every=4; eval.tasks=[cocomix_choice]"
    result = run_flow(["--datastore", "s3", "run", "--settings", "smoke", "--set", overrides], env, cwd=tmp_path)
    assert result.returncode == 0, tail(result)

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix)
            for item in page.get("Contents", [])]
    stored = [key.split("/cocomix-storage/", 1)[1] for key in keys if "/cocomix-storage/" in key]
    for kind in ("data", "teacher", "sae", "labels"):
        assert any(key.startswith(f"{kind}/") and key.endswith("/_COMPLETE") for key in stored), kind
    for arm in ARMS:
        assert any(f"/{arm}/checkpoints/step_000004/model.safetensors" in key for key in stored), arm

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("cocomix-flow").experiment_id])
    assert all(run.info.status == "FINISHED" for run in runs) and len(runs) == 7
    (branch,) = [run for run in runs if run.info.run_name == "train/cocomix"]
    assert [point.step for point in client.get_metric_history(branch.info.run_id, "eval/val_ppl")] == [4]
    listed = json.loads(Path(client.download_artifacts(branch.info.run_id, "checkpoints.json")).read_text())
    assert listed[0]["uri"].startswith(f"s3://{s3_server.bucket}/{prefix}/cocomix-storage/runs/")
