"""Render and lint Helm charts with the real Helm v3 CLI that ``tests/testbin/build.sh helm`` builds.

Helm runs with its own empty config, cache and data directories, so a developer's repositories, plugins and
registry logins never leak into a test; it never talks to a cluster (``template`` and ``lint`` are offline).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import testbin
from .requirements import unavailable


class HelmError(RuntimeError):
    """Helm exited non-zero; ``output`` holds what it printed (schema and template errors are there)."""

    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        super().__init__(f"helm {' '.join(argv)} exited {returncode}:\n{output}")
        self.returncode = returncode
        self.output = output


class Helm:
    """The pinned helm binary with an isolated home; raises testbin.MissingBinaryError when it is not built."""

    def __init__(self, home: Path | None = None) -> None:
        self.binary = testbin.binary("helm")
        self.home = home or Path(tempfile.mkdtemp(prefix="ftj-helm-"))
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
            # A stray KUBECONFIG must not matter: template and lint never contact a cluster.
            "KUBECONFIG": str(self.home / "no-kubeconfig"),
        }

    def run(self, *args: str) -> str:
        """Run helm with ``args``; its stdout, or HelmError with everything it printed."""
        proc = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=self.env, check=False, timeout=120
        )
        if proc.returncode != 0:
            raise HelmError(args, proc.returncode, proc.stdout + proc.stderr)
        return proc.stdout

    def _values_file(self, values: Mapping[str, Any]) -> Path:
        with tempfile.NamedTemporaryFile(
            "w", suffix=".json", prefix="values-", dir=self.home, delete=False, encoding="utf-8"
        ) as handle:
            json.dump(values, handle)  # JSON is YAML; no quoting surprises
        return Path(handle.name)

    def template_text(
        self,
        chart: Path,
        *,
        release: str = "ftj",
        namespace: str = "ftj-system",
        values: Mapping[str, Any] | None = None,
        include_crds: bool = False,
        api_versions: Sequence[str] = (),
    ) -> str:
        """`helm template` output as text; `api_versions` are what the cluster would serve (Capabilities)."""
        args = ["template", release, str(chart), "--namespace", namespace]
        if values:
            args += ["--values", str(self._values_file(values))]
        if include_crds:
            args.append("--include-crds")
        for api in api_versions:
            args += ["--api-versions", api]
        return self.run(*args)

    def template(
        self,
        chart: Path,
        *,
        release: str = "ftj",
        namespace: str = "ftj-system",
        values: Mapping[str, Any] | None = None,
        include_crds: bool = False,
        api_versions: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """`helm template` output as a list of objects (empty documents dropped)."""
        text = self.template_text(
            chart,
            release=release,
            namespace=namespace,
            values=values,
            include_crds=include_crds,
            api_versions=api_versions,
        )
        return [doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict)]

    def lint(self, chart: Path, *, values: Mapping[str, Any] | None = None, strict: bool = True) -> str:
        """`helm lint` (``--strict``: warnings fail too); its output, or HelmError."""
        args = ["lint", str(chart)]
        if strict:
            args.append("--strict")
        if values:
            args += ["--values", str(self._values_file(values))]
        return self.run(*args)


# What a cluster with Kubeflow Trainer v2 serves, for the chart's ClusterTrainingRuntime (rendered only there).
TRAINER_V2_API = "trainer.kubeflow.org/v1alpha1/ClusterTrainingRuntime"
CHART = Path(__file__).resolve().parents[2] / "helm" / "finetune-operator"


def chart_runtime(helm: Helm, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The chart's ClusterTrainingRuntime, rendered as `helm install` renders it on a cluster with Trainer v2."""
    return only(helm.template(CHART, values=values, api_versions=[TRAINER_V2_API]), "ClusterTrainingRuntime")


def available(home: Path) -> Helm:
    """The pinned Helm, or a loud skip (a failure under FTJ_REQUIRE_REAL=1) when it is not built."""
    try:
        return Helm(home)
    except testbin.MissingBinaryError as exc:
        reason = str(exc)
    unavailable(reason)


def find(objects: Sequence[Mapping[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """The rendered objects of one kind (and name)."""
    return [dict(o) for o in objects if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]


def only(objects: Sequence[Mapping[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single rendered object of one kind (and name); AssertionError when there are none or several."""
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}{f' {name}' if name else ''}, rendered {len(found)}"
    return found[0]


# Collection names of the kinds the chart renders (for POSTing rendered objects to the API server).
PLURALS = {
    "ServiceAccount": "serviceaccounts",
    "Service": "services",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "NetworkPolicy": "networkpolicies",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "ClusterTrainingRuntime": "clustertrainingruntimes",
}


def collection_path(obj: Mapping[str, Any]) -> str:
    """The API path that creates ``obj`` (one of the kinds in PLURALS), e.g. /apis/apps/v1/namespaces/x/deployments."""
    group_version = obj["apiVersion"]
    base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    namespace = obj["metadata"].get("namespace")
    plural = PLURALS[obj["kind"]]
    return f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
