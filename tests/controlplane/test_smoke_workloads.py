"""Smoke tests proving Pods really flow: controller manager creates them, the scheduler binds them to kwok's fake
GPU nodes, kwok runs them as the test drives them, and the Job and garbage-collector controllers react."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from support.controlplane import KWOK_GPUS_PER_NODE
from support.kwok import FAKE_NODE_LABEL, GPU_RESOURCE, drive_pod, wait_for_pod_phase
from support.processes import wait_until

pytestmark = pytest.mark.usefixtures("workloads")


def _job(name: str, *, completions: int, backoff_limit: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": backoff_limit,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.invalid/never-pulled:1",
                            "resources": {"limits": {GPU_RESOURCE: "1"}},
                        }
                    ],
                }
            },
        },
    }


def _running_pods(core: client.CoreV1Api, namespace: str, job: str, count: int) -> list[client.V1Pod]:
    def probe() -> list[client.V1Pod] | None:
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
        running = [p for p in pods if p.status.phase == "Running"]
        return running if len(running) == count else None

    pods: list[client.V1Pod] = wait_until(probe, timeout=60, what=f"{count} running pods of job {job}")
    return pods


def _job_condition(batch: client.BatchV1Api, namespace: str, name: str, kind: str) -> client.V1JobCondition | None:
    job = batch.read_namespaced_job(name, namespace)
    for condition in job.status.conditions or []:
        if condition.type == kind and condition.status == "True":
            return condition
    return None


def test_job_pods_are_scheduled_on_gpu_nodes_and_job_completes(k8s_api: client.ApiClient, namespace: str) -> None:
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    batch.create_namespaced_job(namespace, _job("train", completions=2))

    pods = _running_pods(core, namespace, "train", 2)
    for pod in pods:
        node = core.read_node(pod.spec.node_name)
        assert node.metadata.labels[FAKE_NODE_LABEL] == "true"
        assert node.status.allocatable[GPU_RESOURCE] == str(KWOK_GPUS_PER_NODE)
        assert pod.status.container_statuses[0].state.running is not None
        drive_pod(core, namespace, pod.metadata.name, "Succeeded")

    complete = wait_until(
        lambda: _job_condition(batch, namespace, "train", "Complete"), timeout=60, what="job train Complete"
    )
    assert complete.status == "True"
    assert batch.read_namespaced_job("train", namespace).status.succeeded == 2


def test_failed_pod_reports_exit_code_and_fails_job(k8s_api: client.ApiClient, namespace: str) -> None:
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    batch.create_namespaced_job(namespace, _job("crash", completions=1, backoff_limit=0))
    (pod,) = _running_pods(core, namespace, "crash", 1)

    drive_pod(core, namespace, pod.metadata.name, "Failed", exit_code=137, reason="OOMKilled", message="out of memory")

    failed_pod = wait_for_pod_phase(core, namespace, pod.metadata.name, "Failed")
    terminated = failed_pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason, terminated.message) == (137, "OOMKilled", "out of memory")
    failed = wait_until(lambda: _job_condition(batch, namespace, "crash", "Failed"), timeout=60, what="job Failed")
    assert failed.reason == "BackoffLimitExceeded"


def test_deleting_owner_garbage_collects_its_pods(k8s_api: client.ApiClient, namespace: str) -> None:
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    batch.create_namespaced_job(namespace, _job("owner", completions=2))
    pods = _running_pods(core, namespace, "owner", 2)
    assert all(p.metadata.owner_references[0].kind == "Job" for p in pods)

    batch.delete_namespaced_job("owner", namespace, propagation_policy="Background")

    wait_until(
        lambda: not core.list_namespaced_pod(namespace, label_selector="job-name=owner").items,
        timeout=60,
        what="garbage collector to delete the job's pods",
    )
    assert not batch.list_namespaced_job(namespace).items
