"""Bad data and bad template choices fail with messages a person can act on, and with the status reason
(DataError / InvalidConfig) the FineTuneJob shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer.datafiles import MakeConfig, write_json, write_jsonl
from trainer.tiny import build_tokenizer

from finetune_trainer.data import build_datasets
from finetune_trainer.errors import ConfigError, DataError

GOOD = {"instruction": "Add 2 and 3.", "output": "5"}


def test_a_malformed_json_line_names_the_file_and_line(tmp_path: Path, tokenizer: Any, make_config: MakeConfig) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n')
    with pytest.raises(DataError) as caught:
        build_datasets(make_config(path), tokenizer)
    assert str(path) in str(caught.value)
    assert "line 3" in str(caught.value)
    assert caught.value.reason == "DataError"


def test_malformed_json_array_names_the_file_and_line(tmp_path: Path, tokenizer: Any, make_config: MakeConfig) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"broken\.json: malformed JSON at line 3"):
        build_datasets(make_config(path), tokenizer)


def test_a_missing_required_column_names_the_column_and_the_format(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "answer": "b"}])
    with pytest.raises(DataError) as caught:
        build_datasets(make_config({"uri": path.as_uri(), "format": "alpaca"}), tokenizer)
    message = str(caught.value)
    assert "'output'" in message
    assert "format alpaca" in message
    assert "answer, instruction" in message, "the columns that are there help to fix the mapping"


def test_a_mapped_sharegpt_column_that_is_missing_is_named(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": []}])
    spec = {"uri": path.as_uri(), "format": "sharegpt", "columns": {"messages": "dialog"}}
    with pytest.raises(DataError, match=r"column 'dialog' \(messages\) required by format sharegpt is missing"):
        build_datasets(make_config(spec), tokenizer)


def test_columns_that_fit_no_format_are_reported(tmp_path: Path, tokenizer: Any, make_config: MakeConfig) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"cannot tell the dataset format .*alpaca needs 'instruction' and 'output'"):
        build_datasets(make_config(path), tokenizer)


def test_a_dataset_whose_rows_are_all_unusable_is_an_error(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    rows = [{"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}] * 3
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(DataError) as caught:
        build_datasets(make_config(path), tokenizer)
    message = str(caught.value)
    assert "no usable samples" in message
    assert "3 records, all dropped" in message
    assert f"{path} line 1" in message


def test_an_empty_file_and_an_empty_prefix_are_errors(tmp_path: Path, tokenizer: Any, make_config: MakeConfig) -> None:
    empty = write_json(tmp_path / "empty.json", [])
    with pytest.raises(DataError, match="no usable samples"):
        build_datasets(make_config(empty), tokenizer)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"no .*files under dataset prefix"):
        build_datasets(make_config(tmp_path / "nothing"), tokenizer)


def test_nothing_left_after_truncation_is_an_error(tmp_path: Path, tokenizer: Any, make_config: MakeConfig) -> None:
    # The cutoff is shared in proportion: a long prompt leaves this response less than one token of it.
    row = {"instruction": "word " * 300, "output": "The answer is five, as everybody knows."}
    path = write_jsonl(tmp_path / "a.jsonl", [row])
    with pytest.raises(DataError, match=r"no train samples left after tokenization .*no trainable tokens left"):
        build_datasets(make_config(path, training={"cutoff_len": 16}), tokenizer)


@pytest.mark.parametrize(
    ("template", "chatml", "llama3", "missing"),
    [
        ("llama3", True, False, "'<|start_header_id|>'"),
        ("chatml", False, True, "'<|im_start|>'"),
        ("qwen", False, False, "'<|im_end|>'"),
    ],
)
def test_a_named_template_the_tokenizer_contradicts_is_refused(
    tmp_path: Path, make_config: MakeConfig, template: str, chatml: bool, llama3: bool, missing: str
) -> None:
    tokenizer = build_tokenizer(chatml=chatml, llama3=llama3, chat_template=None)
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    with pytest.raises(ConfigError) as caught:
        build_datasets(make_config(path, template=template), tokenizer)
    message = str(caught.value)
    assert f"template {template!r} does not fit the tokenizer" in message
    assert missing in message
    assert caught.value.reason == "InvalidConfig"


def test_named_templates_that_fit_the_tokenizer_are_accepted(tmp_path: Path, make_config: MakeConfig) -> None:
    tokenizer = build_tokenizer(llama3=True, chat_template=None)
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    for template in ("default", "alpaca", "chatml", "qwen", "llama3"):
        bundle = build_datasets(make_config(path, template=template), tokenizer)
        assert bundle.stats.samples == 1


def test_auto_without_a_chat_template_is_refused(tmp_path: Path, base_tokenizer: Any, make_config: MakeConfig) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    with pytest.raises(ConfigError, match="template 'auto' uses the tokenizer's chat_template, but this tokenizer has"):
        build_datasets(make_config(path, template="auto"), base_tokenizer)


def test_a_multimodal_template_is_refused_with_the_reason() -> None:
    # The config refuses the name already (not in TEMPLATES); the data layer says why for a direct caller.
    from finetune_trainer.data.templates import get_template

    with pytest.raises(ConfigError, match="template 'paligemma' is multimodal"):
        get_template("paligemma", build_tokenizer(chat_template=None))
