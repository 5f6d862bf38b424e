"""Smoke tests proving the test API server is the real thing: CEL admission, status subresource, RBAC."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from support.controlplane import ControlPlane
from support.processes import wait_until

GROUP = "smoke.ftj.test"
VERSION = "v1"
PLURAL = "widgets"

# A test-only CRD: a CEL rule across two fields, and a status subresource.
WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["minReplicas", "maxReplicas"],
                                "properties": {
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer"},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.minReplicas <= self.maxReplicas",
                                        "message": "minReplicas must not exceed maxReplicas",
                                        "fieldPath": ".minReplicas",
                                    }
                                ],
                            },
                            "status": {
                                "type": "object",
                                "properties": {"phase": {"type": "string"}},
                            },
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def widgets(control_plane: ControlPlane) -> None:
    control_plane.apply_crds([WIDGET_CRD])


def _widget(name: str, min_replicas: int, max_replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"minReplicas": min_replicas, "maxReplicas": max_replicas},
    }


@pytest.mark.usefixtures("widgets")
def test_cel_rule_rejects_invalid_object_at_admission(k8s_api: client.ApiClient, namespace: str) -> None:
    custom = client.CustomObjectsApi(k8s_api)

    with pytest.raises(ApiException) as excinfo:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _widget("bad", 3, 1))

    assert excinfo.value.status == 422
    assert "minReplicas must not exceed maxReplicas" in excinfo.value.body
    assert "spec.minReplicas" in excinfo.value.body
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _widget("good", 1, 3))
    assert created["spec"] == {"minReplicas": 1, "maxReplicas": 3}


@pytest.mark.usefixtures("widgets")
def test_spec_update_leaves_status_untouched(k8s_api: client.ApiClient, namespace: str) -> None:
    custom = client.CustomObjectsApi(k8s_api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _widget("w", 1, 2))
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "w", {"status": {"phase": "Ready"}})

    # A write to the main resource that also carries a status change: the spec changes, the status does not.
    updated = custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "w", {"spec": {"maxReplicas": 5}, "status": {"phase": "Hacked"}}
    )

    assert updated["spec"]["maxReplicas"] == 5
    assert updated["status"] == {"phase": "Ready"}
    assert updated["metadata"]["generation"] == 2
    # And a status write does not bump the generation (it is not a spec change).
    after_status = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "w", {"status": {"phase": "Done"}}
    )
    assert after_status["metadata"]["generation"] == 2
    assert after_status["spec"]["maxReplicas"] == 5


def test_service_account_without_rules_is_denied_until_granted(
    control_plane: ControlPlane, k8s_api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})
    token_request = core.create_namespaced_service_account_token(
        "nobody", namespace, {"spec": {"expirationSeconds": 600}}
    )
    with control_plane.token_client(token_request.status.token) as sa_api:
        sa_core = client.CoreV1Api(sa_api)

        with pytest.raises(ApiException) as excinfo:
            sa_core.list_namespaced_pod(namespace)

        # 403, not 401: the token authenticated, and RBAC denied the request.
        assert excinfo.value.status == 403
        assert f"system:serviceaccount:{namespace}:nobody" in excinfo.value.body

        rbac = client.RbacAuthorizationV1Api(k8s_api)
        rbac.create_namespaced_role(
            namespace,
            {
                "metadata": {"name": "pod-reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
            },
        )
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": "nobody-reads-pods"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": namespace}],
            },
        )
        pods = wait_until(lambda: sa_core.list_namespaced_pod(namespace), timeout=30, what="RBAC grant to apply")
        assert pods.items == []
        with pytest.raises(ApiException) as still_denied:
            sa_core.list_namespaced_secret(namespace)
        assert still_denied.value.status == 403
