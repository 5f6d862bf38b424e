"""The generated FineTuneJob CRD on a real kube-apiserver: schema, CEL rules, immutability, status subresource."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from ftjtest import GROUP, PLURAL, VERSION
from kubernetes import client
from kubernetes.client.rest import ApiException

ROOT = Path(__file__).resolve().parents[2]


def job(name: str = "demo", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://models/base/"},
            "datasets": [{"uri": "s3://data/train.json"}],
            "output": {"uri": "s3://runs/demo/"},
        },
    }
    body["spec"].update(spec)
    return body


@pytest.fixture
def crs(k8s_api: Any) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(k8s_api)


def create(crs: client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = crs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    return result


def rejected(crs: client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> str:
    with pytest.raises(ApiException) as info:
        create(crs, namespace, body)
    assert info.value.status == 422, info.value.body
    return str(info.value.body)


def test_every_example_is_admitted(crs: client.CustomObjectsApi, namespace: str) -> None:
    examples = sorted((ROOT / "examples").rglob("*.yaml"))
    admitted = 0
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob":
                create(crs, namespace, doc)
                admitted += 1
    assert admitted >= 5


def test_defaults_are_applied_by_the_server(crs: client.CustomObjectsApi, namespace: str) -> None:
    created = create(crs, namespace, job())
    spec = created["spec"]
    assert spec["method"]["type"] == "lora"
    assert spec["training"]["packing"] is True
    assert spec["distribution"] == {"backend": "pytorchjob", "nodes": 1, "procsPerNode": 1, "masterPort": 29500}
    assert spec["runPolicy"]["suspend"] is False


@pytest.mark.parametrize(
    ("case", "spec", "fragment"),
    [
        ("quantization without qlora", {"method": {"type": "lora", "quantization": {"bits": 4}}}, "qlora only"),
        ("bits 3", {"method": {"type": "qlora", "quantization": {"bits": 3}}}, "spec.method.quantization.bits"),
        ("lora with full", {"method": {"type": "full", "lora": {"rank": 8}}}, "lora settings apply"),
        ("nodes 0", {"distribution": {"nodes": 0}}, "spec.distribution.nodes"),
        ("rank 0", {"method": {"type": "lora", "lora": {"rank": 0}}}, "spec.method.lora.rank"),
        ("learning rate 0", {"training": {"learningRate": 0}}, "spec.training.learningRate"),
        ("bad uri", {"output": {"uri": "s3:/x"}}, "spec.output.uri"),
        ("ftp uri", {"model": {"uri": "ftp://host/m"}}, "spec.model.uri"),
        ("empty datasets", {"datasets": []}, "spec.datasets"),
        ("eval and valSize", {"evalDatasets": [{"uri": "s3://data/e.json"}], "valSize": 0.1}, "not both"),
        ("two warmups", {"training": {"warmupSteps": 5, "warmupRatio": 0.1}}, "not both"),
        ("offload all at stage 2", {"deepspeed": {"zeroStage": 2, "offload": "all"}}, "zeroStage 3"),
        ("unknown tracker", {"tracking": {"reportTo": ["comet"]}}, "spec.tracking.reportTo[0]"),
        ("tracker twice", {"tracking": {"reportTo": ["wandb", "wandb"]}}, "spec.tracking.reportTo[1]"),
        ("unknown attention", {"training": {"attention": "flex"}}, "spec.training.attention"),
        ("bad accelerator", {"distribution": {"acceleratorResource": "gpu"}}, "spec.distribution.acceleratorResource"),
        ("samples fromEval -1", {"output": {"uri": "s3://r/x/", "samples": {"fromEval": -1}}}, "fromEval"),
    ],
)
def test_bad_spec_is_refused_at_admission(
    crs: client.CustomObjectsApi, namespace: str, case: str, spec: dict[str, Any], fragment: str
) -> None:
    assert fragment in rejected(crs, namespace, job(**spec))


CROSS_FIELD = [
    {"method": {"type": "full", "lora": {"rank": 8}}},
    {"method": {"type": "dora", "quantization": {"bits": 4}}},
    {"method": {"lora": {"rank": 8}, "freeze": {"trainableLayers": 2}}},  # type left to its default (lora)
    {"deepspeed": {"offload": "all"}},  # zeroStage left to its default (2)
    {"deepspeed": {"zeroStage": 1, "offload": "all"}},
    {"training": {"warmupSteps": 5, "warmupRatio": 0.1}},
    {"evalDatasets": [{"uri": "s3://data/e.json"}], "valSize": 0.1},
    {"datasets": [{"uri": "s3://data/t.json", "format": "alpaca", "tags": {"role_tag": "role"}}]},
    {"tracking": {"reportTo": ["wandb"], "mlflowTrackingUri": "http://mlflow:5000"}},
    {"tracking": {"mlflowTrackingUri": "http://mlflow:5000"}},
    {"deepspeed": {"zeroStage": 3}, "fsdp": {"offload": True}},
    {"deepspeed": {}, "fsdp": {}},
    # What a TrainJob cannot carry (a rule between two objects of the spec).
    {"distribution": {"backend": "trainjob"}, "scheduling": {"priorityClassName": "high"}},
    {"distribution": {"backend": "trainjob"}, "scheduling": {"schedulerName": "volcano"}},
    {"distribution": {"backend": "trainjob"}, "scheduling": {"gangScheduling": True}},
    {"distribution": {"backend": "trainjob", "nodes": 2}, "imagePullPolicy": "Always"},
]


@pytest.mark.parametrize(
    "spec",
    [
        {"distribution": {"backend": "trainjob"}, "scheduling": {"gangScheduling": False, "queueName": "q"}},
        {"distribution": {"backend": "auto"}, "scheduling": {"priorityClassName": "high"}},
        {"scheduling": {"priorityClassName": "high", "gangScheduling": True}, "imagePullPolicy": "Always"},
    ],
    ids=["trainjob-without-them", "auto", "pytorchjob-by-default"],
)
def test_fields_a_trainjob_cannot_carry_are_admitted_on_the_other_backends(
    crs: client.CustomObjectsApi, namespace: str, spec: dict[str, Any]
) -> None:
    from finetune_operator.api import validate_document

    assert validate_document(job(**spec))[1] == []
    assert create(crs, namespace, job(**spec))["spec"]["distribution"]["backend"] in ("trainjob", "auto", "pytorchjob")


@pytest.mark.parametrize("spec", CROSS_FIELD, ids=lambda spec: ",".join(spec))
def test_a_cross_field_rule_says_the_same_at_admission_as_ftj_validate(
    crs: client.CustomObjectsApi, namespace: str, spec: dict[str, Any]
) -> None:
    from finetune_operator.api import validate_document

    _, errors = validate_document(job(**spec))
    (error,) = errors
    path, message = error.split(": ", 1)
    with pytest.raises(ApiException) as info:
        create(crs, namespace, job(**spec))
    assert info.value.status == 422
    causes = json.loads(info.value.body)["details"]["causes"]
    # The same path (ftj validate writes list indices as .N, the API server as [N]) and the same message.
    fields = [(re.sub(r"\[(\d+)\]", r".\1", c["field"]), c["message"]) for c in causes]
    assert fields == [(path, f'Invalid value: "object": {message}')]


def test_dataset_tags_are_kept_in_the_spelling_given(crs: client.CustomObjectsApi, namespace: str) -> None:
    tags = {"role_tag": "role", "contentTag": "content"}
    created = create(crs, namespace, job(datasets=[{"uri": "s3://data/t.json", "format": "sharegpt", "tags": tags}]))
    assert created["spec"]["datasets"][0]["tags"] == tags, "neither spelling pruned, no default added beside it"


def test_fields_the_operator_does_not_act_on_cannot_change(crs: client.CustomObjectsApi, namespace: str) -> None:
    create(crs, namespace, job(scheduling={"nodeSelector": {"pool": "a"}}, runPolicy={"backoffLimit": 2}))
    for patch, path in (
        ({"spec": {"scheduling": {"nodeSelector": {"pool": "b"}}}}, "spec.scheduling"),
        ({"spec": {"imagePullPolicy": "Always"}}, "spec.imagePullPolicy"),
        ({"spec": {"runPolicy": {"backoffLimit": 5}}}, "spec.runPolicy.backoffLimit"),
    ):
        with pytest.raises(ApiException) as info:
            crs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "demo", patch)
        assert info.value.status == 422
        assert f"{path} is immutable" in str(info.value.body)


def test_missing_model_is_refused(crs: client.CustomObjectsApi, namespace: str) -> None:
    body = job()
    del body["spec"]["model"]
    assert "spec.model" in rejected(crs, namespace, body)


def test_long_name_is_refused(crs: client.CustomObjectsApi, namespace: str) -> None:
    assert "at most 50" in rejected(crs, namespace, job(name="a" * 51))


def test_run_defining_spec_is_immutable_but_run_policy_is_not(crs: client.CustomObjectsApi, namespace: str) -> None:
    create(crs, namespace, job())
    for patch in (
        {"spec": {"training": {"learningRate": 0.5}}},
        {"spec": {"model": {"uri": "s3://models/other/"}}},
        {"spec": {"distribution": {"nodes": 4}}},
        {"spec": {"valSize": 0.2}},
    ):
        with pytest.raises(ApiException) as info:
            crs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "demo", patch)
        assert info.value.status == 422
        assert "immutable" in str(info.value.body)
    updated = crs.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "demo",
        {"spec": {"runPolicy": {"suspend": True, "ttlSecondsAfterFinished": 60}}},
    )
    assert updated["spec"]["runPolicy"]["suspend"] is True
    assert updated["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == 60


def report_progress(crs: client.CustomObjectsApi, namespace: str) -> None:
    """Write status as the trainer does: Running at step 3 of 10."""
    progress = {"step": 3, "totalSteps": 10, "loss": 1.5, "summary": "3/10"}
    crs.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "demo", {"status": {"phase": "Running", "progress": progress}}
    )


def test_status_is_a_subresource(crs: client.CustomObjectsApi, namespace: str) -> None:
    create(crs, namespace, job())
    report_progress(crs, namespace)
    body = copy.deepcopy(crs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "demo"))
    body["status"] = {"phase": "Failed"}
    body["spec"]["runPolicy"]["suspend"] = True
    after = crs.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "demo", body)
    assert after["status"]["phase"] == "Running"  # a spec write does not touch status
    assert after["status"]["progress"]["summary"] == "3/10"
    assert after["spec"]["runPolicy"]["suspend"] is True


def test_printer_columns_show_phase_progress_loss(k8s_api: Any, namespace: str, crs: client.CustomObjectsApi) -> None:
    create(crs, namespace, job())
    report_progress(crs, namespace)
    # The operator records the backend it runs the job on (auto's choice too): `kubectl get ftj -o wide` shows it.
    crs.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "demo", {"status": {"backend": "job"}})
    table = k8s_api.call_api(
        f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}",
        "GET",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        auth_settings=["BearerToken"],
        response_type="object",
        _return_http_data_only=True,
    )
    names = [c["name"] for c in table["columnDefinitions"]]
    row = dict(zip(names, table["rows"][0]["cells"], strict=True))
    assert (row["Phase"], row["Progress"], row["Loss"], row["Backend"]) == ("Running", "3/10", 1.5, "job")
