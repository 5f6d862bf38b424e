"""The Helm chart as the real Helm engine renders it: defaults, watchNamespaces, monitoring, NetworkPolicy, the
values schema, every value documented, and the Deployment's environment read back by the operator's settings."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.settings import Settings
from support.helm import Helm, HelmError, chart_runtime, collection_path, find, only

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "finetune-operator"
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
RELEASE, RELEASE_NS = "ftj", "ftj-system"
FULLNAME = "ftj-finetune-operator"
POD_LABELS = {
    "app.kubernetes.io/name": "finetune-operator",
    "app.kubernetes.io/instance": RELEASE,
    "app.kubernetes.io/component": "operator",
}
CRD_RULE = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "verbs": ["list", "watch"],
}
NAMESPACE_RULE = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
NAMESPACED: dict[str, Any] = {"watchNamespaces": ["team-a", "team-b"]}
EVERYTHING_ON: dict[str, Any] = {
    **NAMESPACED,
    "networkPolicy": {"enabled": True, "metricsFrom": [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}]},
    "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
}


def render(helm: Helm, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return helm.template(CHART, release=RELEASE, namespace=RELEASE_NS, values=values)


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = only(objects, "Deployment", FULLNAME)
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = main
    return result


def env_values(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(objects)["env"] if "value" in e}


def test_chart_crds_are_byte_identical_to_the_repository_crds() -> None:
    repo = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert repo, "no CRDs in crds/"
    assert sorted(chart) == sorted(repo), "the chart's crds/ must hold exactly the repository's CRD files"
    stale = [name for name in repo if chart[name] != repo[name]]
    assert not stale, f"helm/finetune-operator/crds/ is stale for {stale}: copy them from crds/ (make crds)"


@pytest.mark.parametrize(
    "values",
    [{}, EVERYTHING_ON, {"replicaCount": 1, "leaderElection": {"enabled": False}, "rbac": {"create": False}}],
    ids=["defaults", "namespaced-monitoring-networkpolicy", "single-replica-no-rbac"],
)
def test_chart_passes_helm_lint_strict(helm: Helm, values: dict[str, Any]) -> None:
    out = helm.lint(CHART, values=values)
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def test_defaults_render_a_cluster_wide_ha_operator(helm: Helm) -> None:
    objects = render(helm)
    kinds = Counter(o["kind"] for o in objects)
    assert kinds == Counter(
        {
            "Deployment": 1,
            "ServiceAccount": 1,
            "ClusterRole": 2,  # the operator's, and reading its one ClusterTrainingRuntime
            "ClusterRoleBinding": 2,
            "Role": 1,  # the Lease, in the release namespace
            "RoleBinding": 1,
            "Service": 1,  # metrics
            "PodDisruptionBudget": 1,
        }
    )
    deployment = only(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert env_values(objects)["FTJ_LEADER_ELECTION"] == "true"
    assert env_values(objects)["FTJ_WATCH_NAMESPACES"] == ""
    assert only(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert all(o["metadata"].get("namespace") in (None, RELEASE_NS) for o in objects)
    binding = only(objects, "ClusterRoleBinding", FULLNAME)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NS}]
    assert binding["roleRef"]["name"] == only(objects, "ClusterRole", FULLNAME)["metadata"]["name"]
    assert CRD_RULE in only(objects, "ClusterRole", FULLNAME)["rules"]
    assert (
        NAMESPACE_RULE not in only(objects, "ClusterRole", FULLNAME)["rules"]
    )  # cluster-wide, kopf lists no namespaces


def test_operator_pod_meets_the_restricted_pod_security_standard(helm: Helm) -> None:
    objects = render(helm)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    main = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = main["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    assert not security.get("privileged")
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    # A read-only root needs somewhere to write temporary files.
    assert {"name": "tmp", "mountPath": "/tmp"} in main["volumeMounts"]
    assert pod["serviceAccountName"] == FULLNAME
    assert only(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is True
    assert main["image"] == f"ghcr.io/finetune-operator/operator:{APP_VERSION}"
    assert main["resources"]["limits"]["memory"]
    assert main["resources"]["requests"]["cpu"]


def test_probes_use_the_metrics_endpoint_that_standby_replicas_serve(helm: Helm) -> None:
    main = container(render(helm, {"ports": {"health": 8181, "metrics": 9191}}))
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"health": 8181, "metrics": 9191}
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe


def test_pod_identity_comes_from_the_downward_api(helm: Helm) -> None:
    env = {e["name"]: e for e in container(render(helm))["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_deployment_environment_is_what_the_operator_settings_read(helm: Helm, monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        **NAMESPACED,
        "trainer": {
            "image": {"repository": "registry.example/trainer", "tag": "1.2.3", "pullPolicy": "Always"},
            "acceleratorResource": "amd.com/gpu",
        },
        "storage": {"endpoint": "http://minio.minio:9000", "region": "eu-west-1", "secretName": "s3-keys"},
        "reconcile": {"resyncSeconds": 45, "apiRecheckSeconds": 90},
        "leaderElection": {"leaseName": "my-lease", "leaseDurationSeconds": 21},
        "ports": {"health": 8181, "metrics": 9191},
    }
    env = env_values(render(helm, values))
    settings_source = (ROOT / "operator" / "finetune_operator" / "settings.py").read_text()
    unknown = [name for name in env if name.startswith("FTJ_") and f'"{name}"' not in settings_source]
    assert not unknown, f"the chart sets variables the operator never reads: {unknown}"

    for name in [n for n in os.environ if n.startswith("FTJ_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("POD_NAMESPACE", RELEASE_NS)  # the downward API's part
    settings = Settings.from_env()
    assert settings.watch_namespaces == ("team-a", "team-b")
    assert settings.trainer_image == "registry.example/trainer:1.2.3"
    assert settings.image_pull_policy == "Always"
    assert settings.accelerator_resource == "amd.com/gpu"
    assert (settings.default_s3_endpoint, settings.default_s3_region, settings.default_s3_secret) == (
        "http://minio.minio:9000",
        "eu-west-1",
        "s3-keys",
    )
    assert (settings.resync_seconds, settings.api_recheck_seconds) == (45, 90)
    assert (settings.lease_name, settings.lease_namespace, settings.lease_seconds) == ("my-lease", RELEASE_NS, 21)
    assert (settings.health_port, settings.metrics_port) == (8181, 9191)
    assert settings.leader_election is True


def test_image_digests_pin_both_images(helm: Helm) -> None:
    digest = "sha256:" + "a" * 64
    objects = render(helm, {"image": {"digest": digest}, "trainer": {"image": {"digest": digest}}})
    assert container(objects)["image"] == f"ghcr.io/finetune-operator/operator@{digest}"
    assert env_values(objects)["FTJ_TRAINER_IMAGE"] == f"ghcr.io/finetune-operator/trainer@{digest}"


def test_watch_namespaces_gives_a_role_per_namespace_and_no_cluster_wide_workload_access(helm: Helm) -> None:
    objects = render(helm, NAMESPACED)
    cluster_wide_rules = [r for r in only(render(helm), "ClusterRole", FULLNAME)["rules"] if r != CRD_RULE]
    roles = [r for r in find(objects, "Role") if r["metadata"]["name"] == FULLNAME]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == cluster_wide_rules for r in roles)
    bindings = [b for b in find(objects, "RoleBinding") if b["metadata"]["name"] == FULLNAME]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": FULLNAME}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NS}]
    # The only cluster-scoped grants left: what kopf reads to observe the cluster.
    assert only(objects, "ClusterRole", f"{FULLNAME}-observer")["rules"] == [CRD_RULE, NAMESPACE_RULE]
    assert only(objects, "ClusterRoleBinding", f"{FULLNAME}-observer")["roleRef"]["name"] == f"{FULLNAME}-observer"
    assert {r["metadata"]["name"] for r in find(objects, "ClusterRole")} == {
        f"{FULLNAME}-observer",
        f"{FULLNAME}-runtime-reader",
    }
    assert env_values(objects)["FTJ_WATCH_NAMESPACES"] == "team-a,team-b"


def test_watch_namespaces_without_cluster_observation_has_no_cluster_scoped_rbac(helm: Helm) -> None:
    objects = render(helm, {**NAMESPACED, "rbac": {"observeCluster": False}})
    # Nothing cluster-scoped but reading the one ClusterTrainingRuntime by name (a cluster-scoped object).
    assert [r["metadata"]["name"] for r in find(objects, "ClusterRole")] == [f"{FULLNAME}-runtime-reader"]
    assert [b["metadata"]["name"] for b in find(objects, "ClusterRoleBinding")] == [f"{FULLNAME}-runtime-reader"]
    assert len([r for r in find(objects, "Role") if r["metadata"]["name"] == FULLNAME]) == 2


def test_lease_role_names_exactly_the_lease_the_operator_uses(helm: Helm) -> None:
    objects = render(helm)
    role = only(objects, "Role", f"{FULLNAME}-leader-election")
    assert role["metadata"]["namespace"] == RELEASE_NS
    lease = env_values(objects)["FTJ_LEASE_NAME"]
    assert lease == f"{FULLNAME}-leader"
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease],
            "verbs": ["get", "update"],
        },
    ]
    binding = only(objects, "RoleBinding", f"{FULLNAME}-leader-election")
    assert binding["subjects"][0]["name"] == FULLNAME


def test_single_replica_without_leader_election_has_no_lease_role_and_no_pdb(helm: Helm) -> None:
    objects = render(helm, {"replicaCount": 1, "leaderElection": {"enabled": False}})
    assert not find(objects, "Role", f"{FULLNAME}-leader-election")
    assert not find(objects, "PodDisruptionBudget")
    assert env_values(objects)["FTJ_LEADER_ELECTION"] == "false"


def test_monitoring_objects_select_the_operator_pods_metrics_port(helm: Helm) -> None:
    values = {
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}, "interval": "15s"},
            "podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        }
    }
    objects = render(helm, values)
    pod_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = only(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]

    monitor = only(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NS]}
    assert monitor["spec"]["endpoints"][0] | {"interval": "15s"} == monitor["spec"]["endpoints"][0]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"

    pod_monitor = only(objects, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"


def test_monitoring_is_off_by_default(helm: Helm) -> None:
    objects = render(helm)
    assert not find(objects, "ServiceMonitor")
    assert not find(objects, "PodMonitor")
    assert not find(objects, "NetworkPolicy")


def test_service_monitor_without_the_metrics_service_is_refused(helm: Helm) -> None:
    values = {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}
    with pytest.raises(HelmError, match=r"metrics\.serviceMonitor\.enabled needs metrics\.service\.enabled"):
        render(helm, values)


def test_network_policy_admits_only_metrics_and_reaches_only_the_api_server(helm: Helm) -> None:
    policy = only(render(helm, EVERYTHING_ON), "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == POD_LABELS
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert ingress["from"] == EVERYTHING_ON["networkPolicy"]["metricsFrom"]
    (egress,) = policy["spec"]["egress"]
    assert egress["ports"] == [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]
    assert "to" not in egress  # no CIDRs given: any address, on the API server ports only

    values = {"networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [6443]}}}
    restricted = only(render(helm, values), "NetworkPolicy")
    (egress,) = restricted["spec"]["egress"]
    assert egress == {"ports": [{"port": 6443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]}
    assert "from" not in restricted["spec"]["ingress"][0]


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicaCount": 2, "leaderElection": {"enabled": False}}, "leaderElection"),
        ({"watchNamespace": ["typo"]}, "watchNamespace"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
        ({"ports": {"health": 8080, "metrics": 0}}, "metrics"),
        ({"storage": {"endpoint": "minio:9000"}}, "endpoint"),
        ({"podAntiAffinity": "sometimes"}, "podAntiAffinity"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "interval"),
    ],
    ids=[
        "replicas-without-leader-election",
        "unknown-key",
        "bad-pull-policy",
        "bad-namespace-name",
        "metrics-port-zero",
        "endpoint-without-scheme",
        "bad-anti-affinity",
        "bad-interval",
    ],
)
def test_values_schema_rejects_invalid_values(helm: Helm, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(HelmError) as caught:
        render(helm, values)
    assert "schema" in caught.value.output
    assert complaint in caught.value.output


def _schema_leaves(node: dict[str, Any], path: tuple[str, ...] = ()) -> dict[tuple[str, ...], dict[str, Any]]:
    """Every value the schema declares (an object with declared properties is a group, not a value)."""
    if "properties" not in node:
        return {path: node}
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    for key, child in node["properties"].items():
        out |= _schema_leaves(child, (*path, key))
    return out


def _values_keys() -> list[tuple[tuple[str, ...], bool]]:
    """(path, has a comment right above it) for every key in values.yaml, from its text (comments included)."""
    keys: list[tuple[tuple[str, ...], bool]] = []
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        match = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):", line)
        if match:
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, match.group(2)))
            keys.append((tuple(k for _, k in stack), previous.lstrip().startswith("#")))
        if line.strip():
            previous = line
    return keys


def test_every_value_is_declared_in_the_schema_and_documented_in_values_yaml() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    leaves = _schema_leaves(schema)
    leaves.pop(("global",))  # only there so the chart can be a subchart
    keys = _values_keys()
    present = {path for path, _ in keys}
    missing_defaults = sorted(p for p in leaves if p not in present)
    assert not missing_defaults, f"schema values without a default in values.yaml: {missing_defaults}"
    # Declared: a value, a group on the way to one, or a key inside a free-form value (resources, affinity...).
    undeclared = sorted(p for p in present if not any(p[: len(v)] == v or v[: len(p)] == p for v in leaves))
    assert not undeclared, f"values.yaml keys the schema does not declare: {undeclared}"
    undocumented = sorted(".".join(p) for p, commented in keys if p in leaves and not commented)
    assert not undocumented, f"values without a comment right above them in values.yaml: {undocumented}"


def test_values_yaml_defaults_satisfy_the_schema(helm: Helm) -> None:
    # Rendering with no overrides validates values.yaml itself against values.schema.json.
    assert render(helm)


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced-with-networkpolicy"])
def test_rendered_objects_pass_server_side_dry_run(helm: Helm, control_plane: Any, mode: str) -> None:
    suffix = secrets.token_hex(3)
    release_ns, watched = f"ftj-system-{suffix}", f"team-{suffix}"
    values: dict[str, Any] = {}
    if mode != "cluster-wide":
        values = {"watchNamespaces": [watched], "networkPolicy": {"enabled": True}}
    for name in (release_ns, watched):
        control_plane.create("/api/v1/namespaces", {"metadata": {"name": name}})
    objects = helm.template(CHART, release=f"dry-{suffix}", namespace=release_ns, values=values)
    kinds = set()
    for obj in objects:
        # The API server validates every field (the Prometheus Operator CRDs are not installed here).
        control_plane.request("post", collection_path(obj), obj, params={"dryRun": "All"})
        kinds.add(obj["kind"])
    assert {"Deployment", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    if mode != "cluster-wide":
        assert "NetworkPolicy" in kinds


def test_the_trainjob_runtime_is_rendered_only_where_trainer_v2_is_served(helm: Helm) -> None:
    assert not find(helm.template(CHART), "ClusterTrainingRuntime")
    values = {
        "trainJobRuntime": {"name": "team-torch", "maxRestarts": 7},
        "trainer": {"image": {"repository": "registry.example/trainer", "tag": "1.2", "pullPolicy": "Always"}},
    }
    runtime = chart_runtime(helm, values)
    assert runtime["metadata"]["name"] == "team-torch"
    spec = runtime["spec"]
    assert spec["mlPolicy"]["torch"] == {"numProcPerNode": "auto"}
    assert spec["template"]["spec"]["failurePolicy"]["maxRestarts"] == 7
    (node,) = spec["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    job = node["template"]["spec"]
    assert job["backoffLimit"] == 0
    assert job["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [3]  # the trainer's permanent failures
    (container,) = job["template"]["spec"]["containers"]
    assert (container["name"], container["image"], container["imagePullPolicy"]) == (
        "node",
        "registry.example/trainer:1.2",
        "Always",
    )
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {
        e["name"]: e.get("value")
        for e in only(helm.template(CHART, values=values), "Deployment")["spec"]["template"]["spec"]["containers"][0][
            "env"
        ]
    }
    assert env["FTJ_TRAINJOB_RUNTIME"] == "team-torch"
    # The operator may read exactly that runtime, in either RBAC mode.
    for mode in ({}, {"watchNamespaces": ["team-a"]}):
        reader = only(
            helm.template(CHART, values={**values, **mode}), "ClusterRole", "ftj-finetune-operator-runtime-reader"
        )
        assert reader["rules"] == [
            {
                "apiGroups": ["trainer.kubeflow.org"],
                "resources": ["clustertrainingruntimes"],
                "resourceNames": ["team-torch"],
                "verbs": ["get"],
            }
        ]


@pytest.mark.usefixtures("trainer_v2")
def test_the_trainjob_runtime_passes_server_side_dry_run(helm: Helm, workloads: Any) -> None:
    runtime = chart_runtime(helm, {"trainJobRuntime": {"name": f"dry-{secrets.token_hex(3)}"}})
    workloads.request("post", collection_path(runtime), runtime, params={"dryRun": "All"})


def test_install_docs_list_every_value() -> None:
    docs = (ROOT / "docs" / "install.md").read_text()
    leaves = _schema_leaves(json.loads((CHART / "values.schema.json").read_text()))
    missing = sorted(".".join(p) for p in leaves if p != ("global",) and f"`{'.'.join(p)}`" not in docs)
    assert not missing, f"docs/install.md does not describe these values: {missing}"
