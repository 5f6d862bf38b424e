"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

pydantic emits JSON Schema (draft 2020-12) with $refs and anyOf-with-null; Kubernetes wants a structural OpenAPI v3
schema. `structural()` bridges the two, and the cross-field rules that JSON Schema cannot say are added as CEL
`x-kubernetes-validations` at their paths.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Iterator
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from finetune_operator.api import (
    KIND,
    MAX_JOB_NAME,
    PLURAL,
    SHORT_NAME,
    FineTuneJobSpec,
    FineTuneJobStatus,
)
from finetune_trainer.config import API_GROUP, API_VERSION, Model
from finetune_trainer.rules import is_mutable


def _rule(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model a field holds (unwrapping Optional and list), and whether it is a list of them."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        inner, _ = _model_of(args[0])
        return inner, True
    if args:  # Optional[X] unwraps to X; a union of several, a dict or a Literal holds no single model
        return _model_of(args[0]) if len(args) == 1 else (None, False)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _models(model: type[BaseModel], path: str) -> Iterator[tuple[type[BaseModel], str]]:
    """Every place of the schema where a model is used: (model, schema path), this one first."""
    yield model, path
    for name, field in model.model_fields.items():
        inner, many = _model_of(field.annotation)
        if inner is not None:
            yield from _models(inner, f"{path}.{to_camel(name)}{'[]' if many else ''}")


def _has_mutable(model: type[BaseModel]) -> bool:
    for name, field in model.model_fields.items():
        inner, many = _model_of(field.annotation)
        if is_mutable(model, name) or (inner is not None and not many and _has_mutable(inner)):
            return True
    return False


def immutable_fields(model: type[BaseModel] = FineTuneJobSpec, path: str = "spec") -> list[str]:
    """Schema paths of the spec fields that may not change once the FineTuneJob exists: every field but those
    marked mutable (finetune_trainer.rules.MUTABLE); an object with a mutable field inside is immutable field by
    field."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        inner, many = _model_of(field.annotation)
        if is_mutable(model, name):
            continue
        if inner is not None and not many and _has_mutable(inner):
            out += immutable_fields(inner, f"{path}.{to_camel(name)}")
        else:
            out.append(f"{path}.{to_camel(name)}")
    return out


def _immutable_rule(path: str) -> tuple[str, dict[str, str]]:
    parent, _, field = path.rpartition(".")
    return parent, _rule(
        f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})",
        f"{path} is immutable once the FineTuneJob exists; create a new FineTuneJob instead",
        field_path=f".{field}",
    )


def cel_rules() -> dict[str, list[dict[str, str]]]:
    """The x-kubernetes-validations by schema path (dot-separated property names; [] steps into array items): each
    model's RULES wherever the model is used, the immutability of the spec, and the name limit."""
    out: dict[str, list[dict[str, str]]] = {
        "": [
            _rule(
                f"!has(self.metadata.name) || self.metadata.name.size() <= {MAX_JOB_NAME}",
                f"metadata.name must be at most {MAX_JOB_NAME} characters (children append suffixes)",
            )
        ]
    }
    for model, path in _models(FineTuneJobSpec, "spec"):
        if issubclass(model, Model) and model.RULES:
            out.setdefault(path, []).extend(rule.validation(model) for rule in model.RULES)
    for path in immutable_fields():
        parent, rule = _immutable_rule(path)
        out.setdefault(parent, []).append(rule)
    return out


_DROP = {"title", "format", "$defs", "discriminator"}


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Turn a pydantic JSON schema into a structural OpenAPI v3 schema that Kubernetes accepts."""
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, list):
            return [resolve(n) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return resolve({**target, **extra})
        node = dict(node)
        if "anyOf" in node:
            options = [o for o in node.pop("anyOf") if o != {"type": "null"}]
            types = sorted(o.get("type", "") for o in options)
            if types == ["integer", "string"]:
                node["x-kubernetes-int-or-string"] = True
            elif len(options) == 1:
                merged = resolve(options[0])
                node = {**merged, **{k: v for k, v in node.items() if k not in merged or k == "description"}}
            else:
                raise ValueError(f"cannot express anyOf {options} structurally")
            if node.get("default", 0) is None:
                node.pop("default")
        if "const" in node:
            node["enum"] = [node.pop("const")]
        # draft 2020-12 writes exclusive bounds as numbers, OpenAPI v3.0 as a flag beside minimum/maximum.
        for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            if flag in node and not isinstance(node[flag], bool):
                node[bound] = node.pop(flag)
                node[flag] = True
        if "enum" in node and "type" not in node:
            node["type"] = "integer" if all(isinstance(v, int) for v in node["enum"]) else "string"
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROP:
                continue
            if key == "properties":
                required = set(node.get("required", []))
                out[key] = {name: resolve(_object_default(sub, name in required)) for name, sub in value.items()}
            elif key in ("items", "additionalProperties") and isinstance(value, dict):
                out[key] = resolve(value)
            else:
                out[key] = value
        if out.get("type") == "object":
            if out.get("additionalProperties") is False:
                del out["additionalProperties"]
            elif "properties" not in out and out.get("additionalProperties") in (None, True, {}):
                out.pop("additionalProperties", None)
                out["x-kubernetes-preserve-unknown-fields"] = True
            if isinstance(out.get("default"), dict) and out["default"]:
                # Let the nested defaults fill in: an empty object default is enough and never goes stale.
                out["default"] = {}
        elif "default" in out and isinstance(out["default"], list):
            out.pop("default")
        return out

    result: dict[str, Any] = resolve({k: v for k, v in schema.items() if k != "$defs"})
    return result


def _object_default(sub: dict[str, Any], required: bool) -> dict[str, Any]:
    """An optional, non-nullable object field has a default_factory in the model: the server defaults it to {}.

    pydantic leaves default_factory out of JSON schema; without a default the server would not create the object,
    and the defaults of its own fields would never apply.
    """
    if "$ref" in sub and not required and "default" not in sub:
        return {**sub, "default": {}}
    return sub


def _walk(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for step in filter(None, path.split(".")):
        items = step.endswith("[]")
        node = node["properties"][step.removesuffix("[]")]
        if items:
            node = node["items"]
    return node


def openapi_schema() -> dict[str, Any]:
    spec = structural(FineTuneJobSpec.model_json_schema(by_alias=True, mode="validation"))
    status = structural(FineTuneJobStatus.model_json_schema(by_alias=True, mode="serialization"))
    # status.progress.* is written by the trainer; unknown status keys from newer trainers are kept, not pruned.
    status.pop("required", None)
    # Conditions are a map keyed by type, so the operator and the trainer each server-side-apply their own entries
    # and neither write can drop the other's (a plain list is replaced whole).
    status["properties"]["conditions"].update({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    root: dict[str, Any] = {
        "type": "object",
        "description": "A supervised fine-tuning run of an open LLM.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    for path, rules in cel_rules().items():
        _walk(root, path).setdefault("x-kubernetes-validations", []).extend(rules)
    return root


def custom_resource_definition() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": ["all", "ml"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
                        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
                        {"name": "Method", "type": "string", "jsonPath": ".spec.method.type", "priority": 1},
                        {"name": "Nodes", "type": "integer", "jsonPath": ".spec.distribution.nodes", "priority": 1},
                        {"name": "Backend", "type": "string", "jsonPath": ".status.backend", "priority": 1},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `ftj crd` (make crds) from finetune_operator.api; do not edit by hand.\n"
    return header + yaml.safe_dump(custom_resource_definition(), sort_keys=False, width=120)
