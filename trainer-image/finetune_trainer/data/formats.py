"""alpaca and sharegpt records → Conversation, with LLaMA-Factory's column/tag mapping and its rules for bad rows.

A file-level problem (a required column missing, a format that cannot be told) is a DataError. A bad row (wrong
turn order, unknown role, missing response) is dropped and counted, as LLaMA-Factory does; the caller turns "every
row dropped" into a DataError.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune_trainer.config import ALPACA_COLUMNS, SHAREGPT_COLUMNS, DatasetSpec, DatasetTags
from finetune_trainer.data.conversation import Conversation, Turn, check_turns
from finetune_trainer.data.readers import PieceError, SourceFile, TextPieces, columns_of
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


def detect_format(
    spec: DatasetSpec, path: Path, columns: frozenset[str], rows: Sequence[dict[str, Any]]
) -> tuple[Format, dict[str, str], DatasetTags]:
    """The format, the column mapping and the tags to read the file at `path` with, from its `columns` (those of all
    its records) and, for the tags, its first `rows`; DataError when columns are missing."""
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
                f"{path}: cannot tell the dataset format from its columns ({', '.join(sorted(columns))}): "
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
            tags = guess_tags(rows, mapping["messages"]) or DatasetTags()
    for key in required:
        if mapping[key] not in columns:
            raise DataError(
                f"{path}: column {mapping[key]!r} ({key}) required by format {fmt} is missing; "
                f"columns present: {', '.join(sorted(columns)) or 'none'}"
            )
    return fmt, mapping, tags


TAG_ROWS = 100  # the rows the tags are guessed from


def guess_tags(rows: Sequence[dict[str, Any]], column: str) -> DatasetTags | None:
    """The tags the first of the first TAG_ROWS rows with a list of messages calls for; None when none has one.

    Without tags LLaMA-Factory assumes from/value; OpenAI-style role/content files are recognised instead of
    having every row dropped for an unknown role.
    """
    default = DatasetTags()
    for row in rows[:TAG_ROWS]:
        messages = _maybe_json(row.get(column))
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            first = messages[0]
            if default.role_tag not in first and "role" in first and "content" in first:
                return OPENAI_TAGS
            return default
    return None


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


def _alpaca(row: dict[str, Any], mapping: dict[str, str], origin: int) -> Conversation:
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


def _sharegpt(row: dict[str, Any], mapping: dict[str, str], tags: DatasetTags, origin: int) -> Conversation:
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


# Records per piece of a file read whole: small enough that the processes finish close together (the last pieces
# are waited for), large enough that a piece's arrays are worth a trip through a pipe.
PART = 250


@dataclass(frozen=True)
class Converted:
    """What the records of one piece of a file became: the conversations (each with its locator as `origin`), the
    records dropped as (reason, locator), all in order, and the columns of the piece's records (when the reader
    needs them back). A locator names a record for the reader's `where`."""

    conversations: list[Conversation]
    drops: list[tuple[str, int]]
    columns: frozenset[str] | None = None

    @property
    def records(self) -> int:
        return len(self.conversations) + len(self.drops)


@dataclass(frozen=True)
class Reader(ABC):
    """How the records of one file become conversations: its format, column mapping and tags, and its pieces (the
    units of work), converted one at a time by `convert`.
    """

    fmt: Format
    mapping: dict[str, str]
    tags: DatasetTags

    @property
    @abstractmethod
    def count(self) -> int:
        """The records used (an estimate where they are only known once every piece is parsed)."""

    @property
    def exact(self) -> bool:
        """Whether `count` is exact."""
        return True

    @property
    @abstractmethod
    def pieces(self) -> int:
        """How many pieces `convert` takes."""

    @abstractmethod
    def convert(self, piece: int) -> Converted:
        """The records of one piece converted."""

    @abstractmethod
    def where(self, base: int, locator: int) -> str:
        """Where a record is, for messages, from its locator and the records of the file before its piece."""

    def _convert(
        self, rows: Sequence[dict[str, Any]], locators: Sequence[int]
    ) -> tuple[list[Conversation], list[tuple[str, int]]]:
        mapping, tags = self.mapping, self.tags
        alpaca = self.fmt == "alpaca"
        out: list[Conversation] = []
        dropped: list[tuple[str, int]] = []
        for row, locator in zip(rows, locators, strict=True):
            try:
                out.append(_alpaca(row, mapping, locator) if alpaca else _sharegpt(row, mapping, tags, locator))
            except _BadRowError as bad:
                dropped.append((str(bad), locator))
        return out, dropped


@dataclass(frozen=True)
class RowReader(Reader):
    """A file read whole: the first `used` of its rows (maxSamples), in pieces of PART; a record's locator is its
    index in its piece."""

    source: SourceFile
    used: int

    @property
    def count(self) -> int:
        return self.used

    @property
    def pieces(self) -> int:
        return -(-self.used // PART)

    def convert(self, piece: int) -> Converted:
        start = piece * PART
        rows = self.source.rows[start : min(start + PART, self.used)]
        return Converted(*self._convert(rows, range(len(rows))))

    def where(self, base: int, locator: int) -> str:
        return self.source.where(base + locator)


@dataclass(frozen=True)
class PieceReader(Reader):
    """A JSON file read in pieces (readers.TextPieces), each parsed where it is converted. The format was told from
    the first piece, parsed here; `check` confirms it against the columns of all records once every piece is in.
    A record's locator is its line (JSON lines) or its index in its piece (a JSON array)."""

    spec: DatasetSpec
    text: TextPieces
    first: list[dict[str, Any]]  # the first piece's records
    first_lines: list[int] | None

    @property
    def count(self) -> int:
        first = self.text.ends[0] - self.text.starts[0]
        return len(self.first) if len(self.text) == 1 else round(len(self.first) * len(self.text.data) / max(1, first))

    @property
    def exact(self) -> bool:
        return len(self.text) == 1

    @property
    def pieces(self) -> int:
        return len(self.text)

    def convert(self, piece: int) -> Converted:
        rows, lines = (self.first, self.first_lines) if piece == 0 else self.text.parse(piece)
        conversations, drops = self._convert(rows, range(len(rows)) if lines is None else lines)
        return Converted(conversations, drops, columns_of(rows))

    def where(self, base: int, locator: int) -> str:
        if self.text.lines is not None:
            return f"{self.text.path} line {locator}"
        return f"{self.text.path} row {base + locator + 1}"

    def check(self, columns: frozenset[str]) -> None:
        """PieceError unless the whole file's `columns` call for the format, mapping and tags the pieces were read
        with."""
        try:
            found = detect_format(self.spec, self.text.path, columns, self.first)
        except DataError:
            found = None
        if found != (self.fmt, self.mapping, self.tags):
            raise PieceError(f"{self.text.path}: its later records call for other columns than its first")


def counted(readers: Sequence[Reader]) -> str:
    """The records these readers use, for messages: "N", or "about N" where a count is an estimate."""
    about = "" if all(r.exact for r in readers) else "about "
    return f"{about}{sum(r.count for r in readers)}"


def reader(spec: DatasetSpec, source: SourceFile, limit: int | None = None) -> Reader | None:
    """The Reader for the first `limit` records of `source` (all without a limit); None for a file without records.

    A file whose columns do not fit the format raises DataError.
    """
    if not source.rows:  # an empty file among others is fine; a dataset with no records at all is not
        return None
    fmt, mapping, tags = detect_format(spec, source.path, source.columns, source.rows)
    count = len(source.rows) if limit is None else min(limit, len(source.rows))
    return RowReader(fmt, mapping, tags, source, count)


def piece_reader(spec: DatasetSpec, text: TextPieces) -> Reader | None:
    """The Reader of a file read in pieces; None for a file without records. PieceError where the first piece
    cannot tell how to read the file (or is not whole records): the file is then to be read whole."""
    first, lines = text.parse(0)
    if not first:
        if len(text) > 1:
            raise PieceError(f"{text.path}: its first piece holds no record")
        return None
    columns = columns_of(first)
    try:
        fmt, mapping, tags = detect_format(spec, text.path, columns, first)
    except DataError:
        raise PieceError(f"{text.path}: its first records do not tell its format") from None
    undecided = fmt == "sharegpt" and spec.tags is None and guess_tags(first, mapping["messages"]) is None
    if undecided and len(first) < TAG_ROWS and len(text) > 1:
        raise PieceError(f"{text.path}: its first records do not tell its tags")
    return PieceReader(fmt, mapping, tags, spec, text, first, lines)
