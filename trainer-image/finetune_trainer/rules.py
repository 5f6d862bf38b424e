"""Rules between fields of the API, declared once per model and checked twice from that one declaration.

A model lists its rules in `RULES`. pydantic checks them on the raw input (finetune_trainer.config.Model), so that
they are reported along with every field error; the CRD generator (finetune_operator.crd) writes each one as a CEL
`x-kubernetes-validations` entry at every place of the schema where the model is used, so that the API server
refuses the same documents at admission. Both sides say the same message, at the same path (the object that holds
the fields), with the value that broke the rule where there is one (CEL through `messageExpression`).

A field left out of a document counts as its model default on both sides (the API server fills in defaults before
it validates), and an empty list counts as left out.

Mutability is declared on the field too: `Annotated[T, MUTABLE]` marks a spec field that may change after creation
because the operator acts on the change; every other field is immutable, and the CRD refuses edits to it.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticUndefined


class Raw(dict[str, Any]):
    """Raw input that answers to a field's python name or its camelCase alias."""

    def has(self, name: str) -> bool:
        value = self.value(name)
        return value is not None and value != []

    def value(self, name: str, default: Any = None) -> Any:
        for key in (name, to_camel(name)):
            if self.get(key) is not None:
                return self[key]
        return default


@dataclass(frozen=True)
class Mutable:
    """Marks a FineTuneJob spec field the operator acts on when it changes (see the module docstring)."""


MUTABLE = Mutable()


def is_mutable(model: type[BaseModel], name: str) -> bool:
    return any(isinstance(m, Mutable) for m in model.model_fields[name].metadata)


def _default(model: type[BaseModel], name: str) -> Any:
    field = model.model_fields[name]
    if field.default is not PydanticUndefined:
        return field.default
    return None


def _is_list(model: type[BaseModel], name: str) -> bool:
    annotation = model.model_fields[name].annotation
    return any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation)))


def _cel_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings double-quoted; numbers as they are


def _cel_present(model: type[BaseModel], name: str) -> str:
    field = to_camel(name)
    if _is_list(model, name):
        return f"(has(self.{field}) && size(self.{field}) > 0)"
    return f"has(self.{field})"


def _cel_value(model: type[BaseModel], name: str) -> str:
    """The field's value in CEL, its model default when it is left out."""
    field = to_camel(name)
    default = _default(model, name)
    if default is None:
        return f"self.{field}"
    return f"(has(self.{field}) ? self.{field} : {_cel_literal(default)})"


def _cel_show(model: type[BaseModel], name: str) -> str:
    """A CEL string expression for the field's value as Python's repr shows it."""
    value = _cel_value(model, name)
    if isinstance(_default(model, name), str):
        return f'"\'" + {value} + "\'"'
    choices = typing.get_args(model.model_fields[name].annotation)
    if choices and all(isinstance(c, int) for c in choices):
        # A lookup instead of string(): the API server cannot bound the cost of converting any integer.
        table = ", ".join(f"{c}: {json.dumps(repr(c))}" for c in choices)
        return f"{{{table}}}[{value}]"
    return f"string({value})"


@dataclass(frozen=True)
class Rule:
    """One rule between fields. `message` may hold `{value}`: the value of the field the rule is about (`shows`)."""

    message: str

    def violated(self, model: type[BaseModel], data: Raw) -> bool:
        raise NotImplementedError

    def cel(self, model: type[BaseModel]) -> str:
        """The rule as a CEL expression that is true when the object is valid."""
        raise NotImplementedError

    @property
    def shows(self) -> str | None:
        return None

    def explain(self, model: type[BaseModel], data: Raw) -> str:
        if self.shows is None:
            return self.message
        return self.message.format(value=repr(data.value(self.shows, _default(model, self.shows))))

    def validation(self, model: type[BaseModel]) -> dict[str, str]:
        """The x-kubernetes-validations entry."""
        out = {"rule": self.cel(model), "message": self.message.replace("{value}", "...")}
        if self.shows is not None:
            head, _, tail = self.message.partition("{value}")
            parts = [json.dumps(head) if head else "", _cel_show(model, self.shows), json.dumps(tail) if tail else ""]
            out["messageExpression"] = " + ".join(part for part in parts if part)
        return out


@dataclass(frozen=True)
class OnlyFor(Rule):
    """`field` may be set only while `selector` is one of `values`."""

    field: str = ""
    selector: str = ""
    values: Sequence[Any] = ()

    @property
    def shows(self) -> str | None:
        return self.selector if "{value}" in self.message else None

    def violated(self, model: type[BaseModel], data: Raw) -> bool:
        return data.has(self.field) and data.value(self.selector, _default(model, self.selector)) not in self.values

    def cel(self, model: type[BaseModel]) -> str:
        allowed = ", ".join(_cel_literal(v) for v in self.values)
        return f"!{_cel_present(model, self.field)} || {_cel_value(model, self.selector)} in [{allowed}]"


@dataclass(frozen=True)
class NotBoth(Rule):
    """At most one of `first` and `second` may be set."""

    first: str = ""
    second: str = ""

    def violated(self, model: type[BaseModel], data: Raw) -> bool:
        return data.has(self.first) and data.has(self.second)

    def cel(self, model: type[BaseModel]) -> str:
        return f"!({_cel_present(model, self.first)} && {_cel_present(model, self.second)})"


def not_both(first: str, second: str) -> NotBoth:
    return NotBoth(f"set {to_camel(first)} or {to_camel(second)}, not both", first, second)


@dataclass(frozen=True)
class Needs(Rule):
    """When `field` is `value`, `other` must be `other_value` (the message shows `other`)."""

    field: str = ""
    value: Any = None
    other: str = ""
    other_value: Any = None

    @property
    def shows(self) -> str | None:
        return self.other if "{value}" in self.message else None

    def violated(self, model: type[BaseModel], data: Raw) -> bool:
        other = data.value(self.other, _default(model, self.other))
        return bool(data.value(self.field) == self.value and other != self.other_value)

    def cel(self, model: type[BaseModel]) -> str:
        when = f"has(self.{to_camel(self.field)}) && self.{to_camel(self.field)} == {_cel_literal(self.value)}"
        return f"!({when}) || {_cel_value(model, self.other)} == {_cel_literal(self.other_value)}"


@dataclass(frozen=True)
class WithItem(Rule):
    """`field` may be set only while the list `within` holds `item`."""

    field: str = ""
    within: str = ""
    item: Any = None

    def violated(self, model: type[BaseModel], data: Raw) -> bool:
        return data.has(self.field) and self.item not in (data.value(self.within) or [])

    def cel(self, model: type[BaseModel]) -> str:
        within = to_camel(self.within)
        present = f"has(self.{within}) && {_cel_literal(self.item)} in self.{within}"
        return f"!{_cel_present(model, self.field)} || ({present})"


def human_list(names: Sequence[str], conjunction: str = "and") -> str:
    """a, b and c."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


def _field_model(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The model a field holds (through Optional), or None for a plain value."""
    annotation = model.model_fields[name].annotation
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _leaf(model: type[BaseModel], path: str) -> tuple[type[BaseModel], str]:
    """The model that holds the last field of a dotted path of python names, and that field's name."""
    *parents, name = path.split(".")
    for parent in parents:
        inner = _field_model(model, parent)
        if inner is None:
            raise ValueError(f"{path}: {parent} is not an object field of {model.__name__}")
        model = inner
    return model, name


def _raw_at(data: Raw, path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        value = Raw(value).value(part) if isinstance(value, dict) else None
    return value


def _cel_chain(path: str) -> str:
    """`has(self.a) && has(self.a.b)`: whether every step of a dotted path is there."""
    parts = [to_camel(p) for p in path.split(".")]
    return " && ".join(f"has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))


def camel_path(path: str) -> str:
    return ".".join(to_camel(p) for p in path.split("."))


@dataclass(frozen=True)
class NotOn(Rule):
    """`field` may not be set (to anything but false, "" or []) while `selector` is `value`; both are dotted paths
    below the model that declares the rule, for a constraint between two of its objects."""

    field: str = ""
    selector: str = ""
    value: Any = None

    def violated(self, model: type[BaseModel], data: Raw) -> bool:
        holder, name = _leaf(model, self.selector)
        selected = _raw_at(data, self.selector)
        if selected is None:
            selected = _default(holder, name)
        return selected == self.value and bool(_raw_at(data, self.field))

    def cel(self, model: type[BaseModel]) -> str:
        holder, name = _leaf(model, self.selector)
        selector = f"self.{camel_path(self.selector)}"
        default = _default(holder, name)
        value = selector if default is None else f"({_cel_chain(self.selector)} ? {selector} : {_cel_literal(default)})"
        field_holder, field_name = _leaf(model, self.field)
        field = f"self.{camel_path(self.field)}"
        if _is_list(field_holder, field_name):
            truthy = f"size({field}) > 0"
        elif field_holder.model_fields[field_name].annotation is bool:
            truthy = f"{field} == true"
        elif isinstance(_default(field_holder, field_name), str) or _default(field_holder, field_name) is None:
            truthy = f'{field} != ""'
        else:
            truthy = "true"
        return f"!({value} == {_cel_literal(self.value)} && {_cel_chain(self.field)} && {truthy})"
