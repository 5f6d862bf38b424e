"""Fake GPU nodes and test-driven pod lifecycle on kwok.

kwok plays the kubelet of the fake Nodes (those annotated ``kwok.x-k8s.io/node: fake``; the e2e tier's node agent
runs Nodes of its own) in the test control plane, following the Stage
rules in ``kwok-stages.yaml``. A Pod bound to a fake node becomes Running by itself; a test moves it on by
setting the annotation ``kwok.ftj.test/phase`` (see :func:`drive_pod`), which kwok turns into a real pod status
update (phase, container states, exit codes) that controllers observe exactly as they would from a kubelet.
Putting ``kwok.ftj.test/phase: Pending`` in a pod template holds its pods in Pending until a test releases them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kubernetes import client

from .processes import wait_until

STAGES_FILE = Path(__file__).resolve().parent / "kwok-stages.yaml"
PHASE_ANNOTATION = "kwok.ftj.test/phase"
EXIT_CODE_ANNOTATION = "kwok.ftj.test/exit-code"
REASON_ANNOTATION = "kwok.ftj.test/reason"
MESSAGE_ANNOTATION = "kwok.ftj.test/message"
FAKE_NODE_LABEL = "ftj.test/fake-node"
# kwok manages only the Nodes with this annotation (--manage-nodes-with-annotation-selector).
MANAGED_ANNOTATION = "kwok.x-k8s.io/node"
MANAGED_VALUE = "fake"
GPU_RESOURCE = "nvidia.com/gpu"

PodPhase = Literal["Pending", "Running", "Succeeded", "Failed"]


def fake_node(name: str, *, gpus: int = 8, cpu: str = "64", memory: str = "512Gi", pods: int = 110) -> dict[str, Any]:
    """A Node manifest for kwok, with ``gpus`` of ``nvidia.com/gpu`` capacity."""
    resources = {"cpu": cpu, "memory": memory, "pods": str(pods), GPU_RESOURCE: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                FAKE_NODE_LABEL: "true",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            },
            "annotations": {MANAGED_ANNOTATION: MANAGED_VALUE, "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {},
        "status": {"capacity": resources, "allocatable": resources},
    }


def drive_pod(
    core: client.CoreV1Api,
    namespace: str,
    name: str,
    phase: PodPhase,
    *,
    exit_code: int | None = None,
    reason: str | None = None,
    message: str | None = None,
) -> None:
    """Ask kwok to move a Pod to ``phase``; for "Failed", with the container ``exit_code``/``reason``/``message``."""
    if phase != "Failed" and (exit_code is not None or reason is not None or message is not None):
        raise ValueError(f"exit_code/reason/message only apply to phase 'Failed', got phase {phase!r}")
    annotations: dict[str, str | None] = {
        PHASE_ANNOTATION: phase,
        EXIT_CODE_ANNOTATION: None if exit_code is None else str(exit_code),
        REASON_ANNOTATION: reason,
        MESSAGE_ANNOTATION: message,
    }
    core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": annotations}})


def wait_for_pod_phase(
    core: client.CoreV1Api, namespace: str, name: str, phase: PodPhase, *, timeout: float = 30
) -> client.V1Pod:
    """Wait until the Pod reports ``phase`` and return it."""

    def probe() -> client.V1Pod | None:
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status and pod.status.phase == phase else None

    result: client.V1Pod = wait_until(probe, timeout=timeout, what=f"pod {namespace}/{name} to be {phase}")
    return result
