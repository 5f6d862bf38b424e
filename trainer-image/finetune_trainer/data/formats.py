"""alpaca and sharegpt records → Conversation, with LLaMA-Factory's column/tag mapping and its rules for bad rows.

A file-level problem (a required column missing, a format that cannot be told) is a DataError. A bad row (wrong
turn order, unknown role, missing response) is dropped and counted, as LLaMA-Factory does; the caller turns "every
row dropped" into a DataError.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from finetune_trainer.config import ALPACA_COLUMNS, SHAREGPT_COLUMNS, DatasetSpec, DatasetTags
from finetune_trainer.data.conversation import Conversation, Turn, check_turns
from finetune_trainer.data.readers import SourceFile
from finetune_trainer.errors import DataError

Format = Literal["alpaca", "sharegpt"]

# Optional columns are read when the file has them under these names, even if the spec does not map them: a
# dataset carrying `system` or `history` means it (LLaMA-Factory needs them spelled out; here that is optional).
ALPACA_DEFAULTS = {**ALPACA_COLUMNS, "system": "system", "history": "history"}
SHAREGPT_DEFAULTS = {**SHAREGPT_COLUMNS, "system": "system", "tools": "tools"}
# OpenAI-style messages, which LLaMA-Factory reads as sharegpt with these tags.
OPENAI_TAGS = DatasetTags(
    role_tag="role",
    content_tag="content",
    user_tag="user",
    assistant_tag="assistant",
    observation_tag="tool",
    function_tag="function_call",
    system_tag="system",
)
SHOWN_DROPS = 5


@dataclass
class Drops:
    """Rows left out, by reason, with the first few locations for the log."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < SHOWN_DROPS:
            self.examples.append(f"{where}: {reason}")

    def merge(self, other: Drops) -> None:
        self.counts.update(other.counts)
        self.examples.extend(other.examples[: max(0, SHOWN_DROPS - len(self.examples))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{count} {reason}" for reason, count in self.counts.most_common(5))


def _mapping(spec: DatasetSpec, defaults: dict[str, str]) -> dict[str, str]:
    given = spec.columns.model_dump(exclude_none=True) if spec.columns else {}
    return {**defaults, **given}


def detect_format(spec: DatasetSpec, source: SourceFile) -> tuple[Format, dict[str, str], DatasetTags]:
    """The format, the column mapping and the tags to read `source` with; DataError when columns are missing."""
    columns = source.columns
    tags = spec.tags or DatasetTags()
    fmt = spec.format
    if fmt == "auto":
        sharegpt = _mapping(spec, SHAREGPT_DEFAULTS)
        alpaca = _mapping(spec, ALPACA_DEFAULTS)
        if sharegpt["messages"] in columns or "messages" in columns:
            fmt = "sharegpt"
        elif alpaca["prompt"] in columns and alpaca["response"] in columns:
            fmt = "alpaca"
        else:
            raise DataError(
                f"{source.path}: cannot tell the dataset format from its columns ({', '.join(sorted(columns))}): "
                f"alpaca needs {alpaca['prompt']!r} and {alpaca['response']!r}, sharegpt needs "
                f"{sharegpt['messages']!r}; map the columns in `columns` or set `format`"
            )
    if fmt == "alpaca":
        mapping = _mapping(spec, ALPACA_DEFAULTS)
        required: tuple[str, ...] = ("prompt", "response")
    else:
        mapping = _mapping(spec, SHAREGPT_DEFAULTS)
        required = ("messages",)
        explicit = spec.columns is not None and spec.columns.messages is not None
        if not explicit and mapping["messages"] not in columns and "messages" in columns:
            mapping["messages"] = "messages"
        if spec.tags is None:
            tags = _guess_tags(source, mapping["messages"])
    for key in required:
        if mapping[key] not in columns:
            raise DataError(
                f"{source.path}: column {mapping[key]!r} ({key}) required by format {fmt} is missing; "
                f"columns present: {', '.join(sorted(columns)) or 'none'}"
            )
    return fmt, mapping, tags


def _guess_tags(source: SourceFile, column: str) -> DatasetTags:
    # Without tags LLaMA-Factory assumes from/value; OpenAI-style role/content files are recognised instead of
    # having every row dropped for an unknown role.
    default = DatasetTags()
    for row in source.rows[:100]:
        messages = _maybe_json(row.get(column))
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            first = messages[0]
            if default.role_tag not in first and "role" in first and "content" in first:
                return OPENAI_TAGS
            return default
    return default


def _maybe_json(value: Any) -> Any:
    # CSV (and some JSON exports) carry nested values as JSON text.
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _text_or_none(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _BadRowError(f"expected text, got {type(value).__name__}")
    return value or None


class _BadRowError(Exception):
    """A row that cannot be used; its message is the drop reason."""


def _tools(value: Any) -> Any:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _BadRowError("tools is not valid JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise _BadRowError("tools must be a JSON list of tool descriptions")
    return value or None


def _alpaca(row: dict[str, Any], mapping: dict[str, str], origin: str) -> Conversation:
    # LLaMA-Factory joins instruction and input with a newline and leaves out whichever is empty.
    parts = []
    for key in ("prompt", "query"):
        value = row.get(mapping[key])
        if value is not None and not isinstance(value, str):
            raise _BadRowError(f"{mapping[key]} is {type(value).__name__}, not text")
        if value:
            parts.append(value)
    response = row.get(mapping["response"])
    if not isinstance(response, str):
        raise _BadRowError(f"{mapping['response']} is missing or not text")
    turns: list[Turn] = []
    history = _maybe_json(row.get(mapping["history"])) if mapping.get("history") else None
    if history:
        if not isinstance(history, list):
            raise _BadRowError("history is not a list of [query, response] pairs")
        for index, pair in enumerate(history):
            if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise _BadRowError(f"history entry {index + 1} is not a [query, response] pair of texts")
            turns += [Turn("user", pair[0]), Turn("assistant", pair[1])]
    turns += [Turn("user", "\n".join(parts)), Turn("assistant", response)]
    system = _text_or_none(row.get(mapping["system"])) if mapping.get("system") else None
    return Conversation(tuple(turns), system=system, origin=origin)


def _sharegpt(row: dict[str, Any], mapping: dict[str, str], tags: DatasetTags, origin: str) -> Conversation:
    messages = _maybe_json(row.get(mapping["messages"]))
    if not isinstance(messages, list) or not messages:
        raise _BadRowError(f"{mapping['messages']} is missing, empty or not a list")
    roles = {
        tags.user_tag: "user",
        tags.assistant_tag: "assistant",
        tags.observation_tag: "observation",
        tags.function_tag: "function",
    }
    system = _text_or_none(row.get(mapping["system"])) if mapping.get("system") else None
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _BadRowError(f"message {index + 1} is not an object")
        role = message.get(tags.role_tag)
        content = message.get(tags.content_tag)
        if role == tags.system_tag and index == 0:
            # A leading system message is the system prompt unless a system column already gave one.
            system = system or _text_or_none(content)
            continue
        if role not in roles:
            raise _BadRowError(f"unknown role {role!r} (tags: {', '.join(repr(tag) for tag in roles)})")
        if not isinstance(content, str):
            raise _BadRowError(f"message {index + 1} has no text under {tags.content_tag!r}")
        turns.append(Turn(roles[role], content))  # type: ignore[arg-type]
    problem = check_turns(tuple(turns))
    if problem:
        raise _BadRowError(problem)
    raw_tools = row.get(mapping["tools"]) if mapping.get("tools") else None
    tools = _tools(_maybe_json(raw_tools))
    tools_text = raw_tools if isinstance(raw_tools, str) and tools is not None else None
    return Conversation(tuple(turns), system=system, tools=tools, tools_text=tools_text, origin=origin)


@dataclass(frozen=True)
class Reader:
    """How the records of one file become conversations: its format, column mapping and tags, and how many of its
    records are used (the first `count`, under maxSamples).
    """

    source: SourceFile
    fmt: Format
    mapping: dict[str, str]
    tags: DatasetTags
    count: int

    def convert(self, start: int = 0, end: int | None = None) -> tuple[list[Conversation], list[tuple[str, str]]]:
        """Conversations from records [start, end), and (reason, where) for each record dropped, in order."""
        source, mapping, tags = self.source, self.mapping, self.tags
        alpaca = self.fmt == "alpaca"
        out: list[Conversation] = []
        dropped: list[tuple[str, str]] = []
        stop = self.count if end is None else min(end, self.count)
        for index in range(start, stop):
            row = source.rows[index]
            where = source.where(index)
            try:
                out.append(_alpaca(row, mapping, where) if alpaca else _sharegpt(row, mapping, tags, where))
            except _BadRowError as bad:
                dropped.append((str(bad), where))
        return out, dropped


def reader(spec: DatasetSpec, source: SourceFile, limit: int | None = None) -> Reader | None:
    """The Reader for the first `limit` records of `source` (all without a limit); None for a file without records.

    A file whose columns do not fit the format raises DataError.
    """
    if not source.rows:  # an empty file among others is fine; a dataset with no records at all is not
        return None
    fmt, mapping, tags = detect_format(spec, source)
    count = len(source.rows) if limit is None else min(limit, len(source.rows))
    return Reader(source, fmt, mapping, tags, count)


def convert(
    spec: DatasetSpec, source: SourceFile, drops: Drops, limit: int | None = None
) -> tuple[list[Conversation], int]:
    """Conversations from the first `limit` records of `source` (all without a limit), and the records read.

    Bad rows go to `drops`; a file whose columns do not fit the format raises DataError.
    """
    found = reader(spec, source, limit)
    if found is None:
        return [], 0
    out, dropped = found.convert()
    for reason, where in dropped:
        drops.add(reason, where)
    return out, found.count
