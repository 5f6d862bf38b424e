"""The node agent does what the kubelet does for the Pod fields the workloads use: these Pods check it from inside.

Each Pod runs a small Python program (from the project's virtualenv, as every agent container does) that looks
at its own environment, volumes, hostname, names and credentials, and reports through the termination message,
which the agent copies into the Pod's status as the kubelet would.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from e2etest import AGENT_NODES, E2E_NODE_LABEL
from kubernetes import client

from support.controlplane import ControlPlane
from support.nodeagent import NodeAgentProcess, expand
from support.processes import wait_until

INSPECT = textwrap.dedent(
    """
    import json, os, socket, ssl, urllib.request
    report = {"env": {k: v for k, v in os.environ.items() if k.startswith("T_")}}
    report["hostname"] = socket.gethostname()
    report["own_address"] = socket.gethostbyname(socket.gethostname())
    report["config"] = open("/etc/config/renamed.txt").read()
    report["secret"] = open("/etc/secret/password").read()
    try:
        open("/etc/config/new", "w")
        report["read_only"] = False
    except OSError as exc:
        report["read_only"] = exc.errno == 30  # EROFS
    # The last mount on /dev/shm is the one the container sees.
    report["shm"] = [line.split()[2] for line in open("/proc/mounts") if line.split()[1] == "/dev/shm"][-1]
    open("/dev/shm/ftj-e2e-marker-" + os.environ["T_NAMESPACE"], "w").close()
    report["pid"] = os.getpid()
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    token = open(f"{sa}/token").read()
    context = ssl.create_default_context(cafile=f"{sa}/ca.crt")
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
    request = urllib.request.Request(
        f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews",
        data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, context=context) as response:
        user = json.load(response)["status"]["userInfo"]
    report["user"] = user["username"]
    report["bound_pod"] = user.get("extra", {}).get("authentication.kubernetes.io/pod-name")
    report["namespace_file"] = open(f"{sa}/namespace").read()
    open("/dev/termination-log", "w").write(json.dumps(report))
    """
)


@pytest.fixture
def core(k8s_api: client.ApiClient, agent_nodes: NodeAgentProcess) -> client.CoreV1Api:
    return client.CoreV1Api(k8s_api)


def pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    container = {
        "name": "main",
        "image": "not-pulled.invalid/any:tag",
        "command": ["python", "-c", script],
        **spec.pop("container", {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **spec.pop("metadata", {})},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {E2E_NODE_LABEL: "true"},
            "terminationGracePeriodSeconds": 30,
            "containers": [container],
            **spec,
        },
    }


def wait_pod(core: client.CoreV1Api, namespace: str, name: str, phases: tuple[str, ...]) -> client.V1Pod:
    def probe() -> client.V1Pod | None:
        found = core.read_namespaced_pod(name, namespace)
        return found if found.status.phase in phases else None

    result: client.V1Pod = wait_until(probe, timeout=60, what=f"pod {name} in {phases}")
    return result


def gone(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, namespace)
    except client.ApiException as exc:
        return exc.status == 404
    return False


def test_expand_follows_the_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$$(A) $(MISSING) $(", env) == "$(A) $(MISSING) $("
    assert expand("a$b $$ $()", env) == "a$b $ $()"


def test_a_pod_sees_its_env_volumes_hostname_and_its_own_service_account(
    core: client.CoreV1Api, control_plane: ControlPlane, namespace: str
) -> None:
    control_plane.create(
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"metadata": {"name": "settings"}, "data": {"color": "blue", "file.txt": "from a configmap"}},
    )
    control_plane.create(
        f"/api/v1/namespaces/{namespace}/secrets",
        {"metadata": {"name": "creds"}, "stringData": {"password": "hunter2"}},
    )
    manifest = pod(
        "inspect",
        INSPECT,
        metadata={"annotations": {"batch.kubernetes.io/job-completion-index": "3"}},
        container={
            "resources": {"limits": {"memory": "256Mi"}},
            "env": [
                {"name": "T_BASE", "value": "base"},
                {"name": "T_EXPANDED", "value": "$(T_BASE)-x-$$(T_BASE)"},
                {"name": "T_COLOR", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "color"}}},
                {"name": "T_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                {"name": "T_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "T_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "T_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {
                    "name": "T_INDEX",
                    "valueFrom": {
                        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
                    },
                },
                {
                    "name": "T_MEMORY_MI",
                    "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
                },
            ],
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/config", "readOnly": True},
                {"name": "secret", "mountPath": "/etc/secret", "readOnly": True},
                {"name": "shm", "mountPath": "/dev/shm"},
            ],
            "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False},
        },
        volumes=[
            {
                "name": "config",
                "configMap": {"name": "settings", "items": [{"key": "file.txt", "path": "renamed.txt"}]},
            },
            {"name": "secret", "secret": {"secretName": "creds"}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],
    )
    core.create_namespaced_pod(namespace, manifest)
    done = wait_pod(core, namespace, "inspect", ("Succeeded", "Failed"))
    (status,) = done.status.container_statuses
    assert done.status.phase == "Succeeded", status
    assert status.state.terminated.reason == "Completed"
    report = json.loads(status.state.terminated.message)
    assert done.spec.node_name in AGENT_NODES
    assert report["env"] == {
        "T_BASE": "base",
        "T_EXPANDED": "base-x-$(T_BASE)",
        "T_COLOR": "blue",
        "T_PASSWORD": "hunter2",
        "T_NAME": "inspect",
        "T_NAMESPACE": namespace,
        "T_IP": done.status.pod_ip,
        "T_INDEX": "3",
        "T_MEMORY_MI": "256",
    }
    assert done.status.pod_ip.startswith("127.")
    assert report["hostname"] == "inspect"
    assert report["own_address"] == done.status.pod_ip
    assert report["config"] == "from a configmap"
    assert report["secret"] == "hunter2"
    assert report["read_only"] is True
    assert report["shm"] == "tmpfs"
    assert not Path(f"/dev/shm/ftj-e2e-marker-{namespace}").exists(), "the memory emptyDir is the machine's /dev/shm"
    assert report["pid"] == 1  # the container's own PID namespace
    assert report["user"] == f"system:serviceaccount:{namespace}:default"
    assert report["bound_pod"] == ["inspect"]
    assert report["namespace_file"] == namespace


def test_a_failing_container_reports_its_exit_code_and_log_tail(core: client.CoreV1Api, namespace: str) -> None:
    script = "import sys\nfor i in range(200): print('line', i)\nsys.exit(3)"
    core.create_namespaced_pod(
        namespace, pod("fails", script, container={"terminationMessagePolicy": "FallbackToLogsOnError"})
    )
    done = wait_pod(core, namespace, "fails", ("Succeeded", "Failed"))
    terminated = done.status.container_statuses[0].state.terminated
    assert done.status.phase == "Failed"
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert terminated.message.rstrip().endswith("line 199")
    assert "line 100" not in terminated.message  # the tail only: 80 lines at most


def test_restart_policy_on_failure_restarts_the_container_in_place(core: client.CoreV1Api, namespace: str) -> None:
    script = textwrap.dedent(
        """
        import os, sys
        if not os.path.exists("/work/failed-once"):
            open("/work/failed-once", "w").close()
            sys.exit(7)
        """
    )
    manifest = pod(
        "flaky",
        script,
        restartPolicy="OnFailure",
        container={"volumeMounts": [{"name": "work", "mountPath": "/work"}]},
        volumes=[{"name": "work", "emptyDir": {}}],
    )
    core.create_namespaced_pod(namespace, manifest)
    done = wait_pod(core, namespace, "flaky", ("Succeeded", "Failed"))
    (status,) = done.status.container_statuses
    assert done.status.phase == "Succeeded"
    assert status.restart_count == 1
    assert status.last_state.terminated.exit_code == 7


@pytest.mark.parametrize(("handles_sigterm", "grace"), [(True, 30), (False, 2)], ids=["sigterm", "sigkill"])
def test_deletion_stops_the_container_and_removes_the_pod(
    core: client.CoreV1Api, namespace: str, tmp_path: Path, handles_sigterm: bool, grace: int
) -> None:
    script = textwrap.dedent(
        f"""
        import signal, sys, time
        def stop(*_):
            open("/claim/stopped", "w").write("SIGTERM")
            sys.exit(0)
        if {handles_sigterm}:
            signal.signal(signal.SIGTERM, stop)
        open("/claim/started", "w").write("yes")
        while True:
            time.sleep(1)
        """
    )
    directory = tmp_path / "shared"
    manifest = pod(
        "sleeper",
        script,
        terminationGracePeriodSeconds=grace,
        container={"volumeMounts": [{"name": "data", "mountPath": "/claim"}]},
        volumes=[{"name": "data", "hostPath": {"path": str(directory), "type": "DirectoryOrCreate"}}],
    )
    core.create_namespaced_pod(namespace, manifest)
    wait_until(lambda: (directory / "started").exists(), timeout=60, what="the container to start")
    started = time.monotonic()
    core.delete_namespaced_pod("sleeper", namespace)
    wait_until(lambda: gone(core, namespace, "sleeper"), timeout=grace + 30, what="the pod to be removed")
    elapsed = time.monotonic() - started
    if handles_sigterm:
        assert (directory / "stopped").read_text() == "SIGTERM"
        assert elapsed < 15, f"a container that exits on SIGTERM took {elapsed:.0f}s to go"
    else:
        assert not (directory / "stopped").exists()
        assert elapsed >= grace, f"killed after {elapsed:.1f}s, before the {grace}s grace period"


def test_pods_reach_each_other_by_their_dns_names(
    core: client.CoreV1Api, k8s_api: client.ApiClient, namespace: str
) -> None:
    """An Indexed Job with a headless Service: index 1 connects to ``ring-0.ring`` (and its qualified forms),
    which index 0 serves on its own address, as the torchrun rendezvous does."""
    script = textwrap.dedent(
        """
        import os, socket, time
        index = int(os.environ["JOB_COMPLETION_INDEX"])
        if index == 0:
            server = socket.create_server((socket.gethostbyname(socket.gethostname()), 24567))
            for _ in range(3):
                conn, _ = server.accept()
                conn.sendall(socket.gethostname().encode())
                conn.close()
        else:
            ns = os.environ["NS"]
            seen = []
            for name in ("ring-0.ring", f"ring-0.ring.{ns}.svc", f"ring-0.ring.{ns}.svc.cluster.local"):
                while True:
                    try:
                        with socket.create_connection((name, 24567), timeout=5) as conn:
                            seen.append(conn.recv(100).decode())
                        break
                    except OSError:
                        time.sleep(0.2)
            open("/dev/termination-log", "w").write(",".join(seen))
        """
    )
    template = pod("unused", script, subdomain="ring", container={"env": [{"name": "NS", "value": namespace}]})
    template["spec"].pop("terminationGracePeriodSeconds")
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "ring"},
            "spec": {"clusterIP": "None", "selector": {"app": "ring"}, "publishNotReadyAddresses": True},
        },
    )
    batch = client.BatchV1Api(k8s_api)
    batch.create_namespaced_job(
        namespace,
        {
            "metadata": {"name": "ring"},
            "spec": {
                "completionMode": "Indexed",
                "completions": 2,
                "parallelism": 2,
                "backoffLimit": 0,
                "template": {"metadata": {"labels": {"app": "ring"}}, "spec": template["spec"]},
            },
        },
    )

    def finished() -> client.V1Job | None:
        job = batch.read_namespaced_job("ring", namespace)
        return job if (job.status.succeeded or 0) + (job.status.failed or 0) >= 2 or job.status.failed else None

    job = wait_until(finished, timeout=90, what="the ring job to finish")
    assert job.status.succeeded == 2, job.status
    pods = core.list_namespaced_pod(namespace, label_selector="app=ring").items
    client_pod = next(p for p in pods if p.metadata.annotations["batch.kubernetes.io/job-completion-index"] == "1")
    assert client_pod.status.container_statuses[0].state.terminated.message == "ring-0,ring-0,ring-0"
