"""kube-apiserver audit logging for tests: which requests a user made, and which the API server refused.

Pass :func:`apiserver_args` to ``ControlPlane.start(..., apiserver_args=...)``; the log records every request by a
ServiceAccount (metadata only, no bodies), so a test can compare what an operator really did with the RBAC rules
it was given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
"""


def apiserver_args(directory: Path) -> tuple[list[str], Path]:
    """kube-apiserver flags that audit every ServiceAccount request to ``directory/audit.log``; (flags, log)."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / "audit-policy.yaml"
    policy.write_text(POLICY)
    log = directory / "audit.log"
    return [
        f"--audit-policy-file={policy}",
        f"--audit-log-path={log}",
        "--audit-log-format=json",
        # Written synchronously, so a request is in the file by the time its response has arrived.
        "--audit-log-mode=blocking",
        "--audit-log-maxbackup=0",
    ], log


@dataclass(frozen=True, order=True)
class Request:
    """One resource request, reduced to what RBAC decides on."""

    api_group: str
    resource: str  # with the subresource, as RBAC names it: "finetunejobs/status"
    verb: str
    namespace: str  # "" for cluster-scoped requests and requests across all namespaces
    code: int


def requests(log: Path, username: str) -> list[Request]:
    """Every resource request by ``username`` that was answered (non-resource URLs such as discovery are left out).

    A watch appears once when it starts and again when it ends; callers compare sets.
    """
    out: list[Request] = []
    if not log.exists():
        return out
    for line in log.read_text().splitlines():
        event = json.loads(line)
        # A watch completes only when it ends; its ResponseStarted event says it was allowed and began.
        if event.get("user", {}).get("username") != username or event.get("stage") not in (
            "ResponseComplete",
            "ResponseStarted",
        ):
            continue
        ref = event.get("objectRef")
        if not ref:
            continue
        resource = ref.get("resource", "")
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        out.append(
            Request(
                api_group=ref.get("apiGroup", ""),
                resource=resource,
                verb=event["verb"],
                namespace=ref.get("namespace", ""),
                code=int(event.get("responseStatus", {}).get("code", 0)),
            )
        )
    return out
