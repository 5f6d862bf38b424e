"""Bad FineTuneJob input is refused with a message that names the field and the bad value."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune_operator.api import validate_document, validate_spec


def base() -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo"},
        "spec": {
            "model": {"uri": "s3://models/qwen/"},
            "datasets": [{"uri": "s3://data/train.json"}],
            "output": {"uri": "s3://runs/demo/"},
        },
    }


def with_change(path: str, value: Any) -> dict[str, Any]:
    doc = base()
    node = doc
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {}) if not key.isdigit() else node[int(key)]  # type: ignore[index]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()

# (case, path changed, value, expected field path in the message, expected fragment of the message)
CASES = [
    ("unknown field", "spec.methd", {"type": "lora"}, "spec.methd", "unknown field"),
    ("unknown nested field", "spec.training.learning_rte", 1e-4, "spec.training.learning_rte", "unknown field"),
    ("wrong type", "spec.training.epochs", "three", "spec.training.epochs", "'three'"),
    ("learning rate zero", "spec.training.learningRate", 0, "spec.training.learningRate", "greater than 0"),
    ("learning rate negative", "spec.training.learningRate", -1e-4, "spec.training.learningRate", "-0.0001"),
    ("lora rank zero", "spec.method", {"type": "lora", "lora": {"rank": 0}}, "spec.method.lora.rank", "(got 0)"),
    ("nodes zero", "spec.distribution", {"nodes": 0}, "spec.distribution.nodes", "(got 0)"),
    ("s3 with one slash", "spec.output.uri", "s3:/x", "spec.output.uri", "'s3:/x'"),
    ("ftp scheme", "spec.model.uri", "ftp://host/model", "spec.model.uri", "'ftp://'"),
    ("bad bucket", "spec.datasets", [{"uri": "s3://B/x.json"}], "spec.datasets.0.uri", "'s3://B/x.json'"),
    (
        "quantization bits 3",
        "spec.method",
        {"type": "qlora", "quantization": {"bits": 3}},
        "spec.method.quantization.bits",
        "(got 3)",
    ),
    (
        "quantization without qlora",
        "spec.method",
        {"type": "lora", "quantization": {"bits": 4}},
        "spec.method",
        "quantization applies to qlora only",
    ),
    (
        "lora settings with full",
        "spec.method",
        {"type": "full", "lora": {"rank": 8}},
        "spec.method",
        "not to type 'full'",
    ),
    ("empty dataset list", "spec.datasets", [], "spec.datasets", "at least 1 item"),
    ("missing model", "spec.model", _DELETE, "spec.model", "required field is missing"),
    ("missing output", "spec.output", _DELETE, "spec.output", "required field is missing"),
    ("unknown method", "spec.method", {"type": "rlhf"}, "spec.method.type", "'rlhf'"),
    ("unknown template", "spec.template", "vicuna-9", "spec.template", "'vicuna-9'"),
    (
        "both eval sources",
        "spec.evalDatasets",
        [{"uri": "s3://data/eval.json"}],
        "spec",
        "evalDatasets or valSize",
    ),
    ("name too long", "metadata.name", "a" * 51, "metadata.name", "at most 50"),
    ("name not DNS", "metadata.name", "My_Job", "metadata.name", "'My_Job'"),
    ("credentials in env", "spec.env", [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}], "spec.env", "secretRef"),
    (
        "offload all below stage 3",
        "spec.deepspeed",
        {"zeroStage": 2, "offload": "all"},
        "spec.deepspeed",
        "zeroStage 3",
    ),
    ("val size one", "spec.valSize", 1.0, "spec.valSize", "(got 1.0)"),
    ("bad shard size", "spec.output.merge", {"maxShardSize": "lots"}, "spec.output.merge.maxShardSize", "'lots'"),
]


@pytest.mark.parametrize(("case", "path", "value", "field", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_field_and_value(case: str, path: str, value: Any, field: str, fragment: str) -> None:
    doc = with_change(path, value)
    if case == "both eval sources":
        doc["spec"]["valSize"] = 0.1
    job, errors = validate_document(doc)
    assert job is None
    matching = [e for e in errors if e.split(":", 1)[0] == field]
    assert matching, f"no error for {field}: {errors}"
    assert any(fragment in e for e in matching), errors


def test_all_errors_are_reported_at_once() -> None:
    doc = base()
    doc["spec"]["training"] = {"learningRate": 0, "epochs": -1}
    doc["spec"]["method"] = {"type": "full", "lora": {"rank": 0}}
    doc["spec"]["distribution"] = {"nodes": 0}
    _, errors = validate_document(doc)
    fields = {e.split(":", 1)[0] for e in errors}
    assert {
        "spec.training.learningRate",
        "spec.training.epochs",
        "spec.method.lora.rank",
        "spec.method",
        "spec.distribution.nodes",
    } <= fields


def test_valid_base_passes_and_defaults_apply() -> None:
    job, errors = validate_document(base())
    assert errors == []
    assert job is not None
    assert job.spec.method.type == "lora"
    assert job.spec.training.packing is True
    assert job.spec.distribution.backend == "pytorchjob"
    assert job.spec.merge_enabled() is True


def test_lora_target_accepts_llamafactory_spelling() -> None:
    spec = copy.deepcopy(base()["spec"])
    spec["method"] = {"type": "lora", "lora": {"target": "q_proj, v_proj"}}
    parsed, errors = validate_spec(spec)
    assert errors == []
    assert parsed is not None
    assert parsed.method.lora is not None
    assert parsed.method.lora.target == ["q_proj", "v_proj"]


def test_spec_errors_are_prefixed_for_status_messages() -> None:
    spec = base()["spec"]
    spec["training"] = {"learningRate": -1}
    _, errors = validate_spec(spec)
    assert errors == ["spec.training.learningRate: Input should be greater than 0 (got -1)"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=30,
)
spec_keys = st.sampled_from(
    ["model", "datasets", "method", "training", "output", "distribution", "deepspeed", "valSize", "env", "storage"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=json_values, spec=st.dictionaries(spec_keys, json_values, max_size=6))
def test_random_documents_only_ever_give_validation_errors(doc: Any, spec: dict[str, Any]) -> None:
    for candidate in (doc, {**base(), "spec": spec}, {**base(), "spec": {**base()["spec"], **spec}}):
        job, errors = validate_document(candidate)
        assert (job is None) == bool(errors)
        assert all(isinstance(e, str) and ": " in e for e in errors)


def test_dataset_tags_take_dataset_info_spelling_and_camel_case_but_not_both() -> None:
    doc = base()
    doc["spec"]["datasets"] = [
        {"uri": "s3://data/a.json", "format": "sharegpt", "tags": {"role_tag": "role", "contentTag": "content"}}
    ]
    job, errors = validate_document(doc)
    assert errors == []
    assert job is not None
    tags = job.spec.datasets[0].tags
    assert tags is not None
    assert (tags.role_tag, tags.content_tag, tags.user_tag) == ("role", "content", "human")
    assert tags.to_wire()["content_tag"] == "content", "the trainer gets dataset_info.json's spelling"

    doc["spec"]["datasets"][0]["tags"] = {"role_tag": "role", "roleTag": "speaker"}
    _, errors = validate_document(doc)
    assert errors == ["spec.datasets.0.tags: set role_tag or roleTag, not both"]
