"""Operator behaviour beyond one job: leader election between replicas, a cluster without Kubeflow, metrics,
and server-side dry-run of every rendered object."""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from ftjtest import Cluster, ftj, operator_env
from kubernetes import client
from kubernetes.client.rest import ApiException

from finetune_operator import k8s
from finetune_operator.cli import render_file
from support import testbin
from support.processes import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(
    p
    for p in (ROOT / "examples").rglob("*.yaml")
    if any(isinstance(d, dict) and d.get("kind") == "FineTuneJob" for d in yaml.safe_load_all(p.read_text()))
)


def _handled(log: str, name: str) -> bool:
    """Whether the operator whose log this is created the job's children."""
    return bool(re.search(rf"/{name}: created ConfigMap/", log))


def _condition_reason(cluster: Cluster, name: str) -> str | None:
    conds = {c["type"]: c for c in (cluster.get(name).get("status") or {}).get("conditions") or []}
    return conds.get("Created", {}).get("reason")


@pytest.mark.usefixtures("workloads")
def test_two_replicas_never_both_act(cluster: Cluster, run_operator: Callable[..., Any]) -> None:
    env = operator_env(cluster.ns)
    first = run_operator(namespaces=[cluster.ns], env=env).start()
    second = run_operator(namespaces=[cluster.ns], env=env).start(wait=False)
    lease = client.CoordinationV1Api(cluster.core.api_client)
    holder = lease.read_namespaced_lease("finetune-operator-leader", cluster.ns).spec.holder_identity

    cluster.apply(ftj("while-first-leads", "job", nodes=1))
    cluster.wait_pods("while-first-leads", 1)
    wait_until(lambda: _handled(first.log(10**8), "while-first-leads"), timeout=30, what="the leader to handle the job")
    assert not _handled(second.log(10**8), "while-first-leads")
    assert ": created " not in second.log()  # the standby has not created anything at all

    first.stop()  # a clean stop releases the Lease; the standby takes over
    second.wait_alive(timeout=60)
    new_holder = lease.read_namespaced_lease("finetune-operator-leader", cluster.ns).spec.holder_identity
    assert new_holder != holder
    cluster.apply(ftj("after-failover", "job", nodes=1))
    cluster.wait_pods("after-failover", 1)
    wait_until(lambda: _handled(second.log(10**8), "after-failover"), timeout=30, what="the new leader to act")
    assert len(cluster.batch.list_namespaced_job(cluster.ns).items) == 2


@pytest.mark.usefixtures("workloads")
def test_a_frozen_leader_stops_before_a_standby_takes_over(
    cluster: Cluster, run_operator: Callable[..., Any], tmp_path: Path
) -> None:
    # The kubeconfig carries its certificates and key inline: the Kubernetes client writes them to temporary files,
    # which the first operator's own TMPDIR shows.
    temporary = tmp_path / "first-tmp"
    temporary.mkdir()
    env = operator_env(cluster.ns)
    first = run_operator(namespaces=[cluster.ns], env={**env, "TMPDIR": str(temporary)}).start()
    assert list(temporary.iterdir()), "the client wrote no credential files: this test checks nothing"
    second = run_operator(namespaces=[cluster.ns], env=env).start(wait=False)
    os.kill(first.pid, signal.SIGSTOP)  # a leader that stalls (a frozen node, a long GC) without losing its lease
    try:
        cluster.apply(ftj("during-freeze", "job", nodes=1))
        second.wait_alive(timeout=60)  # the standby took the expired lease
        wait_until(lambda: _handled(second.log(10**8), "during-freeze"), timeout=30, what="the new leader to act")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    # Woken after its renew deadline, the old leader stops itself instead of acting beside the new one.
    wait_until(lambda: not first.running(), timeout=30, what="the frozen leader to stop itself")
    assert not _handled(first.log(10**8), "during-freeze")
    assert "not renewed within" in first.log(10**8) or "lost lease" in first.log(10**8)
    assert len(cluster.batch.list_namespaced_job(cluster.ns).items) == 1
    # It stopped at once, without Python's exit handlers, but not before removing the copies of its credentials.
    assert list(temporary.iterdir()) == []


def test_missing_kubeflow_api_gives_an_explanatory_condition(tmp_path: Path, control_plane: Any) -> None:
    # A control plane of its own: the session's may have the PyTorchJob CRD installed by another test.
    from support.controlplane import ControlPlane
    from support.operator_runner import OperatorRunner

    plane = ControlPlane.start(tmp_path / "plane")
    try:
        plane.apply_crd_files([ROOT / "crds" / "finetune.dev_finetunejobs.yaml"])
        with plane.api_client() as api:
            client.CoreV1Api(api).create_namespace({"metadata": {"name": "team"}})
            cluster = Cluster(api, "team")
            with OperatorRunner(
                plane.kubeconfig, tmp_path / "operator.log", namespaces=["team"], env=operator_env("team")
            ):
                cluster.apply(ftj("needs-kubeflow", "pytorchjob", nodes=2))

                def condition() -> dict[str, Any] | None:
                    status = cluster.get("needs-kubeflow").get("status") or {}
                    conds = {c["type"]: c for c in status.get("conditions") or []}
                    created = conds.get("Created")
                    return created if created and created["reason"] == "PyTorchJobAPIMissing" else None

                cond = wait_until(condition, timeout=60, what="the PyTorchJobAPIMissing condition")
                assert cond["status"] == "False"
                assert "install the Kubeflow training operator" in cond["message"]
                # Every other choice is named: the other two backends, and auto.
                assert "to trainjob (Kubeflow Trainer v2), pytorchjob" in cond["message"]
                assert "or job (built-in, needs nothing installed), or auto" in cond["message"]
                assert cluster.get("needs-kubeflow")["status"]["phase"] == "Pending"
                cluster.wait_event("needs-kubeflow", "PyTorchJobAPIMissing", "Warning")

                # The same for a TrainJob on a cluster without Kubeflow Trainer v2; auto falls back to the Job.
                cluster.apply(ftj("needs-trainer", "trainjob", nodes=1))
                cluster.apply(ftj("anything-goes", "auto", nodes=1))
                cluster.wait_event("needs-trainer", "TrainJobAPIMissing", "Warning")
                message = cluster.get("needs-trainer")["status"]["message"]
                assert "install Kubeflow Trainer v2" in message
                assert "pytorchjob (Kubeflow training operator v1) or job" in message
                picked = wait_until(
                    lambda: cluster.get("anything-goes").get("status", {}).get("backend"), timeout=30, what="auto"
                )
                assert picked == "job"
                assert cluster.batch.read_namespaced_job("anything-goes", "team")

                # The training operator is installed later: the waiting job is picked up without a restart.
                plane.apply_crd_files([testbin.training_operator_crd()])
                wait_until(
                    lambda: cluster.custom.get_namespaced_custom_object(
                        "kubeflow.org", "v1", "team", "pytorchjobs", "needs-kubeflow"
                    ),
                    timeout=60,
                    what="the PyTorchJob once its API is served",
                )
                wait_until(
                    lambda: _condition_reason(cluster, "needs-kubeflow") not in ("PyTorchJobAPIMissing", None),
                    timeout=30,
                    what="the condition to move on",
                )
    finally:
        plane.stop()


@pytest.mark.usefixtures("workloads")
def test_metrics_count_jobs_by_phase(cluster: Cluster, run_operator: Callable[..., Any]) -> None:
    port = free_port()
    env = {**operator_env(cluster.ns), "FTJ_METRICS_PORT": str(port)}
    with run_operator(namespaces=[cluster.ns], env=env):
        cluster.apply(ftj("measured", "job", nodes=1))
        cluster.wait_pods("measured", 1)
        cluster.wait_phase("measured", "Running")

        def scrape() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
            return text if 'finetune_jobs{phase="Running"} 1.0' in text else None

        text = wait_until(scrape, timeout=30, what="metrics to show one Running job")
        count = re.search(r"^finetune_children_created_seconds_count (\S+)$", text, re.M)
        assert count is not None
        assert float(count.group(1)) >= 1
        assert "finetune_reconcile_errors_total" in text


@pytest.mark.usefixtures("training_operator", "trainer_v2", "trainjob_runtime")
@pytest.mark.parametrize("backend", ["pytorchjob", "job", "trainjob"])
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_server_side_dry_run_accepts_every_rendered_object(
    k8s_api: client.ApiClient, namespace: str, path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every child, the TrainJob included: Trainer v2's webhook checks it against the chart's runtime (the patched
    replicated job and container exist, no PET_* env), JobSet's and the CRDs' schemas the rest."""
    monkeypatch.setattr(k8s, "_client", k8s_api)  # k8s.path() asks this API server for each kind's resource name
    objects, errors = render_file(path, namespace, backend)
    if backend == "trainjob" and errors:  # a field a TrainJob cannot carry: refused before anything is rendered
        assert "cannot be used with distribution.backend trainjob" in errors[0]
        return
    assert errors == []
    for obj in objects:
        obj["metadata"]["namespace"] = namespace
        try:
            k8s_api.call_api(
                k8s.path(obj["apiVersion"], obj["kind"], namespace),
                "POST",
                query_params=[("dryRun", "All"), ("fieldValidation", "Strict")],
                header_params={"Content-Type": "application/json", "Accept": "application/json"},
                body=obj,
                auth_settings=["BearerToken"],
                response_type="object",
                _return_http_data_only=True,
            )
        except ApiException as exc:
            raise AssertionError(f"{obj['kind']} {obj['metadata']['name']} refused: {exc.body}") from exc
