"""Shared fixtures for every test tier: the real control plane, kwok, the training operator, MinIO, kopf.

Servers start lazily, once per session, the first time a test asks for them; a missing binary skips the test
loudly (or fails it under ``FTJ_REQUIRE_REAL=1``, see ``support.requirements``). Helper code lives in
``tests/support``; this file only wires it into pytest.
"""

from __future__ import annotations

import importlib
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:  # `import support` also under --import-mode=importlib
    sys.path.insert(0, str(_TESTS_DIR))
# The venv is shared by every checkout on the machine (scripts/venv.sh) and its editable install points at whichever
# checkout refreshed it last: test this checkout's packages, here and in every subprocess the tests start.
_PACKAGES = [str(_TESTS_DIR.parent / "operator"), str(_TESTS_DIR.parent / "trainer-image")]
sys.path[:0] = [p for p in _PACKAGES if p not in sys.path]
os.environ["PYTHONPATH"] = os.pathsep.join([*_PACKAGES, *filter(None, [os.environ.get("PYTHONPATH")])])

from support.requirements import unavailable  # noqa: E402

if TYPE_CHECKING:
    from support.controlplane import ControlPlane
    from support.operator_runner import OperatorRunner
    from support.s3 import MinioServer, S3Bucket

REPO_ROOT = _TESTS_DIR.parent
# FTJ_CRDS_DIR points the control plane at another directory of CRDs (default: the repository's crds/).
CRDS_DIR = Path(os.environ.get("FTJ_CRDS_DIR") or REPO_ROOT / "crds")

MARKERS = {
    "controlplane": "needs the real etcd + kube-apiserver built by tests/testbin/build.sh",
    "workloads": "needs kube-controller-manager, kube-scheduler and kwok (pods get scheduled and run)",
    "training_operator": "needs the Kubeflow training operator v1 and its PyTorchJob CRD",
    "trainer_v2": "needs Kubeflow Trainer v2 (TrainJob) and the JobSet controller, with their CRDs",
    "s3": "needs the real MinIO S3 server built by tests/testbin/build.sh",
    "operator": "runs a kopf operator subprocess against the control plane",
    "e2e": "Pods really run, under the node agent (tests/e2e; support.nodeagent)",
}
# A test that uses one of these fixtures gets the marker, so `-m controlplane` / `-m "not s3"` select tiers.
_FIXTURE_MARKERS = {
    "control_plane": "controlplane",
    "namespace": "controlplane",
    "k8s_api": "controlplane",
    "workloads": "workloads",
    "kwok": "workloads",
    "training_operator": "training_operator",
    "trainer_v2": "trainer_v2",
    "s3": "s3",
    "minio": "s3",
    "run_operator": "operator",
    "agent_nodes": "e2e",
}

T = TypeVar("T")
_LOGS_KEY = pytest.StashKey[list[tuple[str, Path]]]()
_TIMINGS_KEY = pytest.StashKey[list[dict[str, float]]]()


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in _FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the logs registered for a test (kopf operator, ...) to its report when it fails."""
    report: pytest.TestReport = yield
    if report.failed:
        from support.processes import log_tail

        for title, path in item.stash.get(_LOGS_KEY, []):
            report.sections.append((f"{title} ({path})", log_tail(path, 30_000) or "<empty>"))
    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Report how long each real server took to start, so slow starts show up in CI logs."""
    timings = {name: seconds for source in config.stash.get(_TIMINGS_KEY, []) for name, seconds in source.items()}
    if timings:
        started = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
        terminalreporter.write_line(f"test servers started: {started}")


def attach_log(request: pytest.FixtureRequest, title: str, path: Path) -> None:
    """Show ``path`` in the report of the requesting test if it fails."""
    request.node.stash.setdefault(_LOGS_KEY, []).append((title, path))


def _ensure(start: Callable[[], T]) -> T:
    """Run ``start``; a binary it lacks makes the test unavailable (skip, or failure under FTJ_REQUIRE_REAL=1)."""
    testbin = _support("testbin")
    try:
        return start()
    except testbin.MissingBinaryError as exc:
        reason = str(exc)
    unavailable(reason)  # outside the except block, so the report shows the reason, not a chained traceback


def _support(module: str) -> Any:
    """Import ``support.<module>``; its third-party imports missing is a loud skip, not a collection error."""
    try:
        return importlib.import_module(f"support.{module}")
    except ImportError as exc:
        reason = f"support.{module} cannot be imported ({exc}); install the [dev] extra"
    unavailable(reason)


@pytest.fixture(scope="session")
def testbin_workdir() -> Iterator[Path]:
    """Scratch directory for this session's servers (removed at the end unless FTJ_KEEP_WORKDIR is set)."""
    path = Path(tempfile.mkdtemp(prefix="ftj-testbin-"))
    yield path
    if not os.environ.get("FTJ_KEEP_WORKDIR"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest, testbin_workdir: Path) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver (cert auth, RBAC) with every CRD from the repository's crds/ installed."""
    controlplane = _support("controlplane")
    plane: ControlPlane = _ensure(lambda: controlplane.ControlPlane.start(testbin_workdir / "controlplane"))
    request.config.stash.setdefault(_TIMINGS_KEY, []).append(plane.timings)  # filled in as components start
    try:
        crd_files = sorted([*CRDS_DIR.glob("*.yaml"), *CRDS_DIR.glob("*.yml")]) if CRDS_DIR.is_dir() else []
        plane.apply_crd_files(crd_files)
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def k8s_api(control_plane: ControlPlane) -> Iterator[Any]:
    """A kubernetes ``ApiClient`` authenticated as the cluster admin."""
    with control_plane.api_client() as api:
        yield api


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40].strip("-") or "t"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, control_plane: ControlPlane) -> Iterator[str]:
    """A fresh namespace (with its ``default`` ServiceAccount) for this test, deleted afterwards."""
    from kubernetes.client import ApiException

    name = f"{_slug(request.node.name)}-{secrets.token_hex(3)}"
    control_plane.create("/api/v1/namespaces", {"metadata": {"name": name, "labels": {"ftj.test/namespace": "true"}}})
    # The controller manager creates it too (when running); Pods cannot be admitted before it exists.
    control_plane.create(f"/api/v1/namespaces/{name}/serviceaccounts", {"metadata": {"name": "default"}})
    yield name
    # Without a controller manager the namespace stays Terminating; harmless, the etcd data is thrown away.
    try:
        control_plane.request("delete", f"/api/v1/namespaces/{name}")
    except ApiException as exc:
        if exc.status != 404:
            raise


@pytest.fixture(scope="session")
def controller_manager(control_plane: ControlPlane) -> Any:
    """kube-controller-manager (job, garbage collector, service accounts, ...), started once."""
    return _ensure(control_plane.ensure_controller_manager)


@pytest.fixture(scope="session")
def scheduler(control_plane: ControlPlane) -> Any:
    """kube-scheduler, started once."""
    return _ensure(control_plane.ensure_scheduler)


@pytest.fixture(scope="session")
def kwok(control_plane: ControlPlane) -> Any:
    """kwok with fake GPU nodes; pods bound to them run as the test drives them (support.kwok.drive_pod)."""
    return _ensure(control_plane.ensure_kwok)


@pytest.fixture(scope="session")
def workloads(control_plane: ControlPlane, controller_manager: Any, scheduler: Any, kwok: Any) -> ControlPlane:
    """The control plane with everything Pods need: controllers, scheduling and kwok nodes."""
    return control_plane


@pytest.fixture(scope="session")
def training_operator(workloads: ControlPlane) -> Any:
    """The Kubeflow training operator v1 (PyTorchJob), out of cluster, with its upstream CRD applied."""
    return _ensure(workloads.ensure_training_operator)


@pytest.fixture(scope="session")
def trainer_v2(workloads: ControlPlane) -> Any:
    """Kubeflow Trainer v2 (TrainJob) and JobSet, out of cluster, with their upstream CRDs applied."""
    return _ensure(workloads.ensure_trainer_v2)


@pytest.fixture(scope="session")
def trainjob_runtime(trainer_v2: Any, workloads: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The chart's ClusterTrainingRuntime (finetune-torch), rendered by Helm as on a cluster with Trainer v2 and
    installed: what FineTuneJobs with distribution.backend trainjob run on. Returns its name."""
    helm = _support("helm")
    runtime = helm.chart_runtime(_ensure(lambda: helm.Helm(tmp_path_factory.mktemp("helm-home"))))
    workloads.create(helm.collection_path(runtime), runtime)
    name: str = runtime["metadata"]["name"]
    return name


@pytest.fixture
def run_operator(
    request: pytest.FixtureRequest, control_plane: ControlPlane, tmp_path: Path
) -> Iterator[Callable[..., OperatorRunner]]:
    """Factory for kopf operator subprocesses (``with run_operator(namespaces=[ns]) as op: ...``).

    Arguments go to ``support.operator_runner.OperatorRunner`` (``module`` defaults to
    ``finetune_operator.handlers``, ``kubeconfig`` to the admin's). Each operator's log is attached to the test
    report if the test fails, and any operator still running at teardown is stopped.
    """
    operator_runner = _support("operator_runner")
    runners: list[OperatorRunner] = []

    def factory(*, kubeconfig: Path | None = None, **kwargs: Any) -> OperatorRunner:
        log_path = tmp_path / f"kopf-operator-{len(runners)}.log"
        # kubeconfig: another identity than the admin (the e2e tier runs it as the Helm chart's ServiceAccount).
        runner: OperatorRunner = operator_runner.OperatorRunner(
            kubeconfig or control_plane.kubeconfig, log_path, **kwargs
        )
        runners.append(runner)
        attach_log(request, f"kopf operator log #{len(runners)}", log_path)
        return runner

    yield factory
    for runner in runners:
        runner.stop()


@pytest.fixture(scope="session")
def minio(request: pytest.FixtureRequest, testbin_workdir: Path) -> Iterator[MinioServer]:
    """A MinIO server with random root credentials, started once per session."""
    s3 = _support("s3")
    server: MinioServer = _ensure(lambda: s3.MinioServer.start(testbin_workdir / "minio"))
    request.config.stash.setdefault(_TIMINGS_KEY, []).append({"minio": server.start_seconds})
    yield server
    server.stop()


@pytest.fixture
def s3(minio: MinioServer) -> Iterator[S3Bucket]:
    """A fresh bucket on the session's MinIO: endpoint_url, access_key, secret_key, region, bucket, client()."""
    bucket = minio.new_bucket()
    yield bucket
    minio.remove_bucket(bucket)
