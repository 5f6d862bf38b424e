"""The committed CRD is exactly what the models generate, and it has the shape Kubernetes requires."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.crd import IMMUTABLE, crd_yaml, custom_resource_definition

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


def test_cross_field_and_immutability_rules_are_present() -> None:
    spec = _schema()["properties"]["spec"]
    rules = " ".join(r["rule"] for r in spec["properties"]["method"]["x-kubernetes-validations"])
    assert "self.type == 'qlora'" in rules
    assert "['lora', 'qlora', 'dora']" in rules
    transition = [r for r in spec["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
    assert {r["fieldPath"].lstrip(".") for r in transition} == set(IMMUTABLE)
    assert "runPolicy" not in IMMUTABLE
    assert all(field in spec["properties"] for field in IMMUTABLE)


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
