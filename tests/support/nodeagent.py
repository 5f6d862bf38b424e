"""A node agent for the e2e tier: it plays the kubelet of Nodes of its own, and really runs their Pods' commands.

A real kubelet cannot run here (see docs/testing.md, "The e2e tier"), so this agent does, for the Pod fields the
project's workloads use, what a kubelet does:

* registers its Nodes (Ready, capacity cpu/memory/pods and optionally ``nvidia.com/gpu``) and renews their Leases;
* watches the Pods bound to them and runs every container's ``command`` + ``args`` (``$(VAR)`` expanded) as a
  process of this machine, from the project's virtualenv instead of the image (the image name is ignored), each
  in its own mount, UTS and PID namespaces (``support/podsandbox.py``) so that volume ``mountPath``s are the real
  paths; the environment includes ``valueFrom`` (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef) and
  ``KUBERNETES_SERVICE_HOST/PORT`` pointing at the test API server;
* volumes: configMap, secret, emptyDir (medium Memory is a tmpfs), projected (a ServiceAccount token from the
  TokenRequest API bound to the Pod, configMaps such as ``kube-root-ca.crt``, downwardAPI), downwardAPI,
  persistentVolumeClaim (one host directory per claim, shared by the Pods using it) and hostPath; ``readOnly``
  mounts are read-only;
* gives each Pod a loopback address of its own (127.x.y.z) as ``status.podIP``, and a per-Pod ``/etc/hosts`` in
  which the Service and Pod DNS names the workloads use (``<job>-master-0``, ``<job>-0.<service>``, also with
  ``.<namespace>.svc[.cluster.local]``) resolve to the Pods that back them, kept up to date as Pods come and go;
* writes Pod status as a kubelet does (Pending, Running with container states, Succeeded/Failed with exit codes,
  reasons and the termination message or the log tail), honours ``restartPolicy``; on deletion sends SIGTERM,
  SIGKILL after the grace period, reports the terminal phase and removes the Pod (grace period 0).

Each container's output goes to ``<workdir>/pods/<namespace>/<pod>-<uid>/<container>-<restart>.log``. Run it as
``python -m support.nodeagent --kubeconfig K --workdir W --node NAME ...`` (see :class:`NodeAgentProcess` for the
test-side handle). It enters a mount namespace of its own first, so its tmpfs volumes vanish with it, and every
container dies with it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from .controlplane import ControlPlane
    from .processes import ManagedProcess

log = logging.getLogger("nodeagent")

SANDBOX = Path(__file__).resolve().parent / "podsandbox.py"
# What stands in for the image: this checkout and the Python environment. A volume mounted over one of their parents
# (the `/tmp` emptyDir over a checkout cloned under /tmp, say) must not hide them, so the sandbox binds them back.
KEEP_VISIBLE = sorted({str(Path(__file__).resolve().parents[2]), sys.prefix, sys.base_prefix})
AGENT_LABEL = "ftj.test/node-agent"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10
NODE_STATUS_SECONDS = 30
DEFAULT_GRACE_SECONDS = 30
# What the kubelet keeps of a termination message, and of the log when FallbackToLogsOnError applies.
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
# The kubelet backs off 10 s doubling to 5 min between restarts; tests cannot wait that long.
RESTART_BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
START_ERROR_EXIT = 128
WATCH_TIMEOUT_SECONDS = 60
TERMINAL = ("Succeeded", "Failed")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- $(VAR) expansion, as k8s.io/kubernetes third_party/forked/golang/expansion --------------------------------


def expand(text: str, mapping: Mapping[str, str]) -> str:
    """Replace ``$(NAME)`` with ``mapping[NAME]``; ``$$`` is a literal ``$``; unknown references stay as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$" or i + 1 >= len(text):
            out.append(char)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            close = text.find(")", i + 2)
            if close == -1:
                out.append("$(")
                i += 2
            else:
                name = text[i + 2 : close]
                out.append(mapping[name] if name and name in mapping else text[i : close + 1])
                i = close + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


# -- the API -----------------------------------------------------------------------------------------------------


class NotFoundError(Exception):
    """The object does not exist (HTTP 404)."""


class Api:
    """Raw JSON calls with the admin kubeconfig (no client-side models: what the server says is what we get)."""

    def __init__(self, kubeconfig: str) -> None:
        from kubernetes import config

        self.client = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        self.server = self.client.configuration.host

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: Mapping[str, Any] | None = None,
    ) -> Any:
        from kubernetes.client import ApiException

        try:
            return self.client.call_api(
                path,
                method,
                query_params=list((query or {}).items()),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                response_type="object",
                _return_http_data_only=True,
                _request_timeout=30,
            )
        except ApiException as exc:
            if exc.status == 404:
                raise NotFoundError(f"{method} {path}: not found") from exc
            raise

    def watch(self, path: str, resource_version: str) -> Iterator[dict[str, Any]]:
        """Watch events of a collection from ``resource_version`` until the server ends the watch."""
        from kubernetes.watch.watch import iter_resp_lines

        response = self.client.call_api(
            path,
            "GET",
            query_params=[
                ("watch", "true"),
                ("resourceVersion", resource_version),
                ("allowWatchBookmarks", "true"),
                ("timeoutSeconds", str(WATCH_TIMEOUT_SECONDS)),
            ],
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
            _request_timeout=(10, WATCH_TIMEOUT_SECONDS + 30),
        )
        try:
            for line in iter_resp_lines(response):
                if line:
                    yield json.loads(line)
        finally:
            response.release_conn()

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        # A strategic merge patch, as the kubelet sends: conditions merge by type, containerStatuses by name.
        self.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            {"status": status},
            content_type="application/strategic-merge-patch+json",
        )


def informer(
    api: Api,
    path: str,
    on_event: Callable[[str, dict[str, Any]], None],
    stop: threading.Event,
) -> None:
    """List then watch ``path`` until ``stop``; on any trouble, list again (objects gone meanwhile are DELETED)."""
    known: dict[str, dict[str, Any]] = {}
    while not stop.is_set():
        try:
            listing = api.request("GET", path)
            version = listing["metadata"]["resourceVersion"]
            current = {o["metadata"]["uid"]: o for o in listing["items"]}
            for uid, obj in list(known.items()):
                if uid not in current:
                    on_event("DELETED", obj)
            known = current
            for obj in current.values():
                on_event("MODIFIED", obj)
            while not stop.is_set():
                for event in api.watch(path, version):
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        raise RuntimeError(f"watch {path}: {obj.get('message')}")
                    version = obj["metadata"]["resourceVersion"]
                    if kind == "BOOKMARK":
                        continue
                    uid = obj["metadata"]["uid"]
                    if kind == "DELETED":
                        known.pop(uid, None)
                    else:
                        known[uid] = obj
                    on_event(kind, obj)
                    if stop.is_set():
                        return
        except Exception as exc:
            if not stop.is_set():
                log.warning("informer %s: %s; listing again", path, exc)
                stop.wait(1)


# -- DNS: the per-Pod hosts file -----------------------------------------------------------------------------------


@dataclasses.dataclass
class PodAddress:
    namespace: str
    name: str
    labels: dict[str, str]
    hostname: str
    subdomain: str
    ip: str
    ready: bool = False


@dataclasses.dataclass
class ServiceInfo:
    namespace: str
    name: str
    selector: dict[str, str]
    headless: bool
    publish_not_ready: bool


def spec_init_containers(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(pod["spec"].get("initContainers") or [])


def pod_hostname(pod: Mapping[str, Any]) -> str:
    return str(pod["spec"].get("hostname") or pod["metadata"]["name"])[:63]


class Dns:
    """What the cluster DNS would answer, for the Pods this agent runs: rendered into each Pod's /etc/hosts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pods: dict[str, PodAddress] = {}
        self.services: dict[tuple[str, str], ServiceInfo] = {}

    def set_service(self, kind: str, svc: Mapping[str, Any]) -> None:
        meta, spec = svc["metadata"], svc.get("spec") or {}
        key = (meta["namespace"], meta["name"])
        with self.lock:
            if kind == "DELETED" or not spec.get("selector"):
                self.services.pop(key, None)
            else:
                self.services[key] = ServiceInfo(
                    meta["namespace"],
                    meta["name"],
                    dict(spec["selector"]),
                    spec.get("clusterIP") == "None",
                    bool(spec.get("publishNotReadyAddresses")),
                )

    def hosts(self, uid: str) -> str:
        with self.lock:
            me = self.pods[uid]
            lines = [
                "# Kubernetes-managed hosts file (the ftj node agent: Pod and Service names of the test cluster).",
                "127.0.0.1\tlocalhost",
                "::1\tlocalhost ip6-localhost ip6-loopback",
            ]
            own = [me.hostname]
            if me.subdomain:
                base = f"{me.hostname}.{me.subdomain}.{me.namespace}.svc"
                own = [f"{base}.cluster.local", base, f"{me.hostname}.{me.subdomain}", me.hostname]
            lines.append(f"{me.ip}\t{' '.join(own)}")
            seen = set(own)
            entries: list[tuple[str, list[str]]] = []
            for svc in sorted(self.services.values(), key=lambda s: (s.namespace, s.name)):
                backends = sorted(
                    (
                        p
                        for p in self.pods.values()
                        if p.namespace == svc.namespace
                        and (p.ready or svc.publish_not_ready)
                        and all(p.labels.get(k) == v for k, v in svc.selector.items())
                    ),
                    key=lambda p: p.name,
                )
                if not backends:
                    continue
                entries.append((backends[0].ip, self._names(svc.name, svc.namespace, me.namespace)))
                if svc.headless:
                    for pod in backends:
                        if pod.subdomain == svc.name and pod.hostname:
                            name = f"{pod.hostname}.{svc.name}"
                            entries.append((pod.ip, self._names(name, svc.namespace, me.namespace)))
            entries.append(("127.0.0.1", self._names("kubernetes", "default", me.namespace)))
            for ip, names in entries:
                fresh = [n for n in names if n not in seen]
                seen.update(fresh)
                if fresh:
                    lines.append(f"{ip}\t{' '.join(fresh)}")
            return "\n".join(lines) + "\n"

    @staticmethod
    def _names(name: str, namespace: str, own_namespace: str) -> list[str]:
        names = [f"{name}.{namespace}.svc.cluster.local", f"{name}.{namespace}.svc", f"{name}.{namespace}"]
        return [*names, name] if namespace == own_namespace else names


# -- the environment -----------------------------------------------------------------------------------------------


def _quantity(value: Any) -> Decimal:
    from kubernetes.utils.quantity import parse_quantity

    return Decimal(parse_quantity(str(value)))


class ConfigError(Exception):
    """The container cannot be configured yet (a missing Secret or key): the kubelet's CreateContainerConfigError."""


class Resolver:
    """Reads the objects a Pod refers to (ConfigMaps, Secrets), once per Pod start."""

    def __init__(self, api: Api, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self._cache: dict[tuple[str, str], dict[str, Any] | None] = {}

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        key = (kind, name)
        if key not in self._cache:
            try:
                self._cache[key] = self.api.request("GET", f"/api/v1/namespaces/{self.namespace}/{kind}/{name}")
            except NotFoundError:
                self._cache[key] = None
        return self._cache[key]

    def data(self, kind: str, name: str, optional: bool) -> dict[str, bytes]:
        obj = self.get(kind, name)
        if obj is None:
            if optional:
                return {}
            raise ConfigError(f"{kind[:-1]} {name!r} not found")
        if kind == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out

    def key(self, kind: str, ref: Mapping[str, Any]) -> str | None:
        data = self.data(kind, ref["name"], bool(ref.get("optional")))
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(f"key {ref['key']!r} not found in {kind[:-1]} {ref['name']!r}")
        return data[ref["key"]].decode()


def field_value(pod: Mapping[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    """A downward-API fieldRef of the Pod."""
    meta, spec = pod["metadata"], pod["spec"]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path == "metadata.labels":
        return "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get("labels") or {}).items()))
    if path == "metadata.annotations":
        return "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get("annotations") or {}).items()))
    if path not in values:
        raise ConfigError(f"unsupported fieldRef {path!r}")
    return str(values[path])


def resource_value(
    pod: Mapping[str, Any], container: str, ref: Mapping[str, Any], allocatable: Mapping[str, str]
) -> str:
    """A downward-API resourceFieldRef: a limit falls back to the node's allocatable, as the kubelet does."""
    name = ref.get("containerName") or container
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == name)
    kind, _, resource = ref["resource"].partition(".")
    resources = (spec.get("resources") or {}).get(kind) or {}
    raw = resources.get(resource)
    if raw is None:
        raw = allocatable.get(resource, "0") if kind == "limits" else "0"
    divisor = _quantity(ref.get("divisor") or "1")
    if divisor == 0:
        divisor = Decimal(1)
    return str(math.ceil(_quantity(raw) / divisor))


# -- volumes -------------------------------------------------------------------------------------------------------


def _write_items(directory: Path, data: Mapping[str, bytes], items: list[Any] | None, mode: int) -> None:
    chosen = [(i["key"], i["path"], i.get("mode", mode)) for i in items] if items else [(k, k, mode) for k in data]
    for key, rel, file_mode in chosen:
        if key not in data:
            raise ConfigError(f"key {key!r} not found")
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[key])
        path.chmod(file_mode)


@dataclasses.dataclass
class Volume:
    path: Path
    read_only: bool = False


# -- containers ----------------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    from .processes import _die_with_parent as die

    die()


class ContainerRun:
    """One run of one container: the sandbox process, its log, its termination-message file."""

    def __init__(self, directory: Path, name: str, restart: int) -> None:
        self.name = name
        self.restart = restart
        self.dir = directory / f"{name}-{restart}"
        self.dir.mkdir(parents=True)
        (self.dir / "rootfs").mkdir()
        self.log_path = directory / f"{name}-{restart}.log"
        self.termination_file = self.dir / "termination-log"
        self.termination_file.touch()
        self.start_error_file = self.dir / "start-error"
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = now()
        self.finished_at: str | None = None
        self.exit_code: int | None = None

    def start(self, python: str, spec: dict[str, Any]) -> None:
        spec_path = self.dir / "spec.json"
        spec_path.write_text(
            json.dumps(
                {**spec, "rootfs": str(self.dir / "rootfs"), "start_error_file": str(self.start_error_file)},
                indent=1,
            )
        )
        with self.log_path.open("ab") as out:
            self.popen = subprocess.Popen(
                [python, str(SANDBOX), str(spec_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.started_at = now()

    def poll(self) -> int | None:
        if self.exit_code is None and self.popen is not None:
            code = self.popen.poll()
            if code is not None:
                self.exit_code = code if code >= 0 else 128 - code
                self.finished_at = now()
        return self.exit_code

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)
            self.poll()

    def terminated(self, policy: str) -> dict[str, Any]:
        """The container's ``state.terminated``, with the message the kubelet would report."""
        code = self.exit_code if self.exit_code is not None else 137
        start_error = self.start_error_file.read_text(errors="replace") if self.start_error_file.exists() else ""
        message = self.termination_file.read_bytes()[:MAX_TERMINATION_MESSAGE].decode(errors="replace")
        if start_error:
            reason, message = "StartError", start_error
        else:
            reason = "Completed" if code == 0 else "Error"
            if not message.strip() and code != 0 and policy == "FallbackToLogsOnError":
                message = _log_tail(self.log_path)
        out: dict[str, Any] = {
            "exitCode": code,
            "reason": reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at or now(),
            "containerID": self.container_id,
        }
        if message:
            out["message"] = message
        return out

    @property
    def container_id(self) -> str:
        return f"agent://{self.dir.parent.name}/{self.name}-{self.restart}"


def _log_tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    lines = data.splitlines()[-FALLBACK_LOG_LINES:]
    return b"\n".join(lines)[-FALLBACK_LOG_BYTES:].decode(errors="replace")


# -- one Pod -------------------------------------------------------------------------------------------------------


class PodWorker(threading.Thread):
    """Runs one Pod from its binding to its removal, writing its status along the way."""

    def __init__(self, agent: NodeAgent, pod: dict[str, Any], ip: str) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.ip = ip
        self.dir = agent.workdir / "pods" / self.namespace / f"{self.pod_name}-{self.uid[:8]}"
        self.wake = threading.Condition()
        self.gone = False  # the Pod object no longer exists
        self.runs: dict[str, ContainerRun] = {}
        self.restarts: dict[str, int] = {}
        self.last_state: dict[str, dict[str, Any]] = {}
        self.waiting: dict[str, dict[str, str]] = {}
        self.backoff_until: dict[str, float] = {}
        self.done: dict[str, dict[str, Any]] = {}  # container -> its final terminated state
        self.init_done: dict[str, dict[str, Any]] = {}  # init container -> its last terminated state
        self.initialized = not spec_init_containers(pod)
        self.phase = "Pending"
        self.start_time = now()
        self.transitions: dict[str, tuple[str, str]] = {}
        self.tmpfs: list[Path] = []
        self.hosts_file = self.dir / "etc-hosts"
        self.hostname_file = self.dir / "etc-hostname"

    # state from the informer
    def update(self, pod: dict[str, Any] | None) -> None:
        with self.wake:
            if pod is None:
                self.gone = True
            else:
                self.pod = pod
            self.wake.notify_all()

    @property
    def spec(self) -> dict[str, Any]:
        return self.pod["spec"]  # type: ignore[no-any-return]

    def deleting(self) -> bool:
        return self.gone or bool(self.pod["metadata"].get("deletionTimestamp"))

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s/%s: agent error", self.namespace, self.pod_name)
            self._kill_all()
        finally:
            self._cleanup()
            self.agent.forget(self.uid)

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hostname_file.write_text(pod_hostname(self.pod) + "\n")
        self.agent.refresh_hosts()
        containers = [c["name"] for c in self.spec["containers"]]
        for name in containers:
            self.waiting[name] = {"reason": "ContainerCreating"}
        self._publish()
        volumes: dict[str, Volume] | None = None
        while volumes is None:
            if self.deleting():
                self._terminate()
                return
            try:
                volumes = self._volumes()
            except (ConfigError, NotFoundError) as exc:
                message = f"MountVolume.SetUp failed: {exc}"
                if self.waiting[containers[0]].get("message") != message:
                    log.info("pod %s/%s: %s", self.namespace, self.pod_name, message)
                    for name in containers:
                        self.waiting[name] = {"reason": "ContainerCreating", "message": message}
                    self._publish()
                with self.wake:
                    self.wake.wait(2)
        policy = self.spec.get("restartPolicy", "Always")
        for name in containers:
            self.waiting[name] = {"reason": "PodInitializing"} if not self.initialized else self.waiting[name]
        for container in self.spec.get("initContainers") or []:
            if not self._run_init(container, volumes, policy):
                if self.deleting():
                    self._terminate()
                else:
                    self._finish()
                return
        self.initialized = True
        for container in self.spec["containers"]:
            self._start(container, volumes)
        self._publish()
        while True:
            if self.deleting():
                self._terminate()
                return
            changed = False
            for container in self.spec["containers"]:
                name = container["name"]
                run = self.runs.get(name)
                if run is not None and name not in self.done and run.exit_code is None and run.poll() is not None:
                    changed = True
                    self._exited(container, run, policy)
                if name in self.backoff_until and time.monotonic() >= self.backoff_until[name]:
                    del self.backoff_until[name]
                    self._start(container, volumes)
                    changed = True
            if len(self.done) == len(self.spec["containers"]) and self.phase not in TERMINAL:
                self.phase = "Succeeded" if all(t["exitCode"] == 0 for t in self.done.values()) else "Failed"
                changed = True
            if changed:
                self._publish()
                self.agent.refresh_hosts()
            if self.phase in TERMINAL:
                self._finish()
                return
            with self.wake:
                self.wake.wait(0.2)

    def _run_init(self, container: dict[str, Any], volumes: dict[str, Volume], policy: str) -> bool:
        """Run one init container to completion (again, unless restartPolicy is Never); False if the Pod fails."""
        name = container["name"]
        while True:
            run = self._launch(container, volumes)
            self._publish()
            while run.poll() is None:
                if self.deleting():
                    return False
                with self.wake:
                    self.wake.wait(0.2)
            self.init_done[name] = run.terminated(container.get("terminationMessagePolicy", "File"))
            if run.exit_code == 0:
                self._publish()
                return True
            if policy == "Never":
                self.phase = "Failed"  # the app containers never start: they stay waiting, PodInitializing
                return False
            self.restarts[name] = self.restarts.get(name, 0) + 1
            self._publish()

    def _exited(self, container: dict[str, Any], run: ContainerRun, policy: str) -> None:
        name = container["name"]
        state = run.terminated(container.get("terminationMessagePolicy", "File"))
        log.info("pod %s/%s: container %s exited %s", self.namespace, self.pod_name, name, state["exitCode"])
        if policy == "Always" or (policy == "OnFailure" and state["exitCode"] != 0):
            count = self.restarts.get(name, 0)
            self.last_state[name] = {"terminated": state}
            self.restarts[name] = count + 1
            delay = RESTART_BACKOFF[min(count, len(RESTART_BACKOFF) - 1)]
            self.backoff_until[name] = time.monotonic() + delay
            self.waiting[name] = {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {delay:.0f}s restarting failed container={name} pod={self.pod_name}",
            }
        else:
            self.done[name] = state

    def _start(self, container: dict[str, Any], volumes: dict[str, Volume]) -> None:
        name = container["name"]
        try:
            self._launch(container, volumes)
            self.waiting.pop(name, None)
        except ConfigError as exc:
            # CreateContainerConfigError: the kubelet retries on its next sync.
            self.waiting[name] = {"reason": "CreateContainerConfigError", "message": str(exc)}
            self.backoff_until[name] = time.monotonic() + 2
        if self.phase == "Pending" and self.runs:
            self.phase = "Running"

    def _launch(self, container: dict[str, Any], volumes: dict[str, Volume]) -> ContainerRun:
        name = container["name"]
        env = self.agent.container_env(self.pod, container, self.ip)
        command = [expand(a, env) for a in [*(container.get("command") or []), *(container.get("args") or [])]]
        mounts: list[dict[str, Any]] = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            source = volume.path
            if mount.get("subPath"):
                source = source / mount["subPath"]
                source.mkdir(parents=True, exist_ok=True)
            mounts.append(
                {
                    "source": str(source),
                    "target": mount["mountPath"],
                    "readOnly": bool(mount.get("readOnly")) or volume.read_only,
                }
            )
        run = ContainerRun(self.dir, name, self.restarts.get(name, 0))
        mounts.append({"source": str(self.hosts_file), "target": "/etc/hosts"})
        mounts.append({"source": str(self.hostname_file), "target": "/etc/hostname"})
        mounts.append(
            {
                "source": str(run.termination_file),
                "target": container.get("terminationMessagePath") or "/dev/termination-log",
            }
        )
        run.start(
            self.agent.python,
            {
                "hostname": pod_hostname(self.pod),
                "mounts": mounts,
                "env": env,
                "command": command,
                "workingDir": container.get("workingDir") or "/",
                "keep": KEEP_VISIBLE,
            },
        )
        log.info("pod %s/%s: started %s: %s", self.namespace, self.pod_name, name, " ".join(command))
        self.runs[name] = run
        return run

    # volumes
    def _volumes(self) -> dict[str, Volume]:
        resolver = Resolver(self.agent.api, self.namespace)
        root = self.dir / "volumes"
        out: dict[str, Volume] = {}
        for volume in self.spec.get("volumes") or []:
            name = volume["name"]
            path = root / name
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]
                claim_dir = self.agent.claim_dir(self.namespace, claim["claimName"])
                claim_dir.mkdir(parents=True, exist_ok=True)
                out[name] = Volume(claim_dir, bool(claim.get("readOnly")))
                continue
            if "hostPath" in volume:
                host = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") == "DirectoryOrCreate":
                    host.mkdir(parents=True, exist_ok=True)
                out[name] = Volume(host)
                continue
            fresh = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in volume:
                empty = volume["emptyDir"] or {}
                if empty.get("medium") == "Memory" and fresh:
                    size = empty.get("sizeLimit")
                    options = "mode=1777" + (f",size={int(_quantity(size))}" if size else "")
                    from .podsandbox import MS_NODEV, MS_NOSUID, mount

                    mount("tmpfs", str(path), "tmpfs", MS_NOSUID | MS_NODEV, options)
                    self.tmpfs.append(path)
                else:
                    path.chmod(0o777)
            elif "configMap" in volume:
                source = volume["configMap"]
                data = resolver.data("configmaps", source["name"], bool(source.get("optional")))
                _write_items(path, data, source.get("items"), source.get("defaultMode", 0o644))
            elif "secret" in volume:
                source = volume["secret"]
                data = resolver.data("secrets", source["secretName"], bool(source.get("optional")))
                _write_items(path, data, source.get("items"), source.get("defaultMode", 0o644))
            elif "downwardAPI" in volume:
                self._downward(path, volume["downwardAPI"].get("items") or [], volume["downwardAPI"])
            elif "projected" in volume:
                self._projected(path, volume["projected"], resolver)
            else:
                raise ConfigError(f"volume {name!r}: this node agent does not support {sorted(volume)}")
            out[name] = Volume(path)
        return out

    def _downward(self, path: Path, items: list[dict[str, Any]], source: Mapping[str, Any]) -> None:
        mode = source.get("defaultMode", 0o644)
        data: dict[str, bytes] = {}
        chosen = []
        for item in items:
            if "fieldRef" in item:
                value = field_value(self.pod, item["fieldRef"]["fieldPath"], self.ip, self.agent.host_ip)
            else:
                ref = item["resourceFieldRef"]
                value = resource_value(self.pod, ref.get("containerName", ""), ref, self.agent.allocatable)
            data[item["path"]] = value.encode()
            chosen.append({"key": item["path"], "path": item["path"], "mode": item.get("mode", mode)})
        _write_items(path, data, chosen, mode)

    def _projected(self, path: Path, projected: Mapping[str, Any], resolver: Resolver) -> None:
        mode = projected.get("defaultMode", 0o644)
        for source in projected.get("sources") or []:
            if "serviceAccountToken" in source:
                token = source["serviceAccountToken"]
                target = path / token["path"]
                target.write_text(self._token(token.get("audience"), token.get("expirationSeconds", 3600)))
                target.chmod(mode)
            elif "configMap" in source:
                ref = source["configMap"]
                data = resolver.data("configmaps", ref["name"], bool(ref.get("optional")))
                _write_items(path, data, ref.get("items"), mode)
            elif "secret" in source:
                ref = source["secret"]
                data = resolver.data("secrets", ref["name"], bool(ref.get("optional")))
                _write_items(path, data, ref.get("items"), mode)
            elif "downwardAPI" in source:
                self._downward(path, source["downwardAPI"].get("items") or [], {"defaultMode": mode})
            else:
                raise ConfigError(f"projected source {sorted(source)} is not supported by this node agent")

    def _token(self, audience: str | None, seconds: int) -> str:
        """A ServiceAccount token bound to this Pod (TokenRequest), as the kubelet mounts it."""
        spec: dict[str, Any] = {
            "expirationSeconds": max(int(seconds), 600),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid},
        }
        if audience:
            spec["audiences"] = [audience]
        account = self.spec.get("serviceAccountName") or "default"
        result = self.agent.api.request(
            "POST",
            f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str(result["status"]["token"])

    # termination
    def _kill_all(self) -> None:
        for run in self.runs.values():
            run.kill()

    def _terminate(self) -> None:
        """Deletion: SIGTERM, SIGKILL after the grace period, terminal status, then remove the Pod."""
        meta = self.pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
        if self.gone:
            grace = min(int(grace), 2)  # already removed from the API (force delete): nobody waits for it
        running = [r for r in self.runs.values() if r.poll() is None]
        if running:
            log.info(
                "pod %s/%s: stopping %d container(s), grace %ss", self.namespace, self.pod_name, len(running), grace
            )
        for run in running:
            run.signal(signal.SIGTERM)
        deadline = time.monotonic() + int(grace)
        while any(r.poll() is None for r in running) and time.monotonic() < deadline:
            with self.wake:
                self.wake.wait(0.2)
        for run in running:
            if run.poll() is None:
                run.kill()
        for container in self.spec["containers"]:
            name = container["name"]
            last = self.runs.get(name)
            if name not in self.done and last is not None:
                self.done[name] = last.terminated(container.get("terminationMessagePolicy", "File"))
        self.backoff_until.clear()
        if not self.gone:
            if self.phase not in TERMINAL:
                codes = [self.done.get(c["name"], {}).get("exitCode") for c in self.spec["containers"]]
                self.phase = "Succeeded" if codes and all(c == 0 for c in codes) else "Failed"
                self._publish()
            with contextlib.suppress(NotFoundError):
                self.agent.api.request(
                    "DELETE",
                    f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}",
                    {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
                )
            log.info("pod %s/%s: deleted", self.namespace, self.pod_name)

    def _finish(self) -> None:
        """The Pod ended on its own: report it, then wait for its deletion (the kubelet keeps finished Pods)."""
        self._publish()
        self.agent.refresh_hosts()
        while not self.deleting():
            with self.wake:
                self.wake.wait(1)
        self._terminate()

    def _cleanup(self) -> None:
        from .podsandbox import MNT_DETACH, _libc

        for path in self.tmpfs:
            _libc.umount2(str(path).encode(), MNT_DETACH)
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)
        for run in self.runs.values():
            shutil.rmtree(run.dir / "rootfs", ignore_errors=True)

    # status
    def _condition(self, kind: str, status: bool, reason: str | None = None) -> dict[str, Any]:
        value = "True" if status else "False"
        previous = self.transitions.get(kind)
        if previous is None or previous[0] != value:
            self.transitions[kind] = (value, now())
        out = {"type": kind, "status": value, "lastProbeTime": None, "lastTransitionTime": self.transitions[kind][1]}
        if reason:
            out["reason"] = reason
        return out

    def ready(self) -> bool:
        return (
            self.phase == "Running"
            and not self.deleting()
            and all(
                c["name"] in self.runs and self.runs[c["name"]].exit_code is None and c["name"] not in self.waiting
                for c in self.spec["containers"]
            )
        )

    def _container_status(self, container: dict[str, Any]) -> dict[str, Any]:
        name = container["name"]
        run = self.runs.get(name)
        state: dict[str, Any] = {"waiting": None, "running": None, "terminated": None}
        if name in self.done:
            state["terminated"] = self.done[name]
        elif name in self.waiting:
            state["waiting"] = self.waiting[name]
        elif run is not None:
            state["running"] = {"startedAt": run.started_at}
        out: dict[str, Any] = {
            "name": name,
            "image": container.get("image", ""),
            "imageID": f"agent://{container.get('image', '')}",
            "ready": bool(state["running"]) and not self.deleting(),
            "started": bool(state["running"]),
            "restartCount": self.restarts.get(name, 0),
            "state": state,
            "lastState": self.last_state.get(name, {}),
        }
        if run is not None:
            out["containerID"] = run.container_id
        return out

    def status(self) -> dict[str, Any]:
        ready = self.ready()
        terminal = self.phase in TERMINAL
        reason = "PodCompleted" if terminal else ("ContainersNotReady" if not ready else None)
        status: dict[str, Any] = {
            "phase": self.phase,
            "hostIP": self.agent.host_ip,
            "hostIPs": [{"ip": self.agent.host_ip}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", not terminal),
                self._condition("Initialized", self.initialized),
                self._condition("ContainersReady", ready, reason),
                self._condition("Ready", ready, reason),
            ],
            "containerStatuses": [self._container_status(c) for c in self.spec["containers"]],
        }
        if spec_init_containers(self.pod):
            status["initContainerStatuses"] = [self._init_status(c) for c in spec_init_containers(self.pod)]
        return status

    def _init_status(self, container: dict[str, Any]) -> dict[str, Any]:
        name = container["name"]
        run = self.runs.get(name)
        state: dict[str, Any] = {"waiting": None, "running": None, "terminated": None}
        if run is not None and run.exit_code is None:
            state["running"] = {"startedAt": run.started_at}
        elif name in self.init_done:
            state["terminated"] = self.init_done[name]
        else:
            state["waiting"] = {"reason": "PodInitializing"}
        return {
            "name": name,
            "image": container.get("image", ""),
            "imageID": f"agent://{container.get('image', '')}",
            "ready": name in self.init_done and self.init_done[name]["exitCode"] == 0,
            "started": bool(state["running"]),
            "restartCount": self.restarts.get(name, 0),
            "state": state,
            "lastState": {},
        }

    def _publish(self) -> None:
        try:
            self.agent.api.patch_status(self.namespace, self.pod_name, self.status())
        except NotFoundError:
            with self.wake:
                self.gone = True
        except Exception as exc:
            log.warning("pod %s/%s: status update failed: %s", self.namespace, self.pod_name, exc)


# -- the agent -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AgentConfig:
    kubeconfig: str
    workdir: Path
    nodes: list[str]
    labels: dict[str, str]
    capacity: dict[str, str]
    image_env: dict[str, str]
    python: str


class NodeAgent:
    """The kubelet stand-in for ``config.nodes``: registration, leases, Pods, DNS."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.api = Api(config.kubeconfig)
        self.workdir = config.workdir
        self.python = config.python
        self.nodes = set(config.nodes)
        self.allocatable = dict(config.capacity)
        self.host_ip = "127.0.0.1"
        server = urlparse(self.api.server)
        self.api_host = server.hostname or "127.0.0.1"
        self.api_port = str(server.port or 443)
        self.stop = threading.Event()
        self.lock = threading.RLock()
        self.hosts_lock = threading.Lock()
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()
        self.dns = Dns()
        # Pod addresses: a random 127.a.b.0/24 so that two agents on one machine are unlikely to share one.
        self._ip_prefix = f"127.{random.randint(16, 250)}.{random.randint(0, 255)}"
        self._free_ips = [f"{self._ip_prefix}.{i}" for i in range(2, 255)]

    # nodes and leases
    def node_manifest(self, name: str) -> dict[str, Any]:
        stamp = now()
        conditions = [
            {"type": t, "status": "False", "reason": f"KubeletHas{r}", "message": m}
            for t, r, m in (
                ("MemoryPressure", "SufficientMemory", "kubelet has sufficient memory available"),
                ("DiskPressure", "NoDiskPressure", "kubelet has no disk pressure"),
                ("PIDPressure", "SufficientPID", "kubelet has sufficient PID available"),
            )
        ]
        conditions.append(
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "ftj node agent is posting ready"}
        )
        for condition in conditions:
            condition.update({"lastHeartbeatTime": stamp, "lastTransitionTime": stamp})
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    AGENT_LABEL: "true",
                    **self.config.labels,
                },
                "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            },
            "spec": {},
            "status": {
                "capacity": self.config.capacity,
                "allocatable": self.allocatable,
                "conditions": conditions,
                "addresses": [{"type": "InternalIP", "address": self.host_ip}, {"type": "Hostname", "address": name}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
                "nodeInfo": {
                    "machineID": name,
                    "systemUUID": name,
                    "bootID": name,
                    "kernelVersion": os.uname().release,
                    "osImage": "ftj node agent (processes on the test machine)",
                    "containerRuntimeVersion": "ftj-node-agent://1",
                    "kubeletVersion": "ftj-node-agent",
                    "kubeProxyVersion": "",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            },
        }

    def register(self) -> None:
        for name in sorted(self.nodes):
            manifest = self.node_manifest(name)
            try:
                node = self.api.request("POST", "/api/v1/nodes", manifest)
            except Exception:
                # Registered before (an earlier agent): take it over, as a restarted kubelet does.
                self.api.request(
                    "PATCH",
                    f"/api/v1/nodes/{name}",
                    {"metadata": {"labels": manifest["metadata"]["labels"]}, "spec": {"unschedulable": None}},
                    content_type="application/merge-patch+json",
                )
                node = self.api.request(
                    "PATCH",
                    f"/api/v1/nodes/{name}/status",
                    {"status": manifest["status"]},
                    content_type="application/strategic-merge-patch+json",
                )
            self._renew_lease(name, node["metadata"]["uid"])
            log.info("node %s registered", name)

    def _renew_lease(self, name: str, node_uid: str | None = None) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_now()}
        try:
            self.api.request("PATCH", f"{path}/{name}", {"spec": spec}, content_type="application/merge-patch+json")
        except NotFoundError:
            meta: dict[str, Any] = {"name": name, "namespace": LEASE_NAMESPACE}
            if node_uid:
                meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}]
            self.api.request("POST", path, {"metadata": meta, "spec": spec})

    def _heartbeat(self) -> None:
        last_status = time.monotonic()
        while not self.stop.wait(LEASE_RENEW_SECONDS):
            for name in sorted(self.nodes):
                try:
                    self._renew_lease(name)
                    if time.monotonic() - last_status >= NODE_STATUS_SECONDS:
                        stamp = now()
                        conditions = [
                            {"type": c["type"], "lastHeartbeatTime": stamp}
                            for c in self.node_manifest(name)["status"]["conditions"]
                        ]
                        self.api.request(
                            "PATCH",
                            f"/api/v1/nodes/{name}/status",
                            {"status": {"conditions": conditions}},
                            content_type="application/strategic-merge-patch+json",
                        )
                except Exception as exc:
                    log.warning("node %s heartbeat: %s", name, exc)
            if time.monotonic() - last_status >= NODE_STATUS_SECONDS:
                last_status = time.monotonic()

    # pods
    def claim_dir(self, namespace: str, claim: str) -> Path:
        return self.workdir / "claims" / namespace / claim

    def container_env(self, pod: dict[str, Any], container: dict[str, Any], pod_ip: str) -> dict[str, str]:
        """The container's environment: the image's (the agent's stand-in), the Service variables, then its own."""
        resolver = Resolver(self.api, pod["metadata"]["namespace"])
        service_env = {
            "KUBERNETES_SERVICE_HOST": self.api_host,
            "KUBERNETES_SERVICE_PORT": self.api_port,
            "KUBERNETES_SERVICE_PORT_HTTPS": self.api_port,
            "KUBERNETES_PORT": f"tcp://{self.api_host}:{self.api_port}",
        }
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                data = resolver.data("configmaps", ref["name"], bool(ref.get("optional")))
            else:
                ref = source["secretRef"]
                data = resolver.data("secrets", ref["name"], bool(ref.get("optional")))
            env.update({prefix + k: v.decode() for k, v in data.items()})
        for item in container.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = expand(item.get("value", ""), {**service_env, **env})
                continue
            source = item["valueFrom"]
            value: str | None
            if "fieldRef" in source:
                value = field_value(pod, source["fieldRef"]["fieldPath"], pod_ip, self.host_ip)
            elif "resourceFieldRef" in source:
                value = resource_value(pod, container["name"], source["resourceFieldRef"], self.allocatable)
            elif "secretKeyRef" in source:
                value = resolver.key("secrets", source["secretKeyRef"])
            elif "configMapKeyRef" in source:
                value = resolver.key("configmaps", source["configMapKeyRef"])
            else:
                raise ConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
            if value is not None:
                env[name] = value
        return {**self.config.image_env, "HOSTNAME": pod_hostname(pod), **service_env, **env}

    def on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        self._on_pod(kind, pod)
        # Any change of a Pod of ours (it became ready, say) may change what the names of the cluster resolve to.
        self.refresh_hosts()

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        uid = meta["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if spec.get("nodeName") not in self.nodes or uid in self.finished:
                return
            if kind == "DELETED":
                if worker is not None:
                    worker.update(None)
                return
            if worker is not None:
                worker.update(pod)
                return
            phase = (pod.get("status") or {}).get("phase")
            if phase in TERMINAL:
                return
            if not self._free_ips:
                log.error("pod %s/%s: no pod address left", meta["namespace"], meta["name"])
                return
            worker = PodWorker(self, pod, self._free_ips.pop(0))
            self.workers[uid] = worker
            self._register_address(worker)
        worker.start()

    def _register_address(self, worker: PodWorker) -> None:
        spec = worker.pod["spec"]
        with self.dns.lock:
            self.dns.pods[worker.uid] = PodAddress(
                worker.namespace,
                worker.pod_name,
                dict(worker.pod["metadata"].get("labels") or {}),
                pod_hostname(worker.pod),
                str(spec.get("subdomain") or ""),
                worker.ip,
                worker.ready(),
            )

    def forget(self, uid: str) -> None:
        with self.lock:
            worker = self.workers.pop(uid, None)
            self.finished.add(uid)
            if worker is not None:
                self._free_ips.append(worker.ip)
            with self.dns.lock:
                self.dns.pods.pop(uid, None)
        self.refresh_hosts()

    def on_service(self, kind: str, svc: dict[str, Any]) -> None:
        self.dns.set_service(kind, svc)
        self.refresh_hosts()

    def refresh_hosts(self) -> None:
        """Rewrite every running Pod's /etc/hosts that changed (in place: the containers bind-mount the file)."""
        with self.lock:
            workers = list(self.workers.values())
            for worker in workers:
                self._register_address(worker)
        with self.hosts_lock:  # informers and Pod workers all call this; one writer at a time
            self._write_hosts(workers)

    def _write_hosts(self, workers: list[PodWorker]) -> None:
        for worker in workers:
            try:
                text = self.dns.hosts(worker.uid)
            except KeyError:
                continue
            path = worker.hosts_file
            try:
                if path.exists() and path.read_text() == text:
                    continue
                with path.open("r+" if path.exists() else "w") as handle:
                    handle.write(text)
                    handle.truncate()
            except FileNotFoundError:
                continue  # the Pod's directory is being removed

    def run(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.register()
        threads = [
            threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True),
            threading.Thread(
                target=informer, args=(self.api, "/api/v1/services", self.on_service, self.stop), daemon=True
            ),
            threading.Thread(target=informer, args=(self.api, "/api/v1/pods", self.on_pod, self.stop), daemon=True),
        ]
        for thread in threads:
            thread.start()
        (self.workdir / "ready").write_text(now())
        self.stop.wait()
        log.info("stopping: killing every container")
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker._kill_all()


def _pairs(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {value!r}")
        out[key] = val
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m support.nodeagent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True, help="admin kubeconfig of the test control plane")
    parser.add_argument("--workdir", required=True, type=Path, help="pods, claims and logs go here")
    parser.add_argument("--node", action="append", required=True, help="a Node to register and run (repeatable)")
    parser.add_argument("--label", action="append", default=[], help="KEY=VALUE label for every Node")
    parser.add_argument("--cpu", default="8")
    parser.add_argument("--memory", default="32Gi")
    parser.add_argument("--pods", default="110")
    parser.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu capacity to advertise (none is used)")
    parser.add_argument("--image-env", action="append", default=[], help="KEY=VALUE for every container (the image)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the sandbox shim")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    # A mount namespace of our own before any thread exists: the tmpfs volumes mounted for Pods are then
    # invisible to the machine and disappear with this process, whatever way it ends.
    from .podsandbox import CLONE_NEWNS, MS_PRIVATE, MS_REC, _check, _libc, mount

    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    capacity = {"cpu": args.cpu, "memory": args.memory, "pods": args.pods, "ephemeral-storage": "100Gi"}
    if args.gpus:
        capacity["nvidia.com/gpu"] = str(args.gpus)
    agent = NodeAgent(
        AgentConfig(
            kubeconfig=args.kubeconfig,
            workdir=args.workdir.resolve(),
            nodes=args.node,
            labels=_pairs(args.label),
            capacity=capacity,
            image_env=_pairs(args.image_env),
            python=args.python,
        )
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())
    agent.run()
    return 0


# -- the test side -------------------------------------------------------------------------------------------------


class NodeAgentProcess:
    """Starts ``python -m support.nodeagent`` against a control plane and finds what its Pods left behind."""

    def __init__(
        self,
        plane: ControlPlane,
        workdir: Path,
        nodes: list[str],
        *,
        labels: Mapping[str, str] | None = None,
        image_env: Mapping[str, str] | None = None,
        gpus: int = 0,
    ) -> None:
        self.plane = plane
        self.workdir = workdir
        self.nodes = list(nodes)
        self.labels = dict(labels or {})
        self.image_env = dict(image_env or {})
        self.gpus = gpus
        self.log_path = workdir / "agent.log"
        self._process: ManagedProcess | None = None

    def start(self, timeout: float = 60) -> NodeAgentProcess:
        from .processes import ManagedProcess, wait_until

        tests_dir = Path(__file__).resolve().parents[1]
        argv = [
            sys.executable,
            "-m",
            "support.nodeagent",
            f"--kubeconfig={self.plane.kubeconfig}",
            f"--workdir={self.workdir}",
            f"--gpus={self.gpus}",
        ]
        argv += [f"--node={n}" for n in self.nodes]
        argv += [f"--label={k}={v}" for k, v in self.labels.items()]
        argv += [f"--image-env={k}={v}" for k, v in self.image_env.items()]
        pythonpath = os.pathsep.join(filter(None, [str(tests_dir), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._process = ManagedProcess("node-agent", argv, self.log_path, env=env, cwd=tests_dir).start()

        def ready() -> bool:
            if not (self.workdir / "ready").exists():
                return False
            for name in self.nodes:
                node = self.plane.request("get", f"/api/v1/nodes/{name}")
                conditions = node.get("status", {}).get("conditions", [])
                if not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    return False
            return True

        try:
            wait_until(ready, timeout=timeout, what=f"node agent nodes {self.nodes} Ready", watch=[self._process])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the agent (every container dies with it) and remove its Nodes from the cluster."""
        from kubernetes.client import ApiException

        if self._process is not None:
            self._process.stop(timeout=15)
        for name in self.nodes:
            with contextlib.suppress(ApiException):
                self.plane.request("delete", f"/api/v1/nodes/{name}")

    @property
    def process(self) -> ManagedProcess:
        """The agent's process (for ``wait_until(watch=...)``: a dead agent fails a wait at once)."""
        assert self._process is not None, "the node agent was never started"
        return self._process

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The host directory behind a PersistentVolumeClaim's volume."""
        return self.workdir / "claims" / namespace / claim

    def container_logs(self, namespace: str, pod_prefix: str = "") -> dict[str, Path]:
        """Every container log of the Pods in ``namespace`` whose name starts with ``pod_prefix``, by
        ``<pod>-<uid>/<container>-<restart>``."""
        base = self.workdir / "pods" / namespace
        if not base.is_dir():
            return {}
        return {
            f"{path.parent.name}/{path.stem}": path
            for path in sorted(base.glob(f"{pod_prefix}*/*.log"), key=lambda p: p.stat().st_mtime)
        }


if __name__ == "__main__":
    raise SystemExit(main())
