"""Tokenize once per node: the cache is reused while data, tokenizer and settings stay the same and rebuilt when
one changes; ranks that are not the node's main rank wait for it on the file system and get its data, or its error.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from trainer.datafiles import MakeConfig, write_jsonl
from trainer.tiny import build_tokenizer

from finetune_trainer.data import build_datasets
from finetune_trainer.data.cache import MARKER
from finetune_trainer.errors import DataError, TrainerError

ROWS = [{"instruction": f"Add {i} and 1.", "output": f"{i + 1}"} for i in range(6)]


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "tokenized").iterdir() if p.is_dir())


def test_a_second_call_reuses_the_cache_and_a_changed_option_rebuilds_it(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    data = write_jsonl(tmp_path / "a.jsonl", ROWS)
    first = build_datasets(make_config(data), tokenizer)
    marker = (first.cache_path / MARKER).read_text()

    again = build_datasets(make_config(data), tokenizer)
    assert again.cache_hit
    assert again.cache_path == first.cache_path
    assert (again.cache_path / MARKER).read_text() == marker, "the entry must not be rewritten"
    assert again.train["input_ids"] == first.train["input_ids"]
    assert entries(tmp_path / "cache") == [first.cache_path]

    changed = build_datasets(make_config(data, training={"cutoff_len": 128}), tokenizer)
    assert not changed.cache_hit
    assert changed.cache_path != first.cache_path

    masked = build_datasets(make_config(data, training={"mask_history": True}), tokenizer)
    assert masked.cache_path not in (first.cache_path, changed.cache_path)
    assert len(entries(tmp_path / "cache")) == 3


def test_changed_data_or_tokenizer_gets_a_new_entry(tmp_path: Path, tokenizer: Any, make_config: MakeConfig) -> None:
    data = write_jsonl(tmp_path / "a.jsonl", ROWS)
    first = build_datasets(make_config(data), tokenizer)
    write_jsonl(data, [*ROWS, {"instruction": "one more", "output": "row"}])
    more = build_datasets(make_config(data), tokenizer)
    assert more.cache_path != first.cache_path
    assert more.stats.samples == len(ROWS) + 1
    other = build_datasets(make_config(data), build_tokenizer(vocab_size=500))
    assert other.cache_path not in (first.cache_path, more.cache_path)


def test_other_ranks_wait_for_the_main_rank_and_load_its_data(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    data = write_jsonl(tmp_path / "a.jsonl", ROWS)
    config = make_config(data, training={"packing": True})
    results: dict[str, Any] = {}

    def follower() -> None:
        try:
            results["bundle"] = build_datasets(config, tokenizer, local_rank=1, wait_timeout_s=60)
        except Exception as exc:
            results["error"] = exc

    thread = threading.Thread(target=follower)
    thread.start()
    time.sleep(0.2)  # the follower is polling before the main rank starts
    assert "bundle" not in results, "the follower must not build or return before the main rank is done"
    main = build_datasets(config, tokenizer, local_rank=0)
    thread.join(timeout=60)

    assert "error" not in results
    bundle = results["bundle"]
    assert bundle.cache_path == main.cache_path
    assert bundle.train["input_ids"] == main.train["input_ids"]
    assert bundle.train["position_ids"] == main.train["position_ids"]


def test_a_waiting_rank_gives_up_after_its_timeout(tmp_path: Path, tokenizer: Any, make_config: MakeConfig) -> None:
    data = write_jsonl(tmp_path / "a.jsonl", ROWS)
    started = time.monotonic()
    with pytest.raises(TrainerError, match="waited 0s for local rank 0 to tokenize the data"):
        build_datasets(make_config(data), tokenizer, is_local_main=False, wait_timeout_s=0.3)
    assert time.monotonic() - started < 10


def test_a_waiting_rank_raises_the_main_ranks_data_error(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    row = {"instruction": "word " * 300, "output": "The answer is five, as everybody knows."}
    data = write_jsonl(tmp_path / "a.jsonl", [row])
    config = make_config(data, training={"cutoff_len": 16})
    with pytest.raises(DataError):
        build_datasets(config, tokenizer, local_rank=0)
    started = time.monotonic()
    with pytest.raises(DataError, match="local rank 0 could not prepare the data: no train samples left"):
        build_datasets(config, tokenizer, local_rank=1, wait_timeout_s=60)
    assert time.monotonic() - started < 10, "the error must arrive without waiting out the timeout"
