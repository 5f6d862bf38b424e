"""JSON files read in pieces, each parsed by the process that encodes it, give what reading them whole gives: the
same samples, the same counts and the same record locations in messages. A cut that falls inside a record, a
malformed file, and later records that call for another format or tags than the first piece's send the files to be
read whole, with the same result (or error) as a whole read.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from trainer.datafiles import MakeConfig, write_json, write_jsonl

from finetune_trainer.data import build_datasets, readers
from finetune_trainer.errors import DataError

WHOLE = 10**9  # a maxSamples no file reaches: the file is then read whole (maxSamples needs every record first)
FELL_BACK = " whole: "  # "reading <file> whole: <why>" (its first piece), "reading the data files whole: <why>"


def _rows(count: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 3 else f"i={i}", "output": f"It is {2 * i + 1}."}
        for i in range(count)
    ]
    for i in range(5, count, 97):  # one in 97 has no response: dropped, and its location is logged
        del rows[i]["output"]
    return rows


Build = Callable[..., Any]


@pytest.fixture
def build(tmp_path: Path, tokenizer: Any, make_config: MakeConfig) -> Build:
    """build(data, whole=..., workers=1): the data prepared into a cache of its own, read whole or in pieces."""
    caches = itertools.count()

    def run(data: Path, *, whole: bool, workers: int = 1) -> Any:
        dataset: dict[str, Any] = {"uri": data.as_uri()}
        if whole:
            dataset["maxSamples"] = WHOLE
        config = make_config(dataset, cache=tmp_path / f"cache-{next(caches)}")
        return build_datasets(config, tokenizer, workers=workers)

    return run


def _same(pieces: Any, whole: Any) -> None:
    assert pieces.stats == whole.stats
    assert pieces.train["input_ids"] == whole.train["input_ids"]
    assert pieces.train["labels"] == whole.train["labels"]


def _falls_back(build: Build, data: Path, caplog: pytest.LogCaptureFixture, workers: int = 1) -> Any:
    """The data prepared in pieces, checked to have been read whole in the end and to equal a whole read."""
    with caplog.at_level(logging.DEBUG, logger="finetune_trainer.data"):
        pieces = build(data, whole=False, workers=workers)
    assert FELL_BACK in caplog.text
    _same(pieces, build(data, whole=True))
    return pieces


def _dropped(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "dropped" in r.getMessage() and r.levelno == logging.WARNING]


@pytest.mark.parametrize("layout", ["indented", "compact", "lines"])
def test_a_file_in_many_pieces_gives_what_it_gives_read_whole(
    layout: str, build: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(readers, "PIECE_BYTES", 2000)
    rows = _rows(600)
    if layout == "lines":
        data = write_jsonl(tmp_path / "data.jsonl", rows)
    elif layout == "indented":
        data = write_json(tmp_path / "data.json", rows)
    else:
        data = tmp_path / "data.json"
        data.write_text(json.dumps(rows))
    text = readers.read_pieces(data)
    assert text is not None
    assert len(text) > 10

    with caplog.at_level(logging.DEBUG, logger="finetune_trainer.data"):
        pieces = build(data, whole=False, workers=2)
    assert FELL_BACK not in caplog.text, "every cut was between records"
    assert "preparing about" in caplog.text, "two processes shared the pieces"
    in_pieces = _dropped(caplog)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="finetune_trainer.data"):
        whole = build(data, whole=True)

    _same(pieces, whole)
    assert (pieces.stats.records, pieces.stats.dropped) == (600, 7)
    assert in_pieces == _dropped(caplog)
    # The fifth record dropped (row 394) is in a later piece: its location counts the records of the pieces before.
    where = "line 394" if layout == "lines" else "row 394"
    assert any(f"data.{'jsonl' if layout == 'lines' else 'json'} {where}:" in m for m in in_pieces), in_pieces


@pytest.mark.parametrize("plain", [0, 40])
def test_a_cut_inside_a_record_sends_the_file_to_be_read_whole(
    plain: int, build: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Texts that hold "}, {" look like the place between two records: a piece cut there does not parse, the first
    one (in this process, before any other is taken) or a later one (in whichever process takes it)."""
    monkeypatch.setattr(readers, "PIECE_BYTES", 500)
    rows = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(plain)]
    rows += [{"instruction": f"Q{i} " + "a}, {b " * 30, "output": "c}, {d " * 30} for i in range(200)]
    data = write_json(tmp_path / "data.json", rows)
    if plain:
        text = readers.read_pieces(data)
        assert text is not None
        assert readers.json.loads(b"[" + text.data[text.starts[0] : text.ends[0]] + b"]"), "the first cut is sound"
    pieces = _falls_back(build, data, caplog, workers=2)
    assert pieces.stats.samples == 200 + plain


@pytest.mark.parametrize("lines", [False, True])
def test_a_malformed_record_in_a_later_piece_is_named_as_a_whole_read_names_it(
    lines: bool, build: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "PIECE_BYTES", 1000)
    rows = _rows(300)
    if lines:
        data = write_jsonl(tmp_path / "data.jsonl", rows)
        bad = '"output": "It is 501."'  # record 250, line 251
        expected = r"data.jsonl: malformed JSON on line 251 column \d+"
    else:
        data = write_json(tmp_path / "data.json", rows)
        bad = '"output": "It is 501."'
        number = data.read_text().splitlines().index('    "output": "It is 501."') + 1
        expected = rf"data.json: malformed JSON at line {number} column \d+"
    data.write_text(data.read_text().replace(bad, bad[:-1]))  # the text's closing quote is gone

    for whole in (False, True):
        with pytest.raises(DataError, match=expected):
            build(data, whole=whole, workers=2)


def test_later_records_that_call_for_another_format_send_the_file_to_be_read_whole(
    build: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The format is told from the columns of every record: a `messages` column in the last record makes the file
    sharegpt, although its first piece reads as alpaca."""
    monkeypatch.setattr(readers, "PIECE_BYTES", 1000)
    rows: list[dict[str, Any]] = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(200)]
    rows.append({"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    pieces = _falls_back(build, write_jsonl(tmp_path / "data.jsonl", rows), caplog)
    assert (pieces.stats.samples, pieces.stats.dropped) == (1, 200)


def test_tags_the_first_piece_cannot_tell_are_told_from_the_first_hundred_records(
    build: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenAI-style role/content messages are recognised from the first record of the first hundred that has a
    list of messages; when that record is beyond the first piece, the file is read whole to find it."""
    monkeypatch.setattr(readers, "PIECE_BYTES", 1000)
    rows: list[dict[str, Any]] = [{"messages": "not a list"} for _ in range(60)]
    rows += [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
        for i in range(100)
    ]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    text = readers.read_pieces(data)
    assert text is not None
    assert len(text.parse(0)[0]) < 60, "the first piece holds only records without a list"
    pieces = _falls_back(build, data, caplog)
    assert (pieces.stats.samples, pieces.stats.dropped) == (100, 60)


def test_json_lines_end_at_newlines_only(build: Build, tmp_path: Path) -> None:
    """U+2028, U+2029 and NEL may stand unescaped in a JSON string; str.splitlines would end a line there."""
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": "a\u2028b", "output": "c\x85d"}, {"instruction": "e\u2029f", "output": "g"}]
    data.write_text("\r\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\r\n", encoding="utf-8")
    for whole in (False, True):
        bundle = build(data, whole=whole)
        assert (bundle.stats.samples, bundle.stats.dropped) == (2, 0)


RECORD = {"instruction": "Add 250 and 251.", "output": "It is 501."}  # record 251, on line 251 of JSON lines


@pytest.mark.parametrize(
    ("lines", "spoiled", "expected"),
    [
        (False, b'{"instruction": "Add 250 and 251.", "output": "It is \xff501."}', r"not UTF-8 text: byte \d+"),
        (True, b'{"instruction": "Add 250 and 251.", "output": "It is \xff501."}', r"not UTF-8 text: byte \d+"),
        (False, b'["Add 250 and 251.", "It is 501."]', "record 251 of the JSON array is list, not an object"),
        (True, b'["Add 250 and 251.", "It is 501."]', "line 251 is a JSON list, not an object"),
    ],
    ids=["bytes-array", "bytes-lines", "not-an-object-array", "not-an-object-lines"],
)
def test_other_errors_in_a_later_piece_are_reported_as_a_whole_read_reports_them(
    lines: bool,
    spoiled: bytes,
    expected: str,
    build: Build,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(readers, "PIECE_BYTES", 1000)
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"It is {2 * i + 1}."} for i in range(300)]
    assert rows[250] == RECORD
    data = write_jsonl(tmp_path / "d.jsonl", rows) if lines else tmp_path / "d.json"
    if not lines:
        data.write_text(json.dumps(rows))
    data.write_bytes(data.read_bytes().replace(json.dumps(RECORD).encode(), spoiled))
    for whole in (False, True):
        with pytest.raises(DataError, match=expected):
            build(data, whole=whole)


@pytest.mark.parametrize("lines", [False, True])
def test_a_byte_order_mark_is_skipped(lines: bool, build: Build, tmp_path: Path) -> None:
    rows = _rows(20)
    data = write_jsonl(tmp_path / "d.jsonl", rows) if lines else write_json(tmp_path / "d.json", rows)
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    pieces = build(data, whole=False)
    _same(pieces, build(data, whole=True))
    assert pieces.stats.samples == 19
