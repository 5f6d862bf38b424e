"""Fixtures of the e2e tier: FineTuneJobs that really run, from ``kubectl apply`` to a merged model in MinIO.

What is real: etcd, kube-apiserver, kube-controller-manager (Job, garbage collector, ...), kube-scheduler, the
Kubeflow training operator, MinIO, the operator (kopf, as the Helm chart's ServiceAccount with the chart's RBAC
and nothing more), the trainer and merge processes (torchrun over gloo, on CPU), and the kubectl binary. What is
not: the kubelet. Two Nodes are played by ``support.nodeagent``, which runs each container's command from the
project's virtualenv in a namespace of its own (see docs/testing.md, "The e2e tier").

Per test module: the node agent and its Nodes (kwok's fake nodes are cordoned meanwhile, so every Pod of the
module lands on an agent Node). Per test: a namespace with the S3 Secret, a bucket with a tiny model and data,
the chart's RBAC for that namespace, and an :class:`E2E` handle with kubectl and the waits the scenarios share.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

_E2E_DIR = str(Path(__file__).resolve().parent)
if _E2E_DIR not in sys.path:  # the scenarios' helpers (e2etest.py), also under --import-mode=importlib
    sys.path.insert(0, _E2E_DIR)

from e2etest import (  # noqa: E402
    AGENT_NODES,
    DATA_KEY,
    E2E,
    E2E_NODE_LABEL,
    FAKE_NODE_SELECTOR,
    MODEL_KEY,
    S3_SECRET,
    delete_and_wait,
    image_env,
    install_chart_rbac,
)

if TYPE_CHECKING:
    from support.controlplane import ControlPlane
    from support.nodeagent import NodeAgentProcess
    from support.operator_runner import OperatorRunner
    from support.s3 import S3Bucket

_E2E_KEY = pytest.StashKey[E2E]()


@pytest.fixture(scope="module")
def agent_nodes(
    control_plane: ControlPlane, workloads: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeAgentProcess]:
    """Two Nodes played by the node agent; kwok's fake nodes (``workloads`` starts kwok first, so they all exist
    by now) are cordoned while the module runs.

    The training Pods select the agent Nodes (spec.scheduling.nodeSelector), but the merge Job's Pod carries no
    scheduling constraints, so the fake nodes must be out of the scheduler's reach or it may land there and
    "run" forever under kwok.
    """
    from kubernetes.client import ApiException

    from support.nodeagent import NodeAgentProcess

    fake = control_plane.request("get", "/api/v1/nodes", params={"labelSelector": FAKE_NODE_SELECTOR})["items"]
    cordoned = [n["metadata"]["name"] for n in fake if not (n.get("spec") or {}).get("unschedulable")]
    with control_plane.api_client() as api:
        from kubernetes import client

        core = client.CoreV1Api(api)
        for name in cordoned:
            core.patch_node(name, {"spec": {"unschedulable": True}})
        agent = NodeAgentProcess(
            control_plane,
            tmp_path_factory.mktemp("node-agent"),
            list(AGENT_NODES),
            labels={E2E_NODE_LABEL: "true"},
            image_env=image_env(),
        )
        try:
            agent.start()
            yield agent
        finally:
            agent.stop()
            for name in cordoned:
                with contextlib.suppress(ApiException):
                    core.patch_node(name, {"spec": {"unschedulable": False}})


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama with its tokenizer (tests/trainer/tinymodels.py) and an alpaca dataset."""
    from trainer.tinymodels import write_dataset, write_model

    root = tmp_path_factory.mktemp("e2e-assets")
    write_model(root / "model")
    write_dataset(root / "train.jsonl", n=32)
    return root


@pytest.fixture(scope="session")
def kubectl_binary() -> Path:
    from support import testbin
    from support.requirements import unavailable

    try:
        return testbin.binary("kubectl")
    except testbin.MissingBinaryError as exc:
        reason = str(exc)
    unavailable(reason)


@pytest.fixture(scope="session")
def chart_helm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from support.helm import available

    return available(tmp_path_factory.mktemp("e2e-helm-home"))


@pytest.fixture
def e2e(
    request: pytest.FixtureRequest,
    control_plane: ControlPlane,
    training_operator: Any,
    agent_nodes: NodeAgentProcess,
    namespace: str,
    s3: S3Bucket,
    tiny_assets: Path,
    kubectl_binary: Path,
    chart_helm: Any,
    run_operator: Callable[..., OperatorRunner],
    tmp_path: Path,
) -> Iterator[E2E]:
    """The world of one scenario; see :class:`E2E`."""
    from support.kubectl import Kubectl

    s3_client = s3.client()
    for path in sorted((tiny_assets / "model").iterdir()):
        s3_client.upload_file(str(path), s3.bucket, MODEL_KEY + path.name)
    s3_client.upload_file(str(tiny_assets / "train.jsonl"), s3.bucket, DATA_KEY)
    control_plane.create(
        f"/api/v1/namespaces/{namespace}/secrets",
        {
            "metadata": {"name": S3_SECRET},
            "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key},
        },
    )
    chart = install_chart_rbac(chart_helm, control_plane, namespace, tmp_path)
    with control_plane.api_client() as api:
        world = E2E(
            ns=namespace,
            s3=s3,
            plane=control_plane,
            kubectl=Kubectl(control_plane.kubeconfig, namespace, home=tmp_path / "kubectl-home"),
            agent=agent_nodes,
            tmp=tmp_path,
            api=api,
            chart=chart,
            start_operator_runner=run_operator,
        )
        request.node.stash[_E2E_KEY] = world
        try:
            yield world
        finally:
            for watch in world.watches:
                watch.stop()
            delete_and_wait(world)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing scenario's report carries the node agent's log and every container log of its namespace."""
    from support.processes import log_tail

    report: pytest.TestReport = yield
    world = item.stash.get(_E2E_KEY, None)
    if report.failed and world is not None:
        report.sections.append((f"node agent log ({world.agent.log_path})", log_tail(world.agent.log_path, 8000)))
        for title, path in world.agent.container_logs(world.ns).items():
            report.sections.append((f"container {title} ({path})", log_tail(path, 6000) or "<empty>"))
    return report
