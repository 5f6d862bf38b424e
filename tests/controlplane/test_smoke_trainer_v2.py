"""Smoke tests proving Kubeflow Trainer v2 and JobSet are real here (groundwork for the TrainJob backend): the
upstream torch ClusterTrainingRuntime and a TrainJob on it become a JobSet, Jobs and Pods with the torch plugin's
distributed-training environment, and the TrainJob completes when kwok completes its Pods."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from kubernetes import client

from support import testbin
from support.kwok import drive_pod
from support.processes import wait_until

pytestmark = pytest.mark.usefixtures("trainer_v2")

GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"


@pytest.fixture(scope="module")
def runtime(k8s_api: client.ApiClient) -> str:
    """The upstream torch-distributed ClusterTrainingRuntime, as the Trainer v2 manifests ship it."""
    custom = client.CustomObjectsApi(k8s_api)
    body = yaml.safe_load(testbin.trainer_v2_runtime("torch_distributed").read_text())
    name: str = body["metadata"]["name"]
    try:
        custom.create_cluster_custom_object(GROUP, VERSION, "clustertrainingruntimes", body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    return name


def _env(pod: client.V1Pod) -> dict[str, Any]:
    container = pod.spec.containers[0]
    return {e.name: e.value if e.value is not None else e.value_from for e in container.env or []}


def test_a_trainjob_runs_as_a_jobset_with_the_torch_environment(
    k8s_api: client.ApiClient, namespace: str, runtime: str
) -> None:
    core, custom = client.CoreV1Api(k8s_api), client.CustomObjectsApi(k8s_api)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": "smoke"},
        "spec": {
            "runtimeRef": {"name": runtime, "kind": "ClusterTrainingRuntime", "apiGroup": GROUP},
            "trainer": {
                "numNodes": 2,
                "image": "registry.invalid/trainer:1",
                "command": ["python", "-m", "finetune_trainer.launch"],
                "resourcesPerNode": {"limits": {"nvidia.com/gpu": "1"}},
            },
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "trainjobs", body)

    def running() -> list[client.V1Pod] | None:
        pods = core.list_namespaced_pod(namespace, label_selector=f"{JOBSET_LABEL}=smoke").items
        up = [p for p in pods if p.status.phase == "Running"]
        return up if len(up) == 2 else None

    pods = wait_until(running, timeout=120, what="2 running pods of TrainJob smoke")
    for pod in pods:
        env = _env(pod)
        assert env["PET_NNODES"] == "2", env
        assert {"PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"} <= set(env), env
        assert str(env["PET_MASTER_ADDR"]).startswith("smoke-node-0-0."), env
        assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"

    for pod in pods:
        drive_pod(core, namespace, pod.metadata.name, "Succeeded")

    def complete() -> bool:
        job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "trainjobs", "smoke")
        return any(
            c["type"] == "Complete" and c["status"] == "True" for c in job.get("status", {}).get("conditions", [])
        )

    wait_until(complete, timeout=120, what="TrainJob smoke Complete")
