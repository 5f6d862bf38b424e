"""Fixtures of the operator's control-plane tests: typed clients for the test namespace and a running operator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ftjtest import Cluster, operator_env
from kubernetes import client


@pytest.fixture
def cluster(k8s_api: client.ApiClient, namespace: str) -> Cluster:
    return Cluster(k8s_api, namespace)


@pytest.fixture
def operator(run_operator: Callable[..., Any], namespace: str) -> Iterator[Any]:
    with run_operator(namespaces=[namespace], env=operator_env(namespace)) as op:
        yield op
