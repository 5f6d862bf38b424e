"""The committed CRD is exactly what the models generate, and it has the shape Kubernetes requires."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from finetune_operator.api import FineTuneJobSpec
from finetune_operator.crd import _model_of, _walk, crd_yaml, custom_resource_definition, immutable_fields
from finetune_trainer.config import NOT_RUN_DEFINING, Model, RunSpec, TrackingSpec

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"


def _nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        out += _nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        out += _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _nodes(schema["additionalProperties"], f"{path}{{}}")
    return out


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_committed_crd_equals_generated() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), "crds/ is stale: run `make crds`"


def test_ftj_crd_prints_the_committed_crd() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "finetune_operator", "crd"], check=True, capture_output=True, text=True
    ).stdout
    assert out == CRD_FILE.read_text()


def test_schema_is_structural() -> None:
    for path, node in _nodes(_schema()):
        typed = (
            "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        )
        assert typed, f"{path or '<root>'} has no type"
        assert not ({"anyOf", "oneOf", "allOf", "$ref", "const"} & node.keys()), f"{path}: not structural"
        assert not ("properties" in node and "additionalProperties" in node), f"{path}: both properties kinds"
        for bound in ("minimum", "maximum"):
            assert not isinstance(node.get(bound), bool), f"{path}: {bound} must be a number"
            assert node.get(f"exclusive{bound.title()}") in (None, True, False), f"{path}: draft-2020 bound"


def test_names_columns_and_status_subresource() -> None:
    crd = custom_resource_definition()
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Phase", "Progress", "Loss", "Age"]


def test_ranges_enums_and_defaults_come_from_the_models() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    lora = spec["method"]["properties"]["lora"]["properties"]
    assert lora["rank"]["minimum"] == 1
    assert lora["rank"]["default"] == 8
    lr = spec["training"]["properties"]["learningRate"]
    assert lr["minimum"] == 0
    assert lr["exclusiveMinimum"] is True
    assert spec["method"]["properties"]["type"]["enum"] == ["full", "freeze", "lora", "qlora", "dora"]
    assert spec["method"]["properties"]["quantization"]["properties"]["bits"]["enum"] == [4, 8]
    assert spec["distribution"]["properties"]["nodes"]["minimum"] == 1
    assert set(_schema()["properties"]["spec"]["required"]) == {"model", "datasets", "output"}
    assert spec["datasets"]["items"]["properties"]["uri"]["pattern"].startswith("^(s3://")


def test_every_models_rules_are_in_the_crd_wherever_the_model_is_used() -> None:
    schema = _schema()
    expected = {
        "spec": RunSpec.RULES,
        "spec.method": FineTuneJobSpec.model_fields["method"].annotation.RULES,  # type: ignore[union-attr]
        "spec.datasets[]": RunSpec.model_fields["datasets"].annotation.__args__[0].RULES,  # type: ignore[union-attr]
        "spec.evalDatasets[]": RunSpec.model_fields["datasets"].annotation.__args__[0].RULES,  # type: ignore[union-attr]
        "spec.tracking": TrackingSpec.RULES,
    }
    for path, rules in expected.items():
        assert rules, path
        found = {v["message"] for v in _walk(schema, path).get("x-kubernetes-validations", [])}
        assert {r.message.replace("{value}", "...") for r in rules} <= found, path
    assert "lora, qlora and dora" in " ".join(r.message for r in expected["spec.method"])


def _paths(model: type[BaseModel], path: str, skip: Any) -> list[str]:
    """Leaf field paths of a model, less those `skip` (NOT_RUN_DEFINING's shape) leaves out."""
    out = []
    for name, field in model.model_fields.items():
        part = skip.get(name) if isinstance(skip, dict) else None
        if part is True:
            continue
        inner, many = _model_of(field.annotation)
        sub = f"{path}.{to_camel(name)}"
        out += _paths(inner, sub, part or {}) if inner is not None and not many else [sub]
    return out


def test_no_run_defining_field_is_mutable() -> None:
    """A field that defines the run must never change under a running job: an edit would be ignored, or worse."""
    immutable = immutable_fields()
    run_defining = _paths(RunSpec, "spec", NOT_RUN_DEFINING)
    assert "spec.training.cutoffLen" in run_defining
    assert "spec.training.saveSteps" not in run_defining
    mutable = [p for p in run_defining if not any(p == i or p.startswith(i + ".") for i in immutable)]
    assert mutable == []


def test_immutability_is_declared_on_the_fields() -> None:
    spec = _schema()["properties"]["spec"]
    transition = [r for r in spec["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
    top = {r["fieldPath"].lstrip(".") for r in transition}
    assert top == {p.removeprefix("spec.") for p in immutable_fields() if p.count(".") == 1}
    assert "runPolicy" not in top
    run_policy = spec["properties"]["runPolicy"]["x-kubernetes-validations"]
    assert {r["fieldPath"].lstrip(".") for r in run_policy} == {
        "backoffLimit",
        "activeDeadlineSeconds",
        "cleanPodPolicy",
    }
    # Everything the operator does not act on when it changes is immutable: all of it but suspend and the TTL.
    all_fields = set(_paths(FineTuneJobSpec, "spec", {}))
    assert all_fields - {p for p in all_fields if any(p == i or p.startswith(i + ".") for i in immutable_fields())} == {
        "spec.runPolicy.suspend",
        "spec.runPolicy.ttlSecondsAfterFinished",
    }
    assert issubclass(FineTuneJobSpec, Model)


def test_crd_file_is_valid_yaml_with_one_document() -> None:
    docs = list(yaml.safe_load_all(CRD_FILE.read_text()))
    assert len(docs) == 1
    assert docs[0]["metadata"]["name"] == "finetunejobs.finetune.dev"


def test_api_models_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import finetune_trainer.config, finetune_operator.api, finetune_operator.crd, finetune_operator.cli\n"
        "assert 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_committed_api_reference_equals_generated() -> None:
    from finetune_operator.apidoc import api_markdown

    assert (ROOT / "docs" / "api.md").read_text() == api_markdown(), "docs/api.md is stale: run `make crds`"


def test_api_reference_lists_every_spec_field() -> None:
    from finetune_operator.apidoc import api_markdown

    text = api_markdown()
    for field in ("spec.method.lora.rank", "spec.training.cutoffLen", "spec.datasets[].tags.role_tag", "status.phase"):
        assert f"| `{field}` |" in text


def test_fsdp_settings_are_fsdp2_full_shard_with_sharded_checkpoints() -> None:
    from finetune_trainer.config import RunSpec as Spec
    from finetune_trainer.deepspeed import fsdp_config

    base = {"model": {"uri": "s3://models/base/"}, "datasets": [{"uri": "s3://data/t.json"}]}
    spec = Spec.model_validate({**base, "output": {"uri": "s3://runs/x/"}, "fsdp": {"offload": True}})
    got = fsdp_config(spec)
    assert (got["version"], got["reshard_after_forward"], got["state_dict_type"]) == (2, True, "SHARDED_STATE_DICT")
    assert got["cpu_offload"] is True
    assert got["activation_checkpointing"] is True  # gradientCheckpointing defaults on: FSDP's own does it
    assert spec.sharded()
    assert fsdp_config(spec, on_cpu=True)["cpu_offload"] is False  # on the CPU the shards are in CPU memory already
    with pytest.raises(ValueError, match="set deepspeed or fsdp, not both"):
        Spec.model_validate({**base, "output": {"uri": "s3://runs/x/"}, "fsdp": {}, "deepspeed": {}})
