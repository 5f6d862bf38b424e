"""Smoke test for the kopf operator runner: a tiny operator written by the test reacts to objects in the test's
namespace on the real API server, and its log is captured."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

from kubernetes import client

from support.operator_runner import OperatorRunner
from support.processes import wait_until

ECHO_OPERATOR = textwrap.dedent(
    '''
    """A test-only kopf operator: copies a ConfigMap's "message" into "echoed"."""
    import kopf


    @kopf.on.create("configmaps", labels={"ftj.test/echo": "yes"})
    def echo(body, patch, logger, **_):
        patch.setdefault("data", {})["echoed"] = body.get("data", {}).get("message", "")
        logger.info("echoed configmap %s", body["metadata"]["name"])
    '''
)


def test_runner_runs_a_kopf_operator_module_against_the_control_plane(
    run_operator: Callable[..., OperatorRunner], k8s_api: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "echo_operator.py").write_text(ECHO_OPERATOR)
    core = client.CoreV1Api(k8s_api)

    with run_operator(module="echo_operator", pythonpath=[tmp_path], namespaces=[namespace]) as operator:
        core.create_namespaced_config_map(
            namespace,
            {"metadata": {"name": "hello", "labels": {"ftj.test/echo": "yes"}}, "data": {"message": "hi"}},
        )
        echoed = wait_until(
            lambda: (core.read_namespaced_config_map("hello", namespace).data or {}).get("echoed"),
            timeout=60,
            what="the operator to echo the ConfigMap",
        )
        assert echoed == "hi"
        assert operator.running()

    assert not operator.running()
    assert "echoed configmap hello" in operator.log()
