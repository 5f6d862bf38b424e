"""The chart's RBAC is exactly what the operator needs: no missing permission, no extra one.

OPERATOR_PERMISSIONS below lists every API request the operator makes, each with the code that makes it (reviewed
against k8s.py, reconcile.py, leader.py, handlers.py and kopf's own behaviour). It is checked three ways:
against the code where it can be derived (children, the trainer Role, kopf's watches, suspend), against the rules
the chart renders (equal, in both RBAC modes), and against reality: the chart's RBAC is installed into a control
plane with an audit log and the OwnerReferencesPermissionEnforcement admission plugin (as OpenShift runs), and
the operator lifecycle scenarios run with the operator authenticated as the chart's ServiceAccount. Every request
it makes must be allowed, and every permission the chart grants must be used.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import pytest
from ftjtest import Cluster, ftj, operator_env
from kubernetes import client
from kubernetes.client.rest import ApiException
from test_operator_lifecycle import test_job_backend_full_lifecycle as job_backend_lifecycle
from test_operator_lifecycle import (
    test_operator_restart_creates_no_duplicates_and_keeps_status_moving as restart_creates_no_duplicates,
)
from test_operator_lifecycle import test_pytorchjob_backend_full_lifecycle as pytorchjob_backend_lifecycle
from test_operator_lifecycle import test_ttl_deletes_a_finished_job as ttl_deletes_a_finished_job
from test_trainjob_backend import test_trainjob_backend_full_lifecycle as trainjob_backend_lifecycle

from finetune_operator.api import validate_document
from finetune_operator.render import JobRef, children, merge_job, rbac, workload
from finetune_operator.settings import Settings
from support import audit, testbin
from support.controlplane import ControlPlane
from support.helm import Helm, chart_runtime, collection_path, find, only
from support.operator_runner import OperatorRunner
from support.processes import wait_until
from support.requirements import unavailable

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "finetune-operator"
FULLNAME = "ftj-finetune-operator"

Permission = tuple[str, str, str]  # (apiGroup, resource or resource/subresource, verb), as RBAC names them

# In every watched namespace (through a Role there), or in all of them (through the ClusterRole).
OPERATOR_PERMISSIONS: dict[Permission, str] = {
    ("finetune.dev", "finetunejobs", "list"): "kopf's watch starts with a list; reconcile.keys (the resync)",
    ("finetune.dev", "finetunejobs", "watch"): "kopf: @kopf.on.event in handlers.py",
    ("finetune.dev", "finetunejobs", "get"): "reconcile.reconcile reads the job fresh",
    ("finetune.dev", "finetunejobs", "delete"): "reconcile.expire: ttlSecondsAfterFinished",
    ("finetune.dev", "finetunejobs/status", "patch"): "k8s.apply_status (server-side apply)",
    ("finetune.dev", "finetunejobs/status", "get"): "held so the operator may grant it in the trainer Role",
    ("finetune.dev", "finetunejobs/finalizers", "update"): "children's ownerReferences set blockOwnerDeletion",
    ("", "configmaps", "create"): "reconcile.ensure_children: the trainer config",
    ("", "configmaps", "get"): "reconcile.ensure_children reads each child and its owner",
    ("", "serviceaccounts", "create"): "reconcile.ensure_children: the per-job trainer ServiceAccount",
    ("", "serviceaccounts", "get"): "reconcile.ensure_children reads each child and its owner",
    ("", "services", "create"): "reconcile.ensure_children: the Job backend's headless Service",
    ("", "services", "get"): "reconcile.ensure_children reads each child and its owner",
    ("rbac.authorization.k8s.io", "roles", "create"): "reconcile.ensure_children: the trainer's status Role",
    ("rbac.authorization.k8s.io", "roles", "get"): "reconcile.ensure_children reads each child and its owner",
    ("rbac.authorization.k8s.io", "rolebindings", "create"): "reconcile.ensure_children: its RoleBinding",
    ("rbac.authorization.k8s.io", "rolebindings", "get"): "reconcile.ensure_children reads each child and its owner",
    ("", "pods", "list"): "reconcile lists the workload's replicas; kopf's watch starts with a list",
    ("", "pods", "watch"): "kopf: @kopf.on.event('v1', 'pods')",
    ("", "events", "create"): "kopf.event (handlers._event) and kopf's own per-object log events",
    ("batch", "jobs", "create"): "reconcile.ensure_children: the Indexed Job backend",
    ("batch", "jobs", "get"): "reconcile.ensure_children reads the workload",
    ("batch", "jobs", "list"): "kopf's watch starts with a list",
    ("batch", "jobs", "watch"): "kopf: @kopf.on.event('batch', 'v1', 'jobs')",
    ("batch", "jobs", "patch"): "reconcile._converge_suspension: spec.suspend",
    ("kubeflow.org", "pytorchjobs", "create"): "reconcile.ensure_children: the PyTorchJob backend",
    ("kubeflow.org", "pytorchjobs", "get"): "reconcile.ensure_children reads the workload",
    ("kubeflow.org", "pytorchjobs", "list"): "kopf's watch starts with a list",
    ("kubeflow.org", "pytorchjobs", "watch"): "kopf: @kopf.on.event('kubeflow.org', 'v1', 'pytorchjobs')",
    ("kubeflow.org", "pytorchjobs", "patch"): "reconcile._converge_suspension: spec.runPolicy.suspend",
    ("trainer.kubeflow.org", "trainjobs", "create"): "reconcile.ensure_children: the TrainJob backend",
    ("trainer.kubeflow.org", "trainjobs", "get"): "reconcile.ensure_children reads the workload",
    ("trainer.kubeflow.org", "trainjobs", "list"): "kopf's watch starts with a list",
    ("trainer.kubeflow.org", "trainjobs", "watch"): "kopf: @kopf.on.event('trainer.kubeflow.org', ..., 'trainjobs')",
    ("trainer.kubeflow.org", "trainjobs", "patch"): "reconcile._converge_suspension: spec.suspend",
    ("trainer.kubeflow.org", "trainjobs/status", "patch"): "backends.mirror_progress: status.trainerStatus",
    ("jobset.x-k8s.io", "jobsets", "get"): "backends.train_jobset: the TrainJob's restarts and its Pods' label",
}
# Cluster-scoped, in either RBAC mode, for one object by name: backends.runtime_exists reads the
# ClusterTrainingRuntime that TrainJobs run on (backend trainjob, and auto's choice).
RUNTIME_PERMISSIONS: dict[Permission, str] = {
    ("trainer.kubeflow.org", "clustertrainingruntimes", "get"): "backends.runtime_exists",
}
# Cluster-scoped (rbac.observeCluster): kopf's own observation of the cluster.
CLUSTER_PERMISSIONS: dict[Permission, str] = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "kopf notices CRDs installed after its start",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "kopf notices CRDs installed after its start",
}
# Cluster-scoped, with watchNamespaces only: kopf lists Namespaces before it watches the given ones, and retries a
# refused list for about a minute before it falls back (the operator would start that much later).
NAMESPACED_MODE_PERMISSIONS: dict[Permission, str] = {
    ("", "namespaces", "list"): "kopf's namespace observer (namespaced mode only)",
    ("", "namespaces", "watch"): "kopf's namespace observer (namespaced mode only)",
}
# In the release namespace: leader.LeaderElector. get/update are limited to the one Lease by name.
LEASE_PERMISSIONS: dict[Permission, str] = {
    ("coordination.k8s.io", "leases", "create"): "LeaderElector.try_acquire when there is no Lease yet",
    ("coordination.k8s.io", "leases", "get"): "LeaderElector.try_acquire / release",
    ("coordination.k8s.io", "leases", "update"): "LeaderElector: renew, take over, release (k8s.replace)",
}
# Decided by the API server while it handles another request, so never a request of their own (and never in the
# audit log): RBAC's escalation check when the trainer Role/RoleBinding is created, and the admission check of
# blockOwnerDeletion in the children's ownerReferences.
CHECKED_IMPLICITLY = {
    ("finetune.dev", "finetunejobs/status", "get"),
    ("finetune.dev", "finetunejobs/finalizers", "update"),
}


def expand(rules: list[dict[str, Any]]) -> set[Permission]:
    """The (group, resource, verb) triples a list of PolicyRules grants; wildcards are refused outright."""
    out: set[Permission] = set()
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(field, []), f"wildcard in {field}: {rule}"
        out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def sample_job(backend: str) -> JobRef:
    job, errors = validate_document(ftj("sample", backend))
    assert job is not None, errors
    return JobRef("sample", "team", job.spec)


def group_of(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


# -- the table against the code ---------------------------------------------------------------------------------


def plural(kind: str) -> str:
    """The resource name of each kind the operator creates (the API server's discovery says the same)."""
    return kind.lower() + "s"


@pytest.mark.parametrize("backend", ["job", "pytorchjob", "trainjob"])
def test_every_child_the_operator_renders_may_be_created_and_read_back(backend: str) -> None:
    job = sample_job(backend)
    for child in [*children(job, Settings()), merge_job(job, Settings())]:
        resource = (group_of(child["apiVersion"]), plural(child["kind"]))
        for verb in ("create", "get"):
            assert (*resource, verb) in OPERATOR_PERMISSIONS, f"{child['kind']}: {verb} missing from the table"


@pytest.mark.parametrize("backend", ["job", "pytorchjob", "trainjob"])
def test_the_workload_can_be_suspended(backend: str) -> None:
    child = workload(sample_job(backend), Settings(), {})
    assert (group_of(child["apiVersion"]), plural(child["kind"]), "patch") in OPERATOR_PERMISSIONS


def test_the_operator_holds_everything_the_trainer_role_grants() -> None:
    # RBAC lets a user create a Role (and bind it) only with permissions that user holds itself.
    (role,) = [o for o in rbac(sample_job("job")) if o["kind"] == "Role"]
    assert expand(role["rules"]) <= OPERATOR_PERMISSIONS.keys()


def test_everything_kopf_watches_may_be_listed_and_watched() -> None:
    import finetune_operator.handlers  # noqa: F401 - registers the handlers

    registry = kopf.get_default_registry()
    # kopf keeps its handlers in private registries; this is how it decides what to watch itself.
    handlers = [*registry._watching.get_all_handlers(), *registry._changing.get_all_handlers()]
    watched = {(h.selector.group, h.selector.any_name) for h in handlers if h.selector is not None}
    assert ("finetune.dev", "finetunejobs") in watched
    for group, plural in watched:
        for verb in ("list", "watch"):
            assert (group, plural, verb) in OPERATOR_PERMISSIONS, f"kopf watches {group}/{plural}: {verb} missing"
    # Only event handlers: kopf keeps no state in annotations, so the operator never patches the object itself.
    assert not list(registry._changing.get_all_handlers())
    assert ("finetune.dev", "finetunejobs", "patch") not in OPERATOR_PERMISSIONS


# -- the table against the chart ------------------------------------------------------------------------------


def test_cluster_wide_chart_grants_exactly_the_table(helm: Helm) -> None:
    objects = helm.template(CHART, namespace="ftj-system")
    operator_role = only(objects, "ClusterRole", FULLNAME)
    assert expand(operator_role["rules"]) == OPERATOR_PERMISSIONS.keys() | CLUSTER_PERMISSIONS.keys()
    assert_runtime_reader(objects)
    lease_role = only(objects, "Role")
    assert lease_role["metadata"]["namespace"] == "ftj-system"
    assert expand(lease_role["rules"]) == LEASE_PERMISSIONS.keys()
    named = [r for r in lease_role["rules"] if r.get("resourceNames")]
    assert expand(named) == {p for p in LEASE_PERMISSIONS if p[2] != "create"}


def test_namespaced_chart_grants_exactly_the_table_in_each_namespace(helm: Helm) -> None:
    objects = helm.template(CHART, namespace="ftj-system", values={"watchNamespaces": ["team-a", "team-b"]})
    roles = {r["metadata"]["namespace"]: r for r in find(objects, "Role") if "leader" not in r["metadata"]["name"]}
    assert sorted(roles) == ["team-a", "team-b"]
    for role in roles.values():
        assert expand(role["rules"]) == OPERATOR_PERMISSIONS.keys()
    observer = only(objects, "ClusterRole", f"{FULLNAME}-observer")
    assert expand(observer["rules"]) == CLUSTER_PERMISSIONS.keys() | NAMESPACED_MODE_PERMISSIONS.keys()
    assert_runtime_reader(objects)


def assert_runtime_reader(objects: list[dict[str, Any]]) -> None:
    reader = only(objects, "ClusterRole", f"{FULLNAME}-runtime-reader")
    assert expand(reader["rules"]) == RUNTIME_PERMISSIONS.keys()
    assert all(rule["resourceNames"] == [Settings().trainjob_runtime] for rule in reader["rules"])


# -- the chart's RBAC against the API server ------------------------------------------------------------------


@dataclass
class Plane:
    control: ControlPlane
    audit_log: Path


@pytest.fixture(scope="module")
def rbac_plane(tmp_path_factory: pytest.TempPathFactory, helm: Helm) -> Iterator[Plane]:
    """A control plane of its own, with an audit log and OwnerReferencesPermissionEnforcement, plus workloads and
    the Kubeflow training operator."""
    workdir = tmp_path_factory.mktemp("rbac-plane")
    args, log = audit.apiserver_args(workdir / "audit")
    args.append("--enable-admission-plugins=OwnerReferencesPermissionEnforcement")
    try:
        plane = ControlPlane.start(workdir / "plane", apiserver_args=args)
    except testbin.MissingBinaryError as exc:
        reason = str(exc)
    else:
        try:
            plane.apply_crd_files([ROOT / "crds" / "finetune.dev_finetunejobs.yaml"])
            plane.ensure_controller_manager()
            plane.ensure_scheduler()
            plane.ensure_kwok()
            # Before any operator starts: kopf finds the PyTorchJob API in its initial scan. (A CRD added later is
            # noticed only if discovery already serves it when the CRD's watch events arrive, which races.)
            plane.ensure_training_operator()
            plane.ensure_trainer_v2()
            runtime = chart_runtime(helm)
            plane.create(collection_path(runtime), runtime)
            yield Plane(plane, log)
            return
        except testbin.MissingBinaryError as exc:
            reason = str(exc)
        finally:
            plane.stop()
    unavailable(reason)


@dataclass
class Install:
    """The chart's RBAC objects applied to the plane, and what the operator needs to run as its ServiceAccount."""

    release_namespace: str
    watch_namespaces: list[str]
    username: str
    kubeconfig: Path
    env: dict[str, str]


def install_chart_rbac(
    helm: Helm, plane: ControlPlane, tmp_path: Path, values: dict[str, Any], *, drop: Permission | None = None
) -> Install:
    """Render the chart, create its ServiceAccount, Roles and bindings (optionally without one permission),
    and mint a token for the ServiceAccount as the kubelet would for the operator's Pod."""
    suffix = secrets.token_hex(3)
    release_ns = f"ftj-system-{suffix}"
    plane.create("/api/v1/namespaces", {"metadata": {"name": release_ns}})
    objects = helm.template(CHART, release=f"ftj-{suffix}", namespace=release_ns, values=values)
    for obj in objects:
        if obj["kind"] not in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
            continue
        if drop is not None and obj["kind"] in ("Role", "ClusterRole"):
            for rule in obj["rules"]:
                if drop[0] in rule["apiGroups"] and drop[1] in rule["resources"]:
                    rule["verbs"] = [v for v in rule["verbs"] if v != drop[2]]
            obj["rules"] = [r for r in obj["rules"] if r["verbs"]]
        plane.request("post", collection_path(obj), obj)
    deployment = only(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    account = pod["serviceAccountName"]
    token = plane.service_account_token(release_ns, account)
    env = {e["name"]: e["value"] for e in main["env"] if "value" in e}
    watched = [n for n in env["FTJ_WATCH_NAMESPACES"].split(",") if n]
    return Install(
        release_namespace=release_ns,
        watch_namespaces=watched,
        username=f"system:serviceaccount:{release_ns}:{account}",
        kubeconfig=plane.token_kubeconfig(token, tmp_path / f"{account}.kubeconfig"),
        env=env,
    )


class ChartOperator:
    """Starts operators as the chart's Deployment would run them: its ServiceAccount, its environment."""

    def __init__(self, install: Install, cluster: Cluster, tmp_path: Path, attach: Callable[[str, Path], None]):
        self.install, self.cluster, self.tmp_path, self.attach = install, cluster, tmp_path, attach
        self.count = 0

    def __call__(self, **_: Any) -> OperatorRunner:
        """An operator (a context manager); arguments of the lifecycle scenarios' run_operator are ignored:
        the chart decides what is watched and where the Lease is."""
        self.count += 1
        # The test's timing, the chart's everything else; namespaces and the Lease stay the chart's.
        timing = {
            k: v
            for k, v in operator_env(self.cluster.ns).items()
            if k not in ("FTJ_WATCH_NAMESPACES", "FTJ_LEASE_NAMESPACE")
        }
        env = {
            **self.install.env,
            **timing,
            "POD_NAMESPACE": self.install.release_namespace,
            "POD_NAME": f"operator-{self.count}",
        }
        log = self.tmp_path / f"chart-operator-{self.count}.log"
        self.attach(f"operator #{self.count} as the chart's ServiceAccount", log)
        return OperatorRunner(self.install.kubeconfig, log, namespaces=self.install.watch_namespaces, env=env)


def watched_namespace(plane: ControlPlane) -> str:
    name = f"team-{secrets.token_hex(3)}"
    plane.create("/api/v1/namespaces", {"metadata": {"name": name}})
    plane.create(f"/api/v1/namespaces/{name}/serviceaccounts", {"metadata": {"name": "default"}})
    return name


def suspend_and_resume(cluster: Cluster, name: str, backend: str) -> None:
    """spec.runPolicy.suspend reaches the workload both ways: the operator patches the Job, PyTorchJob or TrainJob."""

    def workload_suspended() -> bool:
        if backend == "job":
            return bool(cluster.batch.read_namespaced_job(name, cluster.ns).spec.suspend)
        if backend == "trainjob":
            tj = cluster.custom.get_namespaced_custom_object(
                "trainer.kubeflow.org", "v1alpha1", cluster.ns, "trainjobs", name
            )
            return bool(tj["spec"].get("suspend"))
        ptj = cluster.custom.get_namespaced_custom_object("kubeflow.org", "v1", cluster.ns, "pytorchjobs", name)
        return bool(ptj["spec"]["runPolicy"].get("suspend"))

    cluster.apply(ftj(name, backend, nodes=1))
    cluster.wait_phase(name, "Running")
    for suspend in (True, False):
        cluster.patch(name, {"spec": {"runPolicy": {"suspend": suspend}}})

        def reached(wanted: bool = suspend) -> bool:
            return workload_suspended() is wanted

        wait_until(reached, timeout=30, what=f"{backend} {name} suspend={suspend}")
    cluster.wait_pods(name, 1)
    cluster.wait_phase(name, "Running")


@contextlib.contextmanager
def refusals_explain_failures(plane: Plane, username: str) -> Iterator[None]:
    """A scenario that fails while the API server refused the operator something says what was refused."""
    try:
        yield
    except Exception as exc:
        _, refused = audited(plane, username)
        if refused:
            raise AssertionError(f"the API server refused the operator {sorted(refused)}: {exc}") from exc
        raise


def audited(plane: Plane, username: str) -> tuple[set[Permission], set[Permission]]:
    """(allowed, refused) requests of ``username`` so far, as (group, resource, verb)."""
    requests = audit.requests(plane.audit_log, username)
    allowed = {(r.api_group, r.resource, r.verb) for r in requests if r.code < 400 or r.code == 404 or r.code == 409}
    refused = {(r.api_group, r.resource, r.verb) for r in requests if r.code == 403}
    return allowed, refused


def test_operator_lifecycle_as_the_chart_service_account_cluster_wide(
    helm: Helm, rbac_plane: Plane, tmp_path: Path, attach_log: Callable[[str, Path], None]
) -> None:
    install = install_chart_rbac(helm, rbac_plane.control, tmp_path, {})
    assert install.watch_namespaces == []
    with rbac_plane.control.api_client() as admin:
        cluster = Cluster(admin, watched_namespace(rbac_plane.control))
        operators = ChartOperator(install, cluster, tmp_path, attach_log)

        with refusals_explain_failures(rbac_plane, install.username), contextlib.ExitStack() as stack:
            restart_creates_no_duplicates(cluster, operators)  # the second start finds every child already there
            operator = stack.enter_context(operators())
            job_backend_lifecycle(cluster, operator)
            suspend_and_resume(cluster, "pausable-job", "job")
            ttl_deletes_a_finished_job(cluster, operator)
            pytorchjob_backend_lifecycle(cluster, operator)
            suspend_and_resume(cluster, "pausable-ptj", "pytorchjob")
            trainjob_backend_lifecycle(cluster, operator, Settings().trainjob_runtime)
            suspend_and_resume(cluster, "pausable-tj", "trainjob")

    allowed, refused = audited(rbac_plane, install.username)
    assert refused == set(), f"the API server refused the operator: {sorted(refused)}"
    granted = (
        OPERATOR_PERMISSIONS.keys() | CLUSTER_PERMISSIONS.keys() | LEASE_PERMISSIONS.keys() | RUNTIME_PERMISSIONS.keys()
    )
    assert allowed - granted == set()  # cannot fail while nothing is refused; says what was seen if it does
    unused = granted - allowed - CHECKED_IMPLICITLY
    assert unused == set(), f"the chart grants permissions the operator never used: {sorted(unused)}"


def test_operator_lifecycle_as_the_chart_service_account_in_watched_namespaces(
    helm: Helm, rbac_plane: Plane, tmp_path: Path, attach_log: Callable[[str, Path], None]
) -> None:
    namespace = watched_namespace(rbac_plane.control)
    install = install_chart_rbac(helm, rbac_plane.control, tmp_path, {"watchNamespaces": [namespace]})
    assert install.watch_namespaces == [namespace]
    with rbac_plane.control.api_client() as admin:
        cluster = Cluster(admin, namespace)
        with (
            refusals_explain_failures(rbac_plane, install.username),
            ChartOperator(install, cluster, tmp_path, attach_log)() as operator,
        ):
            job_backend_lifecycle(cluster, operator)
            pytorchjob_backend_lifecycle(cluster, operator)
            trainjob_backend_lifecycle(cluster, operator, Settings().trainjob_runtime)

    allowed, refused = audited(rbac_plane, install.username)
    assert refused == set(), f"the API server refused the operator: {sorted(refused)}"
    granted = (
        OPERATOR_PERMISSIONS.keys()
        | CLUSTER_PERMISSIONS.keys()
        | NAMESPACED_MODE_PERMISSIONS.keys()
        | LEASE_PERMISSIONS.keys()
        | RUNTIME_PERMISSIONS.keys()
    )
    assert allowed - granted == set()
    # This shorter run exercises the mode's own grants; the cluster-wide run covers every namespaced verb.
    assert NAMESPACED_MODE_PERMISSIONS.keys() | RUNTIME_PERMISSIONS.keys() <= allowed


@pytest.mark.parametrize(
    "permission", sorted(CHECKED_IMPLICITLY), ids=lambda p: f"{p[1]}-{p[2]}" if isinstance(p, tuple) else str(p)
)
def test_permissions_the_api_server_checks_implicitly_are_needed(
    helm: Helm, rbac_plane: Plane, tmp_path: Path, permission: Permission
) -> None:
    """Without the permission, the operator's own request for the children is refused; with it, accepted."""
    plane = rbac_plane.control
    namespace = watched_namespace(plane)
    values = {"watchNamespaces": [namespace]}
    install = install_chart_rbac(helm, plane, tmp_path, values, drop=permission)
    with plane.api_client() as admin:
        owner = Cluster(admin, namespace).apply(ftj("owner", "job"))
    job = sample_job("job")
    objects = {o["kind"]: o for o in children(JobRef("owner", namespace, job.spec), Settings())}
    if permission[1] == "finetunejobs/status":
        # RBAC refuses to create a Role granting what its creator does not hold.
        body, create = objects["Role"], "create_namespaced_role"
        api_class: Any = client.RbacAuthorizationV1Api
    else:
        # OwnerReferencesPermissionEnforcement refuses blockOwnerDeletion without finalizers rights on the owner.
        body, create = objects["ConfigMap"], "create_namespaced_config_map"
        api_class = client.CoreV1Api
    body["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": "owner",
            "uid": owner["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    token = plane.service_account_token(install.release_namespace, install.username.rsplit(":", 1)[1])
    with plane.token_client(token) as as_operator:
        api = api_class(as_operator)
        with pytest.raises(ApiException) as refused:
            getattr(api, create)(namespace, body)
        assert refused.value.status == 403

        # Restore the chart's Role with every rule; RBAC picks the change up within moments.
        account = install.username.rsplit(":", 1)[1]  # the Role is named like the ServiceAccount
        with plane.api_client() as admin:
            client.RbacAuthorizationV1Api(admin).patch_namespaced_role(
                account, namespace, {"rules": chart_role_rules(helm, values)}
            )
        created = wait_until(
            lambda: getattr(api, create)(namespace, body), timeout=30, what=f"{create} once {permission} is granted"
        )
        assert created.metadata.name == body["metadata"]["name"]


def chart_role_rules(helm: Helm, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The rules of the chart's per-namespace Role, as rendered."""
    objects = helm.template(CHART, release="x", namespace="x", values=values)
    rules: list[dict[str, Any]] = only(objects, "Role", "x-finetune-operator")["rules"]
    return rules
