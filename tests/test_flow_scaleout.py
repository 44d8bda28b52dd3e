"""The flow off one machine: the Kubernetes deployment spec requests the settings' resources, and only
branches of several nodes need a gang (a JobSet).

(The flow run whose large files move only through a real, local S3 server is in test_flow.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from test_flow import flow_env, run_flow, tail


def _argo_spec(tmp_path: Path, s3_server, overrides: str) -> dict:
    """The Argo Workflows JSON of the flow deployed to Kubernetes with the smoke preset and `overrides`."""
    env = flow_env(
        tmp_path, **s3_server.env,
        METAFLOW_DATASTORE_SYSROOT_S3=f"s3://{s3_server.bucket}/k8s-spec",
        METAFLOW_KUBERNETES_NAMESPACE="cocomix",
        COCOMIX_SETTINGS="smoke",
        COCOMIX_SET=overrides,
    )
    result = run_flow(
        ["--datastore", "s3", "--with", "kubernetes", "argo-workflows", "create", "--only-json"], env, tmp_path, 180
    )
    assert result.returncode == 0, tail(result)
    return json.loads(result.stdout[result.stdout.index("{"):])


def _routes(spec: dict) -> dict[str, str]:
    """The branch foreach's DAG: the `when` condition of each task that has one, by task name."""
    (foreach,) = [template for template in spec["spec"]["templates"] if template["name"] == "concepts-foreach-branch-names"]
    return {task["name"]: task["when"] for task in foreach["dag"]["tasks"] if task.get("when")}


def test_a_one_node_branch_trains_in_a_plain_pod_and_only_the_gang_path_holds_a_jobset(tmp_path: Path, s3_server):
    spec = _argo_spec(tmp_path, s3_server, "compute.train.nodes=1; compute.train.cpus=3; compute.train.retries=2")
    templates = {template["name"]: template for template in spec["spec"]["templates"]}
    plain = templates["train-one-node"]
    assert "resource" not in plain, "a one-node branch must not create any Kubernetes resource but its pod"
    assert float(plain["container"]["resources"]["requests"]["cpu"]) == 3
    assert "step train_one_node" in " ".join(plain["container"]["command"] + (plain["container"].get("args") or []))
    assert int(plain["retryStrategy"]["limit"]) == 2
    # `train` says at run time which path the branch takes; the JobSet is only on the gang's path.
    jobsets = [name for name, template in templates.items()
               if "JobSet" in template.get("resource", {}).get("manifest", "")]
    assert jobsets == ["train-gang"]
    routes = _routes(spec)
    assert "switch-step" in routes["train-one-node"] and "'train_one_node'" in routes["train-one-node"]
    assert "switch-step" in routes["launch-gang"] and "'launch_gang'" in routes["launch-gang"]


def test_kubernetes_spec_runs_each_branch_as_a_gang_with_the_settings_resources(tmp_path: Path, s3_server):
    spec = _argo_spec(
        tmp_path, s3_server,
        "compute.train.nodes=2; compute.train.gpus=8; compute.train.cpus=16; compute.train.memory_mb=65536; "
        "compute.train.retries=3; train.batch_size=16",  # 16 processes: one sequence each
    )
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
    # The step that starts each gang asks for its node count at run time.
    assert "num-parallel" in json.dumps(templates["launch-gang"].get("outputs", {}))
    parameters = {item["name"]: json.loads(item["value"]) for item in spec["spec"]["arguments"]["parameters"]}
    assert parameters["settings"] == "smoke", "the deployed default must match the resources it was built with"


def _dicts(tree: object) -> list[dict]:
    """Every mapping inside a JSON tree."""
    if isinstance(tree, dict):
        return [tree] + [found for value in tree.values() for found in _dicts(value)]
    return [found for value in tree for found in _dicts(value)] if isinstance(tree, list) else []
