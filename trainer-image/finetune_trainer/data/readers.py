"""Reading dataset files (JSON array, JSON lines, Parquet, CSV) from local paths into plain row dicts.

A dataset URI names a file or a prefix; the caller's `resolve` has already turned it into a local file or directory.
Every problem that makes a file unreadable is a DataError naming the file (and the line, for JSON).

JSON files can also be read as text cut into pieces at record boundaries (`read_pieces`), each piece parsed on its
own by the process that converts its records: the parsing is then shared out like the rest of the work, and no
process holds more than a piece's records at a time.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer.errors import DataError

EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}
# Files that live next to data in LLaMA-Factory style folders but are not data.
NOT_DATA = {"dataset_info.json"}
NOT_DATA_SUFFIXES = {".md", ".txt", ".yaml", ".yml"}
# About this many bytes per piece of a JSON file read in pieces (~300 records of a typical instruction set).
PIECE_BYTES = 256 * 1024


@dataclass(frozen=True)
class SourceFile:
    """The rows of one file and how to name a row in messages (`line 7` for JSON lines, `row 7` otherwise)."""

    path: Path
    file_type: str
    rows: list[dict[str, Any]]
    columns: frozenset[str]
    line_numbers: list[int] | None = None

    def where(self, index: int) -> str:
        if self.line_numbers is not None:
            return f"{self.path} line {self.line_numbers[index]}"
        return f"{self.path} row {index + 1}"


def list_files(root: Path, file_type: str | None) -> list[Path]:
    """The data files a resolved URI stands for: the file itself, or every data file under a directory, sorted.

    Without `file_type` a directory contributes the files with a known extension; with it, every file that is not
    hidden and not obviously documentation, so that extension-less object keys (part-0000) can be read too.
    """
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"dataset path {root} does not exist")
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        if path.name in NOT_DATA:
            continue
        suffix = path.suffix.lower()
        if suffix in EXTENSIONS if file_type is None else suffix not in NOT_DATA_SUFFIXES:
            found.append(path)
    if not found:
        wanted = f"files (fileType {file_type})" if file_type else f"{'/'.join(sorted(set(EXTENSIONS.values())))} files"
        raise DataError(f"no {wanted} under dataset prefix {root}")
    return found


def file_type_of(path: Path, declared: str | None) -> str:
    if declared is not None:
        return declared
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"cannot tell the file type of {path} from its extension; "
            f"use one of {', '.join(sorted(EXTENSIONS))} or set fileType"
        )
    return kind


def read_file(path: Path, declared_type: str | None = None) -> SourceFile:
    """Read one file completely; raise DataError naming the file (and line) when it cannot be parsed."""
    kind = file_type_of(path, declared_type)
    readers: dict[str, Callable[[Path], SourceFile]] = {
        "json": _read_json,
        "jsonl": _read_jsonl,
        "parquet": _read_parquet,
        "csv": _read_csv,
    }
    with _collector_off():
        return readers[kind](path)


@contextlib.contextmanager
def _collector_off() -> Iterator[None]:
    # Parsed records are trees of dicts, lists and strings without cycles: the collector's passes while hundreds of
    # thousands of them are made (each one longer, as the records pile up) would find nothing to free.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def _text(path: Path) -> str:
    try:
        return _bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: byte {exc.start} cannot be decoded") from None


def columns_of(rows: list[dict[str, Any]]) -> frozenset[str]:
    # JSON records need not all carry every key; a column exists when any record has it (as datasets infers it).
    names: set[str] = set()
    for row in rows:
        names.update(row)
    return frozenset(names)


def _read_json(path: Path) -> SourceFile:
    text = _text(path)
    stripped = text.lstrip()
    if not stripped.startswith("["):
        # `datasets` (and so LLaMA-Factory) reads JSON lines from .json files too.
        return _parse_jsonl(path, text, "json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {index + 1} of the JSON array is {type(row).__name__}, not an object")
    return SourceFile(path, "json", data, columns_of(data))


def _read_jsonl(path: Path) -> SourceFile:
    return _parse_jsonl(path, _text(path), "jsonl")


def _parse_jsonl(path: Path, text: str, kind: str) -> SourceFile:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = ""
            if number == 1 and kind == "json":
                hint = " (a .json file must hold a JSON array of records or one JSON object per line)"
            raise DataError(f"{path}: malformed JSON on line {number} column {exc.colno}: {exc.msg}{hint}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object")
        rows.append(row)
        lines.append(number)
    return SourceFile(path, kind, rows, columns_of(rows), lines)


def _lines(text: str) -> list[str]:
    # Lines end at \n (\r\n included) only, as JSON-lines readers (pyarrow's, so `datasets`') have them: a record may
    # hold U+2028 or NEL unescaped in a string, which str.splitlines would take for line ends.
    return text.split("\n")


class PieceError(Exception):
    """A piece of a file read in pieces that is not a run of whole records on its own (the cut fell inside a record,
    or the file is malformed there): the file is then read whole, which names the problem if there is one."""


# Between two records of a JSON array, where a piece may end: "}" "," "{" with JSON whitespace around the comma.
# (In UTF-8 these bytes never stand inside a multi-byte character.)
_BETWEEN_RECORDS = re.compile(rb"\}[ \t\r\n]*,[ \t\r\n]*\{")
_BOM = b"\xef\xbb\xbf"
_SPACE = re.compile(rb"[ \t\r\n]*")


@dataclass(frozen=True)
class TextPieces:
    """A JSON file's bytes and where its pieces are: piece i is data[starts[i]:ends[i]], decoded where it is parsed.

    A JSON array is cut at commas that look like they are between two records; whether each one is, only parsing
    can tell, and `parse` raises PieceError for a piece that is not a run of whole records. Every piece parsed
    proves the cuts: the first starts right after the array's "[", and a piece that starts between records parses
    only when it also ends between records, so when every piece parses every cut was between records. JSON lines are
    cut at line ends, which are always between records; `lines` holds the number of each piece's first line.
    """

    path: Path
    data: bytes
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    lines: tuple[int, ...] | None  # JSON lines: each piece's first line; None for a JSON array

    def __len__(self) -> int:
        return len(self.starts)

    def parse(self, piece: int) -> tuple[list[dict[str, Any]], list[int] | None]:
        """The records of a piece and, for JSON lines, the line each is on."""
        start, end = self.starts[piece], self.ends[piece]
        numbers: list[int] | None = None
        try:
            text = self.data[start:end].decode("utf-8")
            with _collector_off():
                if self.lines is None:
                    last = piece == len(self.starts) - 1  # it runs to the end of the file and holds the closing "]"
                    rows = json.loads("[" + text + ("" if last else "]"))
                    if not rows and len(self.starts) > 1:
                        raise PieceError(f"{self.path}: piece {piece} holds no record")
                else:
                    rows, numbers = [], []
                    for number, line in enumerate(_lines(text), start=self.lines[piece]):
                        if line.strip():
                            rows.append(json.loads(line))
                            numbers.append(number)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PieceError(f"{self.path}: piece {piece} is not a run of whole JSON records") from None
        if not all(isinstance(row, dict) for row in rows):
            raise PieceError(f"{self.path}: piece {piece} holds something other than JSON objects")
        return rows, numbers


def read_pieces(path: Path, declared_type: str | None = None) -> TextPieces | None:
    """A JSON or JSON-lines file's bytes, cut into pieces of about PIECE_BYTES; None for other file types."""
    kind = file_type_of(path, declared_type)
    if kind not in ("json", "jsonl"):
        return None
    data = _bytes(path)
    begin = len(_BOM) if data.startswith(_BOM) else 0
    body = _SPACE.match(data, begin).end()  # type: ignore[union-attr]  # it matches the empty string too
    starts, ends = [], []
    if kind == "json" and data.startswith(b"[", body):
        start = body + 1
        while (found := _BETWEEN_RECORDS.search(data, start + PIECE_BYTES)) is not None:
            comma = data.index(b",", found.start())
            starts.append(start)
            ends.append(comma)
            start = comma + 1
        starts.append(start)
        ends.append(len(data))
        return TextPieces(path, data, tuple(starts), tuple(ends), None)
    lines, line = [], 1
    start = begin
    while True:
        starts.append(start)
        lines.append(line)
        cut = data.find(b"\n", start + PIECE_BYTES)
        if cut < 0:
            ends.append(len(data))
            break
        ends.append(cut + 1)
        line += data.count(b"\n", start, cut + 1)
        start = cut + 1
    return TextPieces(path, data, tuple(starts), tuple(ends), tuple(lines))


def _read_parquet(path: Path) -> SourceFile:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    return SourceFile(path, "parquet", table.to_pylist(), frozenset(table.column_names))


def _read_csv(path: Path) -> SourceFile:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    # Every column as text: a CSV cell holding "1" is a prompt, not a number; JSON-valued cells are parsed later.
    try:
        with pcsv.open_csv(path) as reader:
            names = reader.schema.names
        options = pcsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False)
        table = pcsv.read_csv(path, convert_options=options)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable CSV file: {exc}") from None
    return SourceFile(path, "csv", table.to_pylist(), frozenset(table.column_names))
