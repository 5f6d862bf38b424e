"""The operator end to end on the real control plane: kopf subprocess, controllers, kwok-driven Pods.

Both backends: apply, children appear with the right fields, Pods run and succeed, the FineTuneJob follows with
phase, conditions and times; failures carry their reason; suspend/resume; restarts create no duplicates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from ftjtest import GROUP, JOB_LABEL, PLURAL, VERSION, Cluster, ftj, run_across_an_operator_restart
from kubernetes import client

from support.kwok import drive_pod
from support.processes import wait_until

pytestmark = pytest.mark.usefixtures("workloads")


def _owned_by(obj: Any, uid: str) -> bool:
    refs = obj.metadata.owner_references or []
    return any(r.uid == uid and r.kind == "FineTuneJob" and r.controller for r in refs)


def test_job_backend_full_lifecycle(cluster: Cluster, operator: Any) -> None:
    created = cluster.apply(ftj("train-job", "job"))
    uid = created["metadata"]["uid"]
    job = wait_until(lambda: cluster.batch.read_namespaced_job("train-job", cluster.ns), timeout=30, what="Job")
    assert job.spec.completion_mode == "Indexed"
    assert (job.spec.completions, job.spec.parallelism) == (2, 2)
    assert _owned_by(job, uid)
    # No finalizer: an uninstalled operator must not leave FineTuneJobs that cannot be deleted.
    assert not cluster.get("train-job")["metadata"].get("finalizers")
    svc = cluster.core.read_namespaced_service("train-job", cluster.ns)
    assert svc.spec.cluster_ip == "None"
    assert _owned_by(svc, uid)
    cm = cluster.core.read_namespaced_config_map("train-job-config", cluster.ns)
    assert '"jobName": "train-job"' in cm.data["trainer.json"]
    role = cluster.rbac.read_namespaced_role("train-job-trainer", cluster.ns)
    assert role.rules[0].resource_names == ["train-job"]

    pods = cluster.wait_pods("train-job", 2)
    container = pods[0].spec.containers[0]
    assert container.name == "pytorch"
    assert "--node_rank=$(JOB_COMPLETION_INDEX)" in container.args
    env = {e.name: e for e in container.env}
    assert env["PET_MASTER_ADDR"].value == "train-job-0.train-job"
    assert env["AWS_SECRET_ACCESS_KEY"].value_from.secret_key_ref.name == "s3-credentials"
    running = cluster.wait_phase("train-job", "Running")
    assert running["status"]["startTime"]
    assert running["status"]["observedGeneration"] == running["metadata"]["generation"]

    for pod in pods:
        drive_pod(cluster.core, cluster.ns, pod.metadata.name, "Succeeded")
    done = cluster.wait_phase("train-job", "Succeeded")
    status = done["status"]
    assert status["completionTime"] >= status["startTime"]
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds["Succeeded"] == "True"
    assert conds["Running"] == "False"
    assert {"kind": "Job", "name": "train-job", "apiVersion": "batch/v1"} in status["children"]
    wait_until(
        lambda: {"ChildrenCreated", "Training", "TrainingSucceeded"} <= {e.reason for e in cluster.events("train-job")},
        timeout=30,
        what="the Events of every phase change",
    )


@pytest.mark.usefixtures("training_operator")
def test_pytorchjob_backend_full_lifecycle(cluster: Cluster, operator: Any) -> None:
    created = cluster.apply(ftj("train-ptj", "pytorchjob", nodes=3))
    uid = created["metadata"]["uid"]

    def pytorchjob() -> dict[str, Any]:
        result: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
            "kubeflow.org", "v1", cluster.ns, "pytorchjobs", "train-ptj"
        )
        return result

    ptj = wait_until(pytorchjob, timeout=30, what="PyTorchJob")
    assert any(r["uid"] == uid for r in ptj["metadata"]["ownerReferences"])
    assert ptj["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    pods = cluster.wait_pods("train-ptj", 3)
    by_rank = {}
    for pod in pods:
        env = {e.name: e.value for e in pod.spec.containers[0].env}
        by_rank[env["PET_NODE_RANK"]] = env
    assert sorted(by_rank) == ["0", "1", "2"]
    assert all(e["PET_NNODES"] == "3" and e["PET_MASTER_ADDR"] == "train-ptj-master-0" for e in by_rank.values())
    assert "--node_rank=$(PET_NODE_RANK)" in pods[0].spec.containers[0].args
    cluster.wait_phase("train-ptj", "Running")

    for pod in pods:
        drive_pod(cluster.core, cluster.ns, pod.metadata.name, "Succeeded")
    done = cluster.wait_phase("train-ptj", "Succeeded", timeout=90)
    assert done["status"]["completionTime"]


def test_failing_pod_gives_failed_with_its_reason(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("bad-data", "job", nodes=1))
    (pod,) = cluster.wait_pods("bad-data", 1)
    drive_pod(
        cluster.core,
        cluster.ns,
        pod.metadata.name,
        "Failed",
        exit_code=3,
        reason="Error",
        message='{"reason": "DataError", "message": "s3://data/train.json line 7: not valid JSON"}',
    )
    failed = cluster.wait_phase("bad-data", "Failed")
    failed_cond = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert failed_cond["reason"] == "DataError"
    assert "line 7" in failed_cond["message"]
    assert failed["status"]["completionTime"]
    cluster.wait_event("bad-data", "DataError", "Warning")


def test_oomkilled_pod_is_named_in_the_failure(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("oom", "job", nodes=1, runPolicy={"backoffLimit": 0}))
    (pod,) = cluster.wait_pods("oom", 1)
    drive_pod(cluster.core, cluster.ns, pod.metadata.name, "Failed", exit_code=137, reason="OOMKilled")
    failed = cluster.wait_phase("oom", "Failed")
    assert failed["status"]["message"].startswith("container pytorch in pod oom-0-")
    assert "ran out of memory" in failed["status"]["message"]


def test_suspend_and_resume(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("pausable", "job", nodes=2))
    cluster.wait_pods("pausable", 2)
    cluster.wait_phase("pausable", "Running")
    cluster.patch("pausable", {"spec": {"runPolicy": {"suspend": True}}})
    cluster.wait_phase("pausable", "Suspended")
    wait_until(
        lambda: cluster.batch.read_namespaced_job("pausable", cluster.ns).spec.suspend is True,
        timeout=30,
        what="the Job to be suspended",
    )
    wait_until(lambda: not cluster.pods("pausable", "Running"), timeout=60, what="suspended pods to go away")
    cluster.patch("pausable", {"spec": {"runPolicy": {"suspend": False}}})
    cluster.wait_pods("pausable", 2)
    resumed = cluster.wait_phase("pausable", "Running")
    assert cluster.batch.read_namespaced_job("pausable", cluster.ns).spec.suspend is False
    assert resumed["status"]["startTime"]  # the run keeps its start; outputs are never touched


def test_spec_the_operator_refuses_fails_once_with_the_field(cluster: Cluster, operator: Any) -> None:
    # Admitted by the CRD schema, refused by the operator's own validation (credentials must come from a Secret).
    cluster.apply(ftj("leaky", "job", env=[{"name": "AWS_SECRET_ACCESS_KEY", "value": "not-here"}]))
    failed = cluster.wait_phase("leaky", "Failed")
    cond = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "InvalidSpec"
    assert "spec.env" in cond["message"]
    assert "not-here" not in str(failed["status"])  # an env value may be a secret: never echoed into status
    with pytest.raises(client.exceptions.ApiException):
        cluster.batch.read_namespaced_job("leaky", cluster.ns)


def test_operator_restart_creates_no_duplicates_and_keeps_status_moving(
    cluster: Cluster, run_operator: Callable[..., Any]
) -> None:
    run_across_an_operator_restart(cluster, run_operator, ftj("survivor", "job", nodes=2))
    selector = f"{JOB_LABEL}=survivor"
    assert len(cluster.batch.list_namespaced_job(cluster.ns, label_selector=selector).items) == 1
    assert len(cluster.core.list_namespaced_service(cluster.ns, label_selector=selector).items) == 1
    assert len(cluster.core.list_namespaced_config_map(cluster.ns, label_selector=selector).items) == 1
    assert len(cluster.pods("survivor")) == 2


def test_deleting_the_finetunejob_removes_its_children(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("gone", "job", nodes=1))
    cluster.wait_pods("gone", 1)
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.ns, PLURAL, "gone")
    wait_until(
        lambda: not cluster.batch.list_namespaced_job(cluster.ns, label_selector=f"{JOB_LABEL}=gone").items,
        timeout=60,
        what="garbage collection of the Job",
    )


def test_ttl_deletes_a_finished_job(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("short-lived", "job", nodes=1, runPolicy={"ttlSecondsAfterFinished": 1}))
    (pod,) = cluster.wait_pods("short-lived", 1)
    drive_pod(cluster.core, cluster.ns, pod.metadata.name, "Succeeded")

    def gone() -> bool:
        try:
            cluster.get("short-lived")
        except client.exceptions.ApiException as exc:
            return exc.status == 404
        return False

    wait_until(gone, timeout=60, what="TTL deletion of the finished FineTuneJob")
