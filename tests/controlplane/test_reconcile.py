"""The reconcile loop tried the way users work: GitOps delete-and-re-apply, deleted children, operator restarts,
permanent and transient failures, and the trainer writing status while the operator does.

Each test is one defect that was reproduced against the real API server and controllers before the reconcile became
one level-triggered function per job with ownership by uid and server-side-apply status.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from ftjtest import GROUP, JOB_LABEL, PLURAL, VERSION, Cluster, ftj, operator_env
from kubernetes import client

from finetune_trainer.errors import RETRYABLE_EXIT_CODE
from support.kwok import drive_pod
from support.processes import free_port, wait_until

pytestmark = pytest.mark.usefixtures("workloads")
HOLD = "ftj.test/hold"
BACKENDS = ["job", "pytorchjob"]


def _needs(request: pytest.FixtureRequest, backend: str) -> None:
    if backend == "pytorchjob":
        request.getfixturevalue("training_operator")


def _controller_uid(obj: Any) -> str | None:
    refs = obj.metadata.owner_references or []
    return next((r.uid for r in refs if r.controller), None)


def _learning_rate(cluster: Cluster, name: str) -> float:
    cm = cluster.core.read_namespaced_config_map(f"{name}-config", cluster.ns)
    return float(json.loads(cm.data["trainer.json"])["training"]["learningRate"])


def _delete(cluster: Cluster, name: str, policy: str = "Background") -> None:
    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, cluster.ns, PLURAL, name, body=client.V1DeleteOptions(propagation_policy=policy)
    )


def _gone(read: Callable[[], Any]) -> bool:
    try:
        read()
    except client.exceptions.ApiException as exc:
        return exc.status == 404
    return False


def _condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == kind)


def _wait_reason(cluster: Cluster, name: str, reason: str, timeout: float = 60) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        body = cluster.get(name)
        return body if _condition(body, "Created").get("reason") == reason else None

    found: dict[str, Any] = wait_until(probe, timeout=timeout, what=f"{name} to report {reason}")
    return found


def test_recreated_job_waits_for_the_old_runs_children_and_then_uses_only_its_own(
    cluster: Cluster, operator: Any
) -> None:
    old = cluster.apply(ftj("regit", "job", nodes=1, training={"learningRate": 0.0001}))
    cluster.wait_pods("regit", 1)
    # A finalizer holds the old ConfigMap after its owner is gone, as a slow garbage collector or a backup tool would.
    cluster.core.patch_namespaced_config_map("regit-config", cluster.ns, {"metadata": {"finalizers": [HOLD]}})
    _delete(cluster, "regit")
    wait_until(lambda: _gone(lambda: cluster.get("regit")), timeout=30, what="the old FineTuneJob to go")
    new = cluster.apply(ftj("regit", "job", nodes=1, training={"learningRate": 0.0005}))

    waiting = _wait_reason(cluster, "regit", "ChildConflict")
    message = _condition(waiting, "Created")["message"]
    assert "ConfigMap/regit-config" in message
    assert old["metadata"]["uid"] in message
    wait_until(
        lambda: any(e.reason == "ChildConflict" for e in cluster.events("regit")), timeout=30, what="the Warning Event"
    )
    assert _gone(lambda: cluster.batch.read_namespaced_job("regit", cluster.ns))  # no workload on the old config

    cluster.core.patch_namespaced_config_map("regit-config", cluster.ns, {"metadata": {"finalizers": None}})
    cluster.wait_pods("regit", 1, timeout=90)
    uid = new["metadata"]["uid"]
    assert _controller_uid(cluster.core.read_namespaced_config_map("regit-config", cluster.ns)) == uid
    assert _controller_uid(cluster.batch.read_namespaced_job("regit", cluster.ns)) == uid
    assert _learning_rate(cluster, "regit") == 0.0005
    running = cluster.wait_phase("regit", "Running")
    assert _condition(running, "Created")["status"] == "True"


def test_a_status_write_for_a_deleted_job_never_lands_on_its_successor(
    cluster: Cluster, k8s_api: client.ApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reconcile that read the old object can still be writing when GitOps has already re-created the name; the old
    # run's phase landing on the new object would hide the new run's first phase change (and its Event).
    from finetune_operator import k8s

    monkeypatch.setattr(k8s, "_client", k8s_api)
    old = cluster.apply(ftj("stale", "job", nodes=1))
    _delete(cluster, "stale")
    wait_until(lambda: _gone(lambda: cluster.get("stale")), timeout=30, what="the old FineTuneJob to go")
    new = cluster.apply(ftj("stale", "job", nodes=1))

    with pytest.raises(k8s.StaleReadError):
        k8s.apply_status(cluster.ns, "stale", {"phase": "Running"}, read=old)
    assert "status" not in cluster.get("stale"), "the old run's status must not land on the new object"
    applied = k8s.apply_status(cluster.ns, "stale", {"phase": "Pending"}, read=new)
    assert applied is not None
    assert applied["status"]["phase"] == "Pending"
    assert applied["metadata"]["uid"] == new["metadata"]["uid"]
    # Any write since the read (here the trainer's progress) makes the read stale too: the reconcile reads again.
    cluster.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, cluster.ns, PLURAL, "stale", {"status": {"progress": {"step": 1}}}
    )
    with pytest.raises(k8s.StaleReadError):
        k8s.apply_status(cluster.ns, "stale", {"phase": "Running"}, read=applied)
    assert cluster.get("stale")["status"]["phase"] == "Pending"


def test_orphaned_children_are_never_adopted(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("orphans", "job", nodes=1, training={"learningRate": 0.0001}))
    cluster.wait_pods("orphans", 1)
    _delete(cluster, "orphans", policy="Orphan")
    wait_until(lambda: _gone(lambda: cluster.get("orphans")), timeout=30, what="the FineTuneJob to go")
    new = cluster.apply(ftj("orphans", "job", nodes=1, training={"learningRate": 0.0005}))

    waiting = _wait_reason(cluster, "orphans", "ChildConflict")
    assert "has no controller" in _condition(waiting, "Created")["message"]
    job = cluster.batch.read_namespaced_job("orphans", cluster.ns)
    assert _controller_uid(job) is None  # still the orphan: not adopted
    # A person clears the orphans away; the new run then creates its own.
    selector = f"{JOB_LABEL}=orphans"
    cluster.batch.delete_collection_namespaced_job(cluster.ns, label_selector=selector, propagation_policy="Background")
    cluster.core.delete_collection_namespaced_config_map(cluster.ns, label_selector=selector)
    cluster.core.delete_collection_namespaced_service_account(cluster.ns, label_selector=selector)
    cluster.rbac.delete_collection_namespaced_role(cluster.ns, label_selector=selector)
    cluster.rbac.delete_collection_namespaced_role_binding(cluster.ns, label_selector=selector)
    for svc in cluster.core.list_namespaced_service(cluster.ns, label_selector=selector).items:
        cluster.core.delete_namespaced_service(svc.metadata.name, cluster.ns)

    def owned_job() -> Any:
        try:
            job = cluster.batch.read_namespaced_job("orphans", cluster.ns)
        except client.exceptions.ApiException:
            return None
        return job if _controller_uid(job) == new["metadata"]["uid"] else None

    wait_until(owned_job, timeout=60, what="the new run's own Job")
    assert _learning_rate(cluster, "orphans") == 0.0005


def test_delete_and_recreate_at_once_converges_on_the_new_run(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("racer", "job", nodes=1, training={"learningRate": 0.0001}))
    cluster.wait_pods("racer", 1)
    _delete(cluster, "racer")
    new = wait_until(
        lambda: _try_create(cluster, ftj("racer", "job", nodes=1, training={"learningRate": 0.0005})),
        timeout=30,
        interval=0.05,
        what="the re-apply to be accepted",
    )
    uid = new["metadata"]["uid"]

    def converged() -> bool:
        try:
            cm = cluster.core.read_namespaced_config_map("racer-config", cluster.ns)
            job = cluster.batch.read_namespaced_job("racer", cluster.ns)
        except client.exceptions.ApiException:
            return False
        return _controller_uid(cm) == uid and _controller_uid(job) == uid

    wait_until(converged, timeout=90, what="children owned by the new run")
    assert _learning_rate(cluster, "racer") == 0.0005
    cluster.wait_phase("racer", "Running", timeout=90)


def _try_create(cluster: Cluster, body: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return cluster.apply(body)
    except client.exceptions.ApiException as exc:
        if exc.status == 409:  # the old object is still being deleted
            return None
        raise


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deleted_workload_is_recreated(
    request: pytest.FixtureRequest, cluster: Cluster, operator: Any, backend: str
) -> None:
    _needs(request, backend)
    name = f"lost-{backend}"
    cluster.apply(ftj(name, backend, nodes=1))
    cluster.wait_pods(name, 1)
    cluster.wait_phase(name, "Running")
    kind = "Job" if backend == "job" else "PyTorchJob"

    def read() -> Any:
        if backend == "job":
            return cluster.batch.read_namespaced_job(name, cluster.ns).metadata.uid
        return cluster.custom.get_namespaced_custom_object("kubeflow.org", "v1", cluster.ns, "pytorchjobs", name)[
            "metadata"
        ]["uid"]

    first = read()
    if backend == "job":
        cluster.batch.delete_namespaced_job(name, cluster.ns, propagation_policy="Background")
    else:
        cluster.custom.delete_namespaced_custom_object("kubeflow.org", "v1", cluster.ns, "pytorchjobs", name)

    def recreated() -> str | None:
        try:
            uid = read()
        except client.exceptions.ApiException:
            return None
        return uid if uid != first else None

    wait_until(recreated, timeout=30, what=f"the {kind} to be recreated")
    cluster.wait_phase(name, "Running", timeout=90)
    assert f"{kind}/{name}" in cluster.wait_event(name, "ChildRecreated").message


def test_finished_jobs_never_train_again_across_a_restart(cluster: Cluster, run_operator: Callable[..., Any]) -> None:
    env = operator_env(cluster.ns)
    with run_operator(namespaces=[cluster.ns], env=env):
        cluster.apply(ftj("finished", "job", nodes=1))
        cluster.apply(ftj("broken", "job", nodes=1))
        (ok,) = cluster.wait_pods("finished", 1)
        (bad,) = cluster.wait_pods("broken", 1)
        drive_pod(cluster.core, cluster.ns, ok.metadata.name, "Succeeded")
        drive_pod(cluster.core, cluster.ns, bad.metadata.name, "Failed", exit_code=3, reason="Error")
        cluster.wait_phase("finished", "Succeeded")
        cluster.wait_phase("broken", "Failed")
    for name in ("finished", "broken"):
        cluster.batch.delete_namespaced_job(name, cluster.ns, propagation_policy="Background")
        wait_until(
            lambda n=name: _gone(lambda: cluster.batch.read_namespaced_job(n, cluster.ns)), timeout=30, what="Job gone"
        )
    port = free_port()
    with run_operator(namespaces=[cluster.ns], env={**env, "FTJ_METRICS_PORT": str(port)}):
        # A job applied after the restart shows the operator has listed and handled everything before it.
        cluster.apply(ftj("witness", "job", nodes=1))
        cluster.wait_pods("witness", 1)
        cluster.wait_phase("witness", "Running")
        for name in ("finished", "broken"):
            assert _gone(lambda n=name: cluster.batch.read_namespaced_job(n, cluster.ns))
            assert not cluster.pods(name, "Running")
        assert cluster.get("finished")["status"]["phase"] == "Succeeded"
        assert cluster.get("broken")["status"]["phase"] == "Failed"
        # The restarted operator counts the jobs that finished before it started.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert 'finetune_jobs{phase="Succeeded"} 1.0' in text
        assert 'finetune_jobs{phase="Failed"} 1.0' in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_permanent_failure_is_never_retried(
    request: pytest.FixtureRequest, cluster: Cluster, operator: Any, backend: str
) -> None:
    _needs(request, backend)
    name = f"perm-{backend}"
    cluster.apply(ftj(name, backend, nodes=1, runPolicy={"backoffLimit": 3}))
    (pod,) = cluster.wait_pods(name, 1)
    report = json.dumps({"reason": "DataError", "message": "s3://data/train.json line 7: not valid JSON"})
    drive_pod(cluster.core, cluster.ns, pod.metadata.name, "Failed", exit_code=3, reason="Error", message=report)
    failed = cluster.wait_phase(name, "Failed", timeout=60)
    assert _condition(failed, "Failed")["reason"] == "DataError"
    created = cluster.core.list_namespaced_pod(cluster.ns, label_selector=f"{JOB_LABEL}={name}").items
    assert [p.metadata.name for p in created] == [pod.metadata.name]  # no replacement pod was ever made


@pytest.mark.parametrize("backend", BACKENDS)
def test_transient_failures_are_retried_up_to_the_backoff_limit(
    request: pytest.FixtureRequest, cluster: Cluster, operator: Any, backend: str
) -> None:
    _needs(request, backend)
    name = f"flaky-{backend}"
    cluster.apply(ftj(name, backend, nodes=1, runPolicy={"backoffLimit": 1}))
    (first,) = cluster.wait_pods(name, 1)
    # What the launcher exits with for anything a restart may fix.
    drive_pod(cluster.core, cluster.ns, first.metadata.name, "Failed", exit_code=RETRYABLE_EXIT_CODE, reason="Error")

    def replacement() -> Any:
        pods = [p for p in cluster.pods(name, "Running") if p.metadata.uid != first.metadata.uid]
        return pods[0] if pods else None

    second = wait_until(replacement, timeout=90, what="a replacement pod after a transient failure")
    assert cluster.get(name)["status"]["phase"] != "Failed"
    drive_pod(cluster.core, cluster.ns, second.metadata.name, "Failed", exit_code=RETRYABLE_EXIT_CODE, reason="Error")
    failed = cluster.wait_phase(name, "Failed", timeout=90)
    assert _condition(failed, "Failed")["reason"] == "BackoffLimitExceeded"
    wait_until(lambda: not cluster.pods(name, "Running"), timeout=60, what="no replica left running")


def test_one_event_per_phase_change_on_a_many_node_job(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("wide", "job", nodes=8))
    pods = cluster.wait_pods("wide", 8, timeout=90)
    cluster.wait_phase("wide", "Running", timeout=60)
    for pod in pods:
        drive_pod(cluster.core, cluster.ns, pod.metadata.name, "Succeeded")
    cluster.wait_phase("wide", "Succeeded", timeout=90)
    wait_until(
        lambda: any(e.reason == "TrainingSucceeded" for e in cluster.events("wide")), timeout=30, what="the Event"
    )
    reasons = [e.reason for e in cluster.events("wide")]
    assert reasons.count("TrainingSucceeded") == 1, reasons
    assert reasons.count("Training") == 1, reasons


def _apply_as_trainer(cluster: Cluster, name: str, status: dict[str, Any]) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name}, "status": status}
    cluster.custom.api_client.call_api(
        f"/apis/{GROUP}/{VERSION}/namespaces/{cluster.ns}/{PLURAL}/{name}/status",
        "PATCH",
        query_params=[("fieldManager", "finetune-trainer"), ("force", "true")],
        header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
        response_type="object",
    )


def test_a_trainer_condition_survives_the_operators_status_writes(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("shared-status", "job", nodes=2))
    pods = cluster.wait_pods("shared-status", 2)
    cluster.wait_phase("shared-status", "Running")
    trainer = {
        "type": "TrainerFailed",
        "status": "True",
        "reason": "DataError",
        "message": "s3://data/train.json line 7: not valid JSON",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    _apply_as_trainer(cluster, "shared-status", {"conditions": [trainer], "progress": {"step": 5}})
    # The operator writes phase and conditions twice more (Failed, after the pods end): the trainer's entry stays.
    for pod in pods:
        drive_pod(cluster.core, cluster.ns, pod.metadata.name, "Failed", exit_code=3, reason="Error")
    failed = cluster.wait_phase("shared-status", "Failed")
    assert _condition(failed, "TrainerFailed")["message"] == trainer["message"]
    assert failed["status"]["progress"]["step"] == 5
    managers = {m["manager"] for m in failed["metadata"]["managedFields"] if m.get("subresource") == "status"}
    assert {"finetune-operator", "finetune-trainer"} <= managers
