"""finetune_operator.k8s without an API server: paths come from discovery read once per group-version, a kind not
served is a clear 404, and the raw request (finetune_trainer.kubeapi, shared with the trainer's StatusClient) works
with the kubernetes client installed, whichever transport it has (35/36 python-legacy, 37 the modern generator)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_operator import k8s
from finetune_trainer import kubeapi

DISCOVERY: dict[str, list[dict[str, Any]]] = {
    "/api/v1": [
        {"name": "pods", "kind": "Pod", "namespaced": True},
        {"name": "pods/status", "kind": "Pod", "namespaced": True},
        {"name": "configmaps", "kind": "ConfigMap", "namespaced": True},
        {"name": "events", "kind": "Event", "namespaced": True},
        {"name": "namespaces", "kind": "Namespace", "namespaced": False},
    ],
    "/apis/batch/v1": [{"name": "jobs", "kind": "Job", "namespaced": True}],
    "/apis/rbac.authorization.k8s.io/v1": [
        {"name": "rolebindings", "kind": "RoleBinding", "namespaced": True},
        {"name": "roles", "kind": "Role", "namespaced": True},
        {"name": "clusterroles", "kind": "ClusterRole", "namespaced": False},
    ],
}


class FakeServer:
    """Stands in for the raw request k8s makes (finetune_trainer.kubeapi.request): serves DISCOVERY (and whatever
    is added to it), 404 for any other GET of a group-version, an empty object for the rest; records every (method,
    url)."""

    def __init__(self) -> None:
        self.discovery = {gv: list(resources) for gv, resources in DISCOVERY.items()}
        self.requests: list[tuple[str, str]] = []
        self.missing: set[str] = set()  # object URLs that answer 404

    def __call__(self, api: Any, method: str, url: str, query: Any, headers: Any, body: Any) -> Any:
        self.requests.append((method, url))
        if method == "GET" and (url == "/api/v1" or (url.count("/") == 3 and url.startswith("/apis/"))):
            if url not in self.discovery:
                raise ApiException(status=404, reason="Not Found")
            return {"kind": "APIResourceList", "resources": self.discovery[url]}
        if url in self.missing:
            raise ApiException(status=404, reason="Not Found")
        return {"apiVersion": "v1", "kind": "Status"} if body is None else body


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer()
    monkeypatch.setattr(k8s, "_resources", {})
    monkeypatch.setattr(k8s, "_client", object())
    monkeypatch.setattr(k8s, "write_guard", None)
    monkeypatch.setattr(k8s, "request", fake)
    return fake


def _discovery_reads(server: FakeServer) -> list[str]:
    return [url for method, url in server.requests if method == "GET" and url.count("/") <= 3]


def test_paths_come_from_discovery_read_once_per_group_version(server: FakeServer) -> None:
    assert k8s.path("v1", "ConfigMap", "team") == "/api/v1/namespaces/team/configmaps"
    assert k8s.path("v1", "Pod", "team", "p-0", "status") == "/api/v1/namespaces/team/pods/p-0/status"
    assert k8s.path("v1", "Pod", None) == "/api/v1/pods"  # across all namespaces
    assert k8s.path("v1", "Namespace", "ignored", "team") == "/api/v1/namespaces/team"  # cluster-scoped
    assert k8s.path("batch/v1", "Job", "team", "j") == "/apis/batch/v1/namespaces/team/jobs/j"
    for _ in range(50):
        k8s.path("rbac.authorization.k8s.io/v1", "RoleBinding", "team", "rb")
        k8s.path("rbac.authorization.k8s.io/v1", "Role", "team", "r")
    assert k8s.resource("rbac.authorization.k8s.io/v1", "ClusterRole") == ("clusterroles", False)
    assert _discovery_reads(server) == ["/api/v1", "/apis/batch/v1", "/apis/rbac.authorization.k8s.io/v1"]


def test_a_kind_not_served_is_a_404_naming_api_version_and_kind(server: FakeServer) -> None:
    with pytest.raises(k8s.NotServedError, match=r"'PyTorchJob'.*'kubeflow.org/v1'") as raised:
        k8s.path("kubeflow.org/v1", "PyTorchJob", "team")
    assert raised.value.status == 404
    assert (raised.value.api_version, raised.value.kind) == ("kubeflow.org/v1", "PyTorchJob")
    with pytest.raises(k8s.NotServedError, match="'Deployment'"):  # served group-version, kind not in it
        k8s.path("batch/v1", "Deployment", "team")
    # Callers that treat a 404 as "absent" treat a missing API the same way, without a request of their own.
    assert k8s.get("kubeflow.org/v1", "PyTorchJob", "team", "j") is None
    assert k8s.delete("kubeflow.org/v1", "PyTorchJob", "team", "j") is False
    assert k8s.merge_patch("kubeflow.org/v1", "PyTorchJob", "team", "j", {"spec": {}}) is None
    assert all(url.count("/") <= 3 for _, url in server.requests), server.requests


def test_served_shares_the_cache_and_sees_an_api_installed_later(server: FakeServer) -> None:
    assert k8s.served("batch/v1", "jobs")
    k8s.path("batch/v1", "Job", "team")
    assert k8s.served("batch/v1", "jobs")
    assert _discovery_reads(server) == ["/apis/batch/v1"]

    assert not k8s.served("kubeflow.org/v1", "pytorchjobs")
    assert not k8s.served("kubeflow.org/v1", "pytorchjobs")  # not cached: asked each time
    server.discovery["/apis/kubeflow.org/v1"] = [{"name": "pytorchjobs", "kind": "PyTorchJob", "namespaced": True}]
    assert k8s.served("kubeflow.org/v1", "pytorchjobs")
    assert k8s.path("kubeflow.org/v1", "PyTorchJob", "team") == "/apis/kubeflow.org/v1/namespaces/team/pytorchjobs"
    assert _discovery_reads(server).count("/apis/kubeflow.org/v1") == 3


def test_a_create_answered_404_makes_served_ask_again(server: FakeServer) -> None:
    server.discovery["/apis/kubeflow.org/v1"] = [{"name": "pytorchjobs", "kind": "PyTorchJob", "namespaced": True}]
    assert k8s.served("kubeflow.org/v1", "pytorchjobs")
    # The training operator is uninstalled while the operator runs.
    del server.discovery["/apis/kubeflow.org/v1"]
    server.missing.add("/apis/kubeflow.org/v1/namespaces/team/pytorchjobs")
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "j", "namespace": "team"}}
    with pytest.raises(ApiException) as raised:
        k8s.create(job)
    assert raised.value.status == 404
    assert not k8s.served("kubeflow.org/v1", "pytorchjobs")


def test_threads_that_miss_at_once_share_one_discovery_read(server: FakeServer) -> None:
    start = threading.Barrier(8)

    def resolve() -> None:
        start.wait()
        k8s.path("v1", "ConfigMap", "team", "c")

    threads = [threading.Thread(target=resolve) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _discovery_reads(server) == ["/api/v1"]


# -- the raw request against the installed kubernetes client, over HTTP ----------------------------------------


class _Handler(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        parts = urlsplit(self.path)
        self.seen.append(
            {
                "method": self.command,
                "path": parts.path,
                "query": parse_qsl(parts.query),
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": self.rfile.read(length).decode() if length else "",
            }
        )
        if parts.path.endswith("/missing"):
            status, answer = 404, {"kind": "Status", "reason": "NotFound", "message": "missing not found"}
        elif parts.path.endswith("/empty"):
            status, answer = 200, None
        else:
            status, answer = 200, {"kind": "Thing", "metadata": {"name": "x"}, "n": 1.5}
        data = b"" if answer is None else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer  # noqa: N815  (http.server names them so)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_api() -> Iterator[tuple[client.ApiClient, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    handler = type("Handler", (_Handler,), {"seen": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{httpd.server_address[1]}"
    # 35 reads the token from api_key["authorization"], 36 and later from api_key["BearerToken"].
    configuration.api_key = {"authorization": "token-1", "BearerToken": "token-1"}
    configuration.api_key_prefix = {"authorization": "Bearer", "BearerToken": "Bearer"}
    api = client.ApiClient(configuration)
    try:
        yield api, seen
    finally:
        httpd.shutdown()
        httpd.server_close()


Request = Callable[..., Any]
# One function serves the operator (k8s) and the trainer (progress.StatusClient).
REQUESTS = [pytest.param(kubeapi.request, id="kubeapi")]


@pytest.mark.parametrize("request_", REQUESTS)
def test_get_decodes_json_and_sends_the_token(
    http_api: tuple[client.ApiClient, list[dict[str, Any]]], request_: Request
) -> None:
    api, seen = http_api
    query = [("labelSelector", "app=a,team in (x,y)")]
    answer = request_(api, "GET", "/api/v1/namespaces/t/pods", query, {"Accept": "application/json"})
    assert answer == {"kind": "Thing", "metadata": {"name": "x"}, "n": 1.5}
    assert seen[-1]["method"] == "GET"
    assert seen[-1]["path"] == "/api/v1/namespaces/t/pods"
    assert seen[-1]["query"] == query
    assert seen[-1]["headers"]["authorization"] == "Bearer token-1"


@pytest.mark.parametrize("request_", REQUESTS)
@pytest.mark.parametrize(
    "content_type", ["application/json", "application/merge-patch+json", "application/apply-patch+yaml"]
)
def test_writes_send_the_body_as_json(
    http_api: tuple[client.ApiClient, list[dict[str, Any]]], request_: Request, content_type: str
) -> None:
    api, seen = http_api
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}}
    query = [("fieldManager", "finetune-operator"), ("force", "true")]
    headers = {"Accept": "application/json", "Content-Type": content_type}
    assert request_(api, "PATCH", "/api/v1/namespaces/t/configmaps/c", query, headers, body)["kind"] == "Thing"
    assert seen[-1]["method"] == "PATCH"
    assert seen[-1]["headers"]["content-type"] == content_type
    assert json.loads(seen[-1]["body"]) == body
    assert seen[-1]["query"] == query


@pytest.mark.parametrize("request_", REQUESTS)
def test_a_refusal_is_an_api_exception_with_status_and_body(
    http_api: tuple[client.ApiClient, list[dict[str, Any]]], request_: Request
) -> None:
    api, _ = http_api
    with pytest.raises(ApiException) as raised:
        request_(api, "GET", "/api/v1/namespaces/t/pods/missing", [], {"Accept": "application/json"})
    assert raised.value.status == 404
    body = raised.value.body
    assert "missing not found" in (body.decode() if isinstance(body, bytes) else body)


@pytest.mark.parametrize("request_", REQUESTS)
def test_an_empty_answer_is_none(http_api: tuple[client.ApiClient, list[dict[str, Any]]], request_: Request) -> None:
    api, _ = http_api
    assert request_(api, "DELETE", "/api/v1/namespaces/t/pods/empty", [], {"Accept": "application/json"}) is None


def test_the_operator_calls_go_through_the_client(
    http_api: tuple[client.ApiClient, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """k8s.get end to end over HTTP: with the group-version discovered, one request."""
    api, seen = http_api
    monkeypatch.setattr(k8s, "_client", api)
    monkeypatch.setattr(k8s, "_resources", {"batch/v1": {"Job": ("jobs", True)}})
    assert k8s.get("batch/v1", "Job", "t", "j") == {"kind": "Thing", "metadata": {"name": "x"}, "n": 1.5}
    assert [s["path"] for s in seen] == ["/apis/batch/v1/namespaces/t/jobs/j"]
