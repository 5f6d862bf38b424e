"""Smoke tests proving the Kubeflow training operator v1 is real: a PyTorchJob gets Master/Worker Pods and
Services with the distributed-training environment injected, and its status follows the Pods kwok drives."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from support.kwok import drive_pod
from support.processes import wait_until

pytestmark = pytest.mark.usefixtures("training_operator")

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"


def _replica(replicas: int) -> dict[str, Any]:
    return {
        "replicas": replicas,
        "restartPolicy": "Never",
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "pytorch",
                        "image": "registry.invalid/trainer:1",
                        "ports": [{"name": "pytorchjob-port", "containerPort": 23456}],
                        "resources": {"limits": {"nvidia.com/gpu": "1"}},
                    }
                ]
            }
        },
    }


def _pytorchjob(name: str, workers: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {
            "nprocPerNode": "1",
            "pytorchReplicaSpecs": {"Master": _replica(1), "Worker": _replica(workers)},
        },
    }


def _condition(custom: client.CustomObjectsApi, namespace: str, name: str, kind: str) -> dict[str, Any] | None:
    job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    for condition in job.get("status", {}).get("conditions", []):
        if condition["type"] == kind and condition["status"] == "True":
            return dict(condition)
    return None


def _pods_by_name(core: client.CoreV1Api, namespace: str, job: str, count: int) -> dict[str, client.V1Pod]:
    def probe() -> dict[str, client.V1Pod] | None:
        pods = core.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={job}").items
        running = {p.metadata.name: p for p in pods if p.status.phase == "Running"}
        return running if len(running) == count else None

    pods: dict[str, client.V1Pod] = wait_until(probe, timeout=90, what=f"{count} running pods of PyTorchJob {job}")
    return pods


def _env(pod: client.V1Pod) -> dict[str, str]:
    container = next(c for c in pod.spec.containers if c.name == "pytorch")
    return {e.name: e.value for e in container.env or []}


def test_pytorchjob_gets_master_and_worker_pods_services_and_env(k8s_api: client.ApiClient, namespace: str) -> None:
    core, custom = client.CoreV1Api(k8s_api), client.CustomObjectsApi(k8s_api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _pytorchjob("ddp", workers=2))

    pods = _pods_by_name(core, namespace, "ddp", 3)

    assert set(pods) == {"ddp-master-0", "ddp-worker-0", "ddp-worker-1"}
    assert {p.metadata.labels[REPLICA_TYPE_LABEL] for p in pods.values()} == {"master", "worker"}
    for name, pod in pods.items():
        env = _env(pod)
        assert env["MASTER_ADDR"] == "ddp-master-0"
        assert env["MASTER_PORT"] == "23456"
        assert env["WORLD_SIZE"] == "3"
        assert env["PET_NNODES"] == "3"
        assert env["PET_NPROC_PER_NODE"] == "1"
        expected_rank = "0" if name == "ddp-master-0" else str(int(name.rsplit("-", 1)[1]) + 1)
        assert env["RANK"] == env["PET_NODE_RANK"] == expected_rank
    services = core.list_namespaced_service(namespace, label_selector=f"{JOB_NAME_LABEL}=ddp").items
    assert {s.metadata.name for s in services} == set(pods)
    assert all(s.spec.cluster_ip == "None" for s in services)


def test_pytorchjob_status_follows_pods_driven_by_kwok(k8s_api: client.ApiClient, namespace: str) -> None:
    core, custom = client.CoreV1Api(k8s_api), client.CustomObjectsApi(k8s_api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _pytorchjob("status", workers=1))
    pods = _pods_by_name(core, namespace, "status", 2)

    running = wait_until(lambda: _condition(custom, namespace, "status", "Running"), timeout=60, what="job Running")
    assert running["reason"] == "PyTorchJobRunning"

    for name in pods:
        drive_pod(core, namespace, name, "Succeeded")

    succeeded = wait_until(
        lambda: _condition(custom, namespace, "status", "Succeeded"), timeout=60, what="job Succeeded"
    )
    assert succeeded["reason"] == "PyTorchJobSucceeded"
    job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "status")
    assert job["status"]["replicaStatuses"]["Master"].get("succeeded") == 1


def test_pytorchjob_fails_when_a_worker_fails(k8s_api: client.ApiClient, namespace: str) -> None:
    core, custom = client.CoreV1Api(k8s_api), client.CustomObjectsApi(k8s_api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _pytorchjob("boom", workers=1))
    _pods_by_name(core, namespace, "boom", 2)

    drive_pod(core, namespace, "boom-worker-0", "Failed", exit_code=1, reason="Error")

    failed = wait_until(lambda: _condition(custom, namespace, "boom", "Failed"), timeout=60, what="job Failed")
    assert failed["reason"] == "PyTorchJobFailed"
