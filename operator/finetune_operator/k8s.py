"""The one module that talks to the Kubernetes API: idempotent creates, reads, patches, discovery, events.

Everything else in the operator is pure. Calls are safe to repeat: a create that finds the object already there
returns the existing object, and transient trouble surfaces as `TransientError` for the handlers to retry.

Paths come from the API server's discovery: the first request for a kind of a group-version reads that
group-version's resource list (/api/v1, /apis/<group>/<version>) once for the process, and every later path is built
from the cached list, so discovery adds no requests per reconcile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from finetune_operator.api import API_VERSION_FULL, KIND
from finetune_trainer.kubeapi import request
from finetune_trainer.timefmt import now_rfc3339

log = logging.getLogger(__name__)


class TransientError(Exception):
    """The API server could not answer now (network, 5xx, 429, conflict); try again later."""


class StaleReadError(TransientError):
    """A write made from a read of an object that has changed since (or was replaced): read again and redo it."""


class NotServedError(ApiException):  # type: ignore[misc]  # kubernetes 35 ships no type information
    """The API server serves no such kind in that apiVersion (its CRD is not installed, say). It is a 404, as the
    request itself would have been: get() answers None, delete() False, and create() raises it."""

    def __init__(self, api_version: str, kind: str) -> None:
        super().__init__(status=404, reason=f"the API server serves no kind {kind!r} in apiVersion {api_version!r}")
        self.api_version = api_version
        self.kind = kind


_lock = threading.Lock()
_client: client.ApiClient | None = None
# Called before every write. Leader election installs a check here, so that a replica whose lease may already have
# passed to another (it was frozen, say) never writes again; see finetune_operator.leader.
write_guard: Callable[[], None] | None = None
OPERATOR_MANAGER = "finetune-operator"
EVENT_ATTEMPTS = 3

# Discovery, per group-version: kind -> (plural, namespaced) of each resource it serves (subresources left out).
# Read once per process; read again only when a kind or plural asked for is missing from it (installed since), and
# dropped when a create there answers 404 (the API may have gone). A group-version not served is never cached.
Resources = dict[str, tuple[str, bool]]
_resources: dict[str, Resources] = {}
_discovery_lock = threading.Lock()


def api_client() -> client.ApiClient:
    """One shared client: in-cluster credentials when running in a Pod, the kubeconfig otherwise."""
    global _client
    with _lock:
        if _client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            _client = client.ApiClient()
        return _client


def remove_credential_files() -> None:
    """Remove the temporary files the Kubernetes client wrote a kubeconfig's inline certificates and key into
    (outside a Pod). It removes them at interpreter exit; a process that ends with os._exit must call this first,
    or the private key stays behind in $TMPDIR."""
    from kubernetes.config import kube_config

    cleanup = getattr(kube_config, "_cleanup_temp_files", None)
    if cleanup is not None:
        cleanup()


def _base(api_version: str) -> str:
    return f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"


def _discover(api_version: str, has: Callable[[Resources], bool]) -> Resources | None:
    """The resources `api_version` serves (None: not served), from the cache when it has what `has` looks for,
    else read from the API server (and cached)."""
    cached = _resources.get(api_version)
    if cached is not None and has(cached):
        return cached
    with _discovery_lock:  # one read for the threads that miss at once (at start-up, every handler thread does)
        cached = _resources.get(api_version)
        if cached is not None and has(cached):
            return cached
        try:
            result = _call("GET", _base(api_version))
        except ApiException as exc:
            if exc.status == 404:
                _resources.pop(api_version, None)
                return None
            raise
        found: Resources = {}
        for res in result.get("resources") or []:
            if "/" not in res["name"]:  # pods/status and the like are subresources, not kinds
                found.setdefault(res["kind"], (res["name"], bool(res.get("namespaced"))))
        _resources[api_version] = found
        return found


def resource(api_version: str, kind: str) -> tuple[str, bool]:
    """(plural, namespaced) of a kind, from discovery; NotServedError when the API server does not serve it."""
    found = _discover(api_version, lambda resources: kind in resources)
    if found is None or kind not in found:
        raise NotServedError(api_version, kind)
    return found[kind]


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    """The API path of a kind's collection, of one object, or of its subresource. With no namespace, a namespaced
    kind's collection is the one across all namespaces; a namespace given for a cluster-scoped kind is ignored."""
    plural, namespaced = resource(api_version, kind)
    out = _base(api_version)
    if namespace and namespaced:
        out += f"/namespaces/{namespace}"
    out += f"/{plural}"
    if name:
        out += f"/{name}"
    if sub:
        out += f"/{sub}"
    return out


def _call(
    method: str,
    url: str,
    body: Any = None,
    content_type: str = "application/json",
    query: list[tuple[str, Any]] | None = None,
) -> Any:
    if method != "GET" and write_guard is not None:
        write_guard()
    headers = {"Accept": "application/json", "Content-Type": content_type}
    try:
        return request(api_client(), method, url, query or [], headers, body)
    except ApiException as exc:
        if exc.status in (409, 429) or (exc.status or 0) >= 500:
            raise TransientError(f"{method} {url}: {exc.status} {exc.reason}") from exc
        raise
    except OSError as exc:  # connection refused/reset: the API server is restarting or unreachable
        raise TransientError(f"{method} {url}: {exc}") from exc


def get(api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = _call("GET", path(api_version, kind, namespace, name))
        return result
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def create(obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create an object; when it already exists, return the existing one. Returns (object, created)."""
    meta = obj["metadata"]
    url = path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
    try:
        return _call("POST", url, obj), True
    except TransientError as exc:
        if not (isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 409):
            raise
    except ApiException as exc:
        if exc.status == 404:  # the namespace, or the API itself, is gone: served() asks the API server again
            _resources.pop(obj["apiVersion"], None)
        raise
    existing = get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
    if existing is None:  # deleted between the conflict and the read: the next attempt creates it
        raise TransientError(f"{obj['kind']} {meta['name']} vanished after a conflict")
    return existing, False


def merge_patch(
    api_version: str, kind: str, namespace: str | None, name: str, patch: dict[str, Any], sub: str | None = None
) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = _call(
            "PATCH", path(api_version, kind, namespace, name, sub), patch, "application/merge-patch+json"
        )
        return result
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def apply_status(
    namespace: str,
    name: str,
    status: dict[str, Any],
    manager: str = OPERATOR_MANAGER,
    *,
    read: dict[str, Any] | None = None,
    api_version: str = API_VERSION_FULL,
    kind: str = KIND,
) -> dict[str, Any] | None:
    """Server-side apply of the FineTuneJob's status (or another kind's) as `manager`: the fields given are this
    manager's from now on,
    fields it set before and leaves out now are removed, and fields other managers own (the trainer's progress,
    checkpoints and conditions) are never touched. None when the object is gone.

    `read` is the object the status was computed from: its resourceVersion is the write's precondition, so a status
    computed from a read that is no longer current raises StaleReadError instead of landing. That includes a FineTuneJob
    deleted and re-created under the same name since the read (the status subresource ignores a uid in the body, and
    resourceVersions are never reused)."""
    metadata: dict[str, Any] = {"name": name}
    if read is not None:
        metadata["resourceVersion"] = read["metadata"]["resourceVersion"]
    body = {"apiVersion": api_version, "kind": kind, "metadata": metadata, "status": status}
    query = [("fieldManager", manager), ("force", "true")]
    try:
        # The client sends an apply patch as JSON, which is YAML.
        result: dict[str, Any] = _call(
            "PATCH",
            path(api_version, kind, namespace, name, "status"),
            body,
            "application/apply-patch+yaml",
            query,
        )
        return result
    except TransientError as exc:
        if read is not None and isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 409:
            raise StaleReadError(f"{namespace}/{name} changed since it was read") from exc
        raise
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def controller_uid(obj: dict[str, Any]) -> str | None:
    """The uid in the object's controller ownerReference (None when nothing controls it)."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def delete(api_version: str, kind: str, namespace: str | None, name: str) -> bool:
    try:
        _call("DELETE", path(api_version, kind, namespace, name), {"propagationPolicy": "Background"})
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def list_objects(api_version: str, kind: str, namespace: str | None, selector: str = "") -> list[dict[str, Any]]:
    """List objects in a namespace (or the whole cluster with None), optionally by label selector."""
    query = [("labelSelector", selector)] if selector else []
    result = _call("GET", path(api_version, kind, namespace), query=query)
    items: list[dict[str, Any]] = result.get("items") or []
    for item in items:  # list items carry no apiVersion/kind of their own
        item.setdefault("apiVersion", api_version)
        item.setdefault("kind", kind)
    return items


def served(api_version: str, plural: str) -> bool:
    """Whether the API server serves a resource (discovery), e.g. served('kubeflow.org/v1', 'pytorchjobs'). It shares
    path()'s discovery cache: a resource found served is not asked about again, one not found is asked about each
    time (it may have been installed since)."""

    def has(resources: Resources) -> bool:
        return any(p == plural for p, _ in resources.values())

    found = _discover(api_version, has)
    return found is not None and has(found)


def replace(obj: dict[str, Any]) -> dict[str, Any]:
    """PUT with the object's resourceVersion: fails with TransientError when someone else wrote in between."""
    meta = obj["metadata"]
    result: dict[str, Any] = _call(
        "PUT", path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]), obj
    )
    return result


def post_event(involved: dict[str, Any], kind: str, reason: str, message: str, component: str) -> None:
    """Post a core/v1 Event about an object; a failure to post is logged, never raised (Events are best effort)."""
    meta = involved["metadata"]
    now = now_rfc3339()
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": involved.get("apiVersion"),
            "kind": involved.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": kind,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    for attempt in range(EVENT_ATTEMPTS):
        try:
            _call("POST", path("v1", "Event", meta["namespace"]), event)
            return
        except TransientError as exc:  # e.g. 429 while the API server (re)initialises: worth a short retry
            if attempt + 1 == EVENT_ATTEMPTS:
                log.warning("could not post Event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc)
            else:
                time.sleep(0.5 * (attempt + 1))
        except ApiException as exc:
            log.warning("could not post Event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc)
            return
