"""Helpers shared by the operator's control-plane tests: a FineTuneJob builder and typed clients with waits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubernetes import client

from support.kwok import drive_pod
from support.processes import wait_until

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
JOB_LABEL = "finetune.dev/job"


def ftj(name: str, backend: str, nodes: int = 2, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://models/base/"},
            "datasets": [{"uri": "s3://data/train.json"}],
            # The merge step has tests of its own (test_merge_phase.py); here training alone decides the outcome.
            "output": {"uri": f"s3://runs/{name}/", "merge": {"enabled": False}},
            "storage": {"endpoint": "http://minio:9000", "secretRef": {"name": "s3-credentials"}},
            "distribution": {"backend": backend, "nodes": nodes, "procsPerNode": 1},
            "image": "registry.invalid/finetune-trainer:test",
        },
    }
    body["spec"].update(spec)
    return body


class Cluster:
    """Typed clients for one test namespace, with the waits the lifecycle tests share."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.ns = namespace
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.rbac = client.RbacAuthorizationV1Api(api)

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)
        return result

    def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        return result

    def patch(self, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, patch)

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            body = self.get(name)
            return body if (body.get("status") or {}).get("phase") == phase else None

        try:
            found: dict[str, Any] = wait_until(probe, timeout=timeout, what=f"FineTuneJob {name} phase {phase}")
        except Exception as exc:
            raise AssertionError(f"{exc}; status now: {self.get(name).get('status')}") from exc
        return found

    def pods(self, name: str, phase: str | None = None) -> list[client.V1Pod]:
        pods = self.core.list_namespaced_pod(self.ns, label_selector=f"{JOB_LABEL}={name}").items
        return [p for p in pods if (phase is None or p.status.phase == phase) and not p.metadata.deletion_timestamp]

    def wait_pods(self, name: str, count: int, phase: str = "Running", timeout: float = 60) -> list[client.V1Pod]:
        def probe() -> list[client.V1Pod] | None:
            pods = self.pods(name, phase)
            return pods if len(pods) == count else None

        try:
            found: list[client.V1Pod] = wait_until(probe, timeout=timeout, what=f"{count} {phase} pods of {name}")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; pods now: {self.describe_pods(name)}") from exc
        return found

    def describe_pods(self, name: str) -> list[str]:
        """Each pod of the job with its phase and why it is not scheduled, for failure messages."""
        out = []
        for pod in self.core.list_namespaced_pod(self.ns, label_selector=f"{JOB_LABEL}={name}").items:
            waiting = [f"{c.reason}: {c.message}" for c in pod.status.conditions or [] if c.status != "True"]
            out.append(f"{pod.metadata.name} {pod.status.phase} on {pod.spec.node_name} {waiting}")
        return out

    def events(self, name: str) -> list[client.CoreV1Event]:
        events = self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items
        return [e for e in events if e.involved_object.kind == "FineTuneJob"]

    def wait_event(self, name: str, reason: str, kind: str | None = None, timeout: float = 30) -> client.CoreV1Event:
        """The FineTuneJob's Event with `reason` (and type `kind`), waited for: the operator posts an Event after the
        status write that a test may have just seen."""

        def found() -> client.CoreV1Event | None:
            matching = [e for e in self.events(name) if e.reason == reason and kind in (None, e.type)]
            return matching[0] if matching else None

        event: client.CoreV1Event = wait_until(found, timeout=timeout, what=f"a {kind or ''} {reason} Event of {name}")
        return event


def operator_env(namespace: str) -> dict[str, str]:
    return {
        "FTJ_RESYNC_SECONDS": "2",
        "FTJ_API_RECHECK_SECONDS": "2",
        "FTJ_METRICS_PORT": "0",
        "FTJ_LEASE_NAMESPACE": namespace,
        "FTJ_WATCH_NAMESPACES": namespace,
        "FTJ_LEASE_SECONDS": "6",
    }


def run_across_an_operator_restart(
    cluster: Cluster, run_operator: Callable[..., Any], manifest: dict[str, Any], timeout: float = 60
) -> dict[str, Any]:
    """Apply `manifest` under one operator until its 2 Pods run, stop it, and let a second operator see the Pods
    succeed and the job to Succeeded; the final FineTuneJob."""
    name = manifest["metadata"]["name"]
    env = operator_env(cluster.ns)
    with run_operator(namespaces=[cluster.ns], env=env):
        cluster.apply(manifest)
        pods = cluster.wait_pods(name, 2)
        cluster.wait_phase(name, "Running")
    with run_operator(namespaces=[cluster.ns], env=env):
        for pod in pods:
            drive_pod(cluster.core, cluster.ns, pod.metadata.name, "Succeeded")
        return cluster.wait_phase(name, "Succeeded", timeout=timeout)
