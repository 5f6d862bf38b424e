"""The TrainJob backend on the real control plane: Kubeflow Trainer v2 and JobSet controllers built from their Go
modules, the chart's ClusterTrainingRuntime, kwok-driven Pods, the operator as a kopf subprocess.

The cases of the PyTorchJob backend's lifecycle tests: children and Pods with the torch plugin's environment, phase
and times, a permanent failure not retried, a transient one restarted within runPolicy.backoffLimit and stopped
beyond it, suspend/resume, the deadline, a Kueue queue, `auto`, and a runtime that is not installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from ftjtest import JOB_LABEL, Cluster, ftj, operator_env, run_across_an_operator_restart
from kubernetes import client

from support.kwok import drive_pod
from support.processes import wait_until

pytestmark = pytest.mark.usefixtures("workloads", "trainer_v2", "trainjob_runtime")

TRAINER, V1ALPHA1 = "trainer.kubeflow.org", "v1alpha1"


def trainjob(cluster: Cluster, name: str) -> dict[str, Any]:
    result: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
        TRAINER, V1ALPHA1, cluster.ns, "trainjobs", name
    )
    return result


def jobset(cluster: Cluster, name: str) -> dict[str, Any]:
    result: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
        "jobset.x-k8s.io", "v1alpha2", cluster.ns, "jobsets", name
    )
    return result


def _env(pod: client.V1Pod) -> dict[str, Any]:
    return {e.name: e.value if e.value is not None else e.value_from for e in pod.spec.containers[0].env or []}


def test_trainjob_backend_full_lifecycle(cluster: Cluster, operator: Any, trainjob_runtime: str) -> None:
    created = cluster.apply(ftj("train-tj", "trainjob", nodes=2))
    uid = created["metadata"]["uid"]
    tj = wait_until(lambda: trainjob(cluster, "train-tj"), timeout=30, what="TrainJob")
    assert any(r["uid"] == uid and r["controller"] for r in tj["metadata"]["ownerReferences"])
    assert tj["spec"]["runtimeRef"]["name"] == trainjob_runtime
    assert (tj["spec"]["trainer"]["numNodes"], tj["spec"]["trainer"]["numProcPerNode"]) == (2, 1)

    pods = cluster.wait_pods("train-tj", 2)
    by_rank = {}
    for pod in pods:
        container = pod.spec.containers[0]
        assert container.name == "node"
        assert pod.spec.service_account_name == "train-tj-trainer"
        assert pod.spec.security_context.run_as_user == 1000
        assert container.security_context.read_only_root_filesystem is True
        assert {m.mount_path for m in container.volume_mounts} >= {"/etc/finetune", "/scratch", "/dev/shm", "/tmp"}
        assert "--node_rank=$(PET_NODE_RANK)" in container.args
        env = _env(pod)
        assert env["PET_NNODES"] == "2"
        assert env["PET_MASTER_ADDR"] == "train-tj-node-0-0.train-tj"
        assert env["FTJ_BACKEND"] == "trainjob"
        assert env["AWS_SECRET_ACCESS_KEY"].secret_key_ref.name == "s3-credentials"
        by_rank[pod.metadata.annotations["batch.kubernetes.io/job-completion-index"]] = pod
    assert sorted(by_rank) == ["0", "1"]
    running = cluster.wait_phase("train-tj", "Running")
    assert running["status"]["backend"] == "trainjob"

    # The trainer's progress (written here as its rank 0 would) shows in the TrainJob's own status too.
    progress = {"step": 30, "totalSteps": 120, "loss": 1.25, "etaSeconds": 90.5, "updatedAt": "2026-12-01T10:00:00Z"}
    cluster.custom.patch_namespaced_custom_object_status(
        "finetune.dev", "v1alpha1", cluster.ns, "finetunejobs", "train-tj", {"status": {"progress": progress}}
    )
    trainer_status = wait_until(
        lambda: trainjob(cluster, "train-tj").get("status", {}).get("trainerStatus"),
        timeout=30,
        what="the TrainJob's trainerStatus",
    )
    assert trainer_status == {
        "progressPercentage": 25,
        "estimatedRemainingSeconds": 90,
        "metrics": [{"name": "loss", "value": "1.25"}],
        "lastUpdatedTime": "2026-12-01T10:00:00Z",
    }
    assert {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "name": "train-tj"} in running["status"][
        "children"
    ]

    for pod in pods:
        drive_pod(cluster.core, cluster.ns, pod.metadata.name, "Succeeded")
    done = cluster.wait_phase("train-tj", "Succeeded", timeout=90)
    assert done["status"]["completionTime"] >= done["status"]["startTime"]
    cluster.wait_event("train-tj", "TrainingSucceeded")


def test_a_permanent_failure_fails_the_run_at_once_with_its_reason(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("tj-bad-data", "trainjob", nodes=2))
    pods = cluster.wait_pods("tj-bad-data", 2)
    drive_pod(
        cluster.core,
        cluster.ns,
        pods[0].metadata.name,
        "Failed",
        exit_code=3,
        reason="Error",
        message='{"reason": "DataError", "message": "s3://data/train.json line 7: not valid JSON"}',
    )
    failed = cluster.wait_phase("tj-bad-data", "Failed", timeout=60)
    cond = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "DataError"
    assert "line 7" in cond["message"]
    assert jobset(cluster, "tj-bad-data")["status"].get("restarts", 0) == 0  # exit 3 is never retried
    cluster.wait_event("tj-bad-data", "DataError", "Warning")


def test_transient_failures_restart_within_the_backoff_limit_and_stop_beyond_it(
    cluster: Cluster, operator: Any
) -> None:
    cluster.apply(ftj("tj-flaky", "trainjob", nodes=2, runPolicy={"backoffLimit": 1}))
    first = cluster.wait_pods("tj-flaky", 2)
    drive_pod(cluster.core, cluster.ns, first[1].metadata.name, "Failed", exit_code=137, reason="Error")

    # JobSet recreates every node (torchrun needs all of them) and the run goes on.
    def restarted() -> list[client.V1Pod] | None:
        pods = cluster.pods("tj-flaky", "Running")
        fresh = [p for p in pods if p.metadata.uid not in {q.metadata.uid for q in first}]
        return fresh if len(fresh) == 2 else None

    second = wait_until(restarted, timeout=90, what="the JobSet to restart both nodes")
    assert jobset(cluster, "tj-flaky")["status"]["restarts"] == 1
    wait_until(
        lambda: (
            "restarted 1 time(s), last failure: container node in pod " in cluster.get("tj-flaky")["status"]["message"]
        ),
        timeout=30,
        what="the restart in the Running message",
    )

    drive_pod(cluster.core, cluster.ns, second[0].metadata.name, "Failed", exit_code=137, reason="OOMKilled")
    failed = cluster.wait_phase("tj-flaky", "Failed", timeout=90)
    cond = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "BackoffLimitExceeded"
    assert "runPolicy.backoffLimit (1)" in cond["message"]
    # The Pods that failed are gone with the restart; the message still says what happened to the last one.
    assert f"pod {second[0].metadata.name} ran out of memory" in cond["message"]
    # The run is stopped (its Pods go), the TrainJob stays for inspection.
    wait_until(lambda: trainjob(cluster, "tj-flaky")["spec"].get("suspend") is True, timeout=30, what="suspended")
    wait_until(lambda: not cluster.pods("tj-flaky", "Running"), timeout=60, what="the Pods to go")


def test_suspend_and_resume(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("tj-pausable", "trainjob", nodes=2))
    cluster.wait_pods("tj-pausable", 2)
    cluster.wait_phase("tj-pausable", "Running")
    cluster.patch("tj-pausable", {"spec": {"runPolicy": {"suspend": True}}})
    cluster.wait_phase("tj-pausable", "Suspended")
    wait_until(lambda: trainjob(cluster, "tj-pausable")["spec"]["suspend"] is True, timeout=30, what="suspend")
    wait_until(lambda: not cluster.pods("tj-pausable", "Running"), timeout=60, what="suspended pods to go away")
    cluster.patch("tj-pausable", {"spec": {"runPolicy": {"suspend": False}}})
    cluster.wait_pods("tj-pausable", 2, timeout=90)
    resumed = cluster.wait_phase("tj-pausable", "Running")
    assert trainjob(cluster, "tj-pausable")["spec"]["suspend"] is False
    assert resumed["status"]["startTime"]


def test_the_deadline_fails_the_run(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("tj-slow", "trainjob", nodes=1, runPolicy={"activeDeadlineSeconds": 3}))
    tj = wait_until(lambda: trainjob(cluster, "tj-slow"), timeout=30, what="TrainJob")
    assert tj["spec"]["activeDeadlineSeconds"] == 3
    failed = cluster.wait_phase("tj-slow", "Failed", timeout=90)
    cond = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "DeadlineExceeded", cond


def test_a_queued_trainjob_waits_suspended_with_the_kueue_label(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("tj-queued", "trainjob", nodes=1, scheduling={"queueName": "team-a"}))
    queued = cluster.wait_phase("tj-queued", "Suspended")
    assert queued["status"]["conditions"][-1]["reason"] == "Queued"
    tj = wait_until(lambda: trainjob(cluster, "tj-queued"), timeout=30, what="TrainJob")
    assert tj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert tj["spec"]["suspend"] is True
    assert not cluster.pods("tj-queued")


def test_auto_takes_the_trainjob_where_it_fits_and_another_backend_where_not(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("tj-auto", "auto", nodes=1))
    wait_until(lambda: trainjob(cluster, "tj-auto"), timeout=30, what="a TrainJob for backend auto")
    picked = wait_until(
        lambda: (b := cluster.get("tj-auto")).get("status", {}).get("backend") and b, timeout=30, what="backend"
    )
    assert picked["status"]["backend"] == "trainjob"
    assert cluster.wait_pods("tj-auto", 1)[0].spec.containers[0].name == "node"

    # A priority class a TrainJob cannot carry: auto passes over the TrainJob.
    cluster.apply(ftj("tj-auto-prio", "auto", nodes=1, scheduling={"priorityClassName": "team-high"}))
    other = wait_until(
        lambda: (b := cluster.get("tj-auto-prio")).get("status", {}).get("backend") and b, timeout=30, what="backend"
    )
    assert other["status"]["backend"] in ("pytorchjob", "job")
    selector = f"{JOB_LABEL}=tj-auto-prio"
    assert not cluster.custom.list_namespaced_custom_object(
        TRAINER, V1ALPHA1, cluster.ns, "trainjobs", label_selector=selector
    )["items"]


def test_a_missing_runtime_is_named_with_the_choices(cluster: Cluster, run_operator: Callable[..., Any]) -> None:
    env = {**operator_env(cluster.ns), "FTJ_TRAINJOB_RUNTIME": "not-installed"}
    with run_operator(namespaces=[cluster.ns], env=env):
        cluster.apply(ftj("tj-no-runtime", "trainjob", nodes=1))

        def condition() -> dict[str, Any] | None:
            conds = {c["type"]: c for c in cluster.get("tj-no-runtime").get("status", {}).get("conditions") or []}
            created = conds.get("Created")
            return created if created and created["reason"] == "TrainingRuntimeMissing" else None

        cond = wait_until(condition, timeout=30, what="the TrainingRuntimeMissing condition")
        assert cond["status"] == "False"
        assert "ClusterTrainingRuntime not-installed does not exist" in cond["message"]
        for choice in ("trainjob", "pytorchjob", "job", "auto"):
            assert choice in cond["message"]
        cluster.wait_event("tj-no-runtime", "TrainingRuntimeMissing", "Warning")


def test_an_unschedulable_replica_is_named_with_the_schedulers_message(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("tj-nowhere", "trainjob", nodes=2, scheduling={"nodeSelector": {"pool": "does-not-exist"}}))

    def unschedulable() -> dict[str, Any] | None:
        status = cluster.get("tj-nowhere").get("status") or {}
        return status if status.get("phase") == "Pending" and "pod tj-nowhere-node-0-" in status["message"] else None

    status = wait_until(unschedulable, timeout=60, what="the scheduler's verdict in the FineTuneJob's status")
    created = next(c for c in status["conditions"] if c["type"] == "Created")
    assert created["reason"] == "Unschedulable", created
    assert "node(s) didn't match Pod's node affinity/selector" in status["message"]


def test_ttl_deletes_a_finished_job_and_its_trainjob(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("tj-short-lived", "trainjob", nodes=1, runPolicy={"ttlSecondsAfterFinished": 1}))
    (pod,) = cluster.wait_pods("tj-short-lived", 1)
    drive_pod(cluster.core, cluster.ns, pod.metadata.name, "Succeeded")

    def gone() -> bool:
        try:
            trainjob(cluster, "tj-short-lived")
        except client.exceptions.ApiException as exc:
            return exc.status == 404
        return False

    wait_until(gone, timeout=90, what="the FineTuneJob and, through its ownerReference, the TrainJob to go")


def test_a_trainjob_whose_jobset_cannot_be_made_points_at_the_controllers_events(
    cluster: Cluster, run_operator: Callable[..., Any], workloads: Any, trainjob_runtime: str
) -> None:
    # A runtime JobSet's webhook refuses: a failure policy rule name it does not accept.
    broken = workloads.request("get", f"/apis/{TRAINER}/{V1ALPHA1}/clustertrainingruntimes/{trainjob_runtime}")
    name = f"broken-{cluster.ns[-6:]}"
    broken["metadata"] = {"name": name}
    broken["spec"]["template"]["spec"]["failurePolicy"]["rules"][0]["name"] = "permanent-failure"
    workloads.create(f"/apis/{TRAINER}/{V1ALPHA1}/clustertrainingruntimes", broken)
    try:
        env = {**operator_env(cluster.ns), "FTJ_TRAINJOB_RUNTIME": name, "FTJ_JOBSET_GRACE_SECONDS": "3"}
        with run_operator(namespaces=[cluster.ns], env=env):
            cluster.apply(ftj("tj-stuck", "trainjob", nodes=1))

            def stuck() -> dict[str, Any] | None:
                status = cluster.get("tj-stuck").get("status") or {}
                return (
                    status
                    if status.get("conditions")
                    and status["conditions"][0]["reason"] == "TrainJobResourcesCreationFailed"
                    else None
                )

            status = wait_until(stuck, timeout=60, what="the job to say its TrainJob gets no JobSet")
            assert status["phase"] == "Pending"
            assert "kubectl describe trainjob tj-stuck" in status["message"]
            created = next(c for c in status["conditions"] if c["type"] == "Created")
            assert created["status"] == "False"
            # Where it points, the controller says why.
            notes = [
                e.get("note", "")
                for e in workloads.request("get", f"/apis/events.k8s.io/v1/namespaces/{cluster.ns}/events")["items"]
                if e.get("reason") == "TrainJobResourcesCreationFailed" and e["regarding"]["name"] == "tj-stuck"
            ]
            assert any("invalid failure policy rule name 'permanent-failure'" in n for n in notes), notes
    finally:  # cluster-scoped: it would outlive the test's namespace
        workloads.request("delete", f"/apis/{TRAINER}/{V1ALPHA1}/clustertrainingruntimes/{name}")


def test_an_operator_restart_creates_no_second_trainjob(cluster: Cluster, run_operator: Callable[..., Any]) -> None:
    done = run_across_an_operator_restart(cluster, run_operator, ftj("tj-survivor", "auto", nodes=2), timeout=90)
    assert done["status"]["backend"] == "trainjob"  # auto's choice, kept across the restart
    selector = f"{JOB_LABEL}=tj-survivor"
    trainjobs = cluster.custom.list_namespaced_custom_object(
        TRAINER, V1ALPHA1, cluster.ns, "trainjobs", label_selector=selector
    )["items"]
    assert [t["metadata"]["name"] for t in trainjobs] == ["tj-survivor"]
    assert len(cluster.core.list_namespaced_config_map(cluster.ns, label_selector=selector).items) == 1
    assert not cluster.batch.list_namespaced_job(cluster.ns, label_selector=selector).items  # no other backend's
