"""Where samples come from: JSON/JSONL/Parquet/CSV files, a prefix meaning every data file under it, format
detection, several datasets mixed, maxSamples, valSize or separate eval datasets, seeded order, and bad rows
dropped and counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from trainer.datafiles import MakeConfig, write_json, write_jsonl

from finetune_trainer.data import build_datasets, cache, readers

ROWS = [
    {"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"The answer is {2 * i + 1}."} for i in range(3)
]


def decoded_prompts(bundle: Any, tokenizer: Any) -> list[str]:
    return [tokenizer.decode(ids) for ids in bundle.train["input_ids"]]


def test_a_prefix_reads_every_json_jsonl_parquet_and_csv_file_under_it(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    root = tmp_path / "data"
    write_json(root / "a.json", ROWS)
    write_jsonl(root / "nested" / "b.jsonl", ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), root / "c.parquet")
    pcsv.write_csv(pa.Table.from_pylist(ROWS), root / "d.csv")
    # Not data: LLaMA-Factory's dataset description, a README and hidden files are skipped.
    (root / "dataset_info.json").write_text(json.dumps({"x": {"file_name": "a.json"}}))
    (root / "README.md").write_text("# data")
    write_jsonl(root / ".hidden" / "e.jsonl", [{"bad": 1}])

    bundle = build_datasets(make_config(root), tokenizer)

    assert bundle.stats.records == 12
    assert bundle.stats.samples == 12
    texts = decoded_prompts(bundle, tokenizer)
    assert sum("Add 1 and 2." in text for text in texts) == 4


def test_file_type_reads_files_without_a_known_extension(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    part = write_jsonl(tmp_path / "data" / "part-0000", ROWS)
    bundle = build_datasets(make_config({"uri": part.parent.as_uri(), "fileType": "jsonl"}), tokenizer)
    assert bundle.stats.samples == 3


def test_auto_format_reads_sharegpt_and_openai_style_messages(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    sharegpt = write_jsonl(
        tmp_path / "s.jsonl",
        [{"conversations": [{"from": "human", "value": "Hello world"}, {"from": "gpt", "value": "Hi."}]}],
    )
    openai = write_jsonl(
        tmp_path / "o.jsonl",
        [{"messages": [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hi."}]}],
    )
    first = build_datasets(make_config(sharegpt), tokenizer)
    second = build_datasets(make_config(openai), tokenizer)
    assert first.stats.samples == second.stats.samples == 1
    assert first.train[0]["input_ids"] == second.train[0]["input_ids"]


def test_datasets_are_mixed_with_max_samples_each_and_a_seeded_val_split(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig
) -> None:
    alpaca = write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": f"alpaca {i}", "output": f"out {i}"} for i in range(10)]
    )
    chats = [
        {"conversations": [{"from": "human", "value": f"chat {i}"}, {"from": "gpt", "value": f"reply {i}"}]}
        for i in range(6)
    ]
    sharegpt = write_jsonl(tmp_path / "s.jsonl", chats)
    config = make_config({"uri": alpaca.as_uri(), "maxSamples": 4}, sharegpt, val_size=0.2)

    bundle = build_datasets(config, tokenizer)

    assert bundle.stats.records + bundle.eval_stats.records == 10
    assert (bundle.stats.samples, bundle.eval_stats.samples) == (8, 2)
    texts = decoded_prompts(bundle, tokenizer) + [tokenizer.decode(ids) for ids in bundle.eval["input_ids"]]
    assert sorted(t.split("user\n")[1].split("<|im_end|>")[0] for t in texts) == sorted(
        [f"alpaca {i}" for i in range(4)] + [f"chat {i}" for i in range(6)]
    )
    assert sum("chat" in t for t in texts) == 6, "both datasets must be mixed in"


def test_separate_eval_datasets_are_used_for_eval(tmp_path: Path, tokenizer: Any, make_config: MakeConfig) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    held = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "held out", "output": "yes"}])
    bundle = build_datasets(make_config(train, eval_datasets=[{"uri": held.as_uri()}]), tokenizer)
    assert bundle.stats.samples == 3
    assert bundle.eval_stats.samples == 1
    assert "held out" in tokenizer.decode(bundle.eval[0]["input_ids"])


def test_the_order_follows_the_seed(tmp_path: Path, tokenizer: Any, make_config: MakeConfig) -> None:
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"item {i}", "output": "ok"} for i in range(20)])

    def order(seed: int) -> list[str]:
        bundle = build_datasets(make_config(data, training={"seed": seed}), tokenizer)
        return decoded_prompts(bundle, tokenizer)

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == sorted(order(2))


def test_broken_conversations_are_dropped_and_counted(tmp_path: Path, tokenizer: Any, make_config: MakeConfig) -> None:
    good = {"conversations": [{"from": "human", "value": "Hello world"}, {"from": "gpt", "value": "Hi."}]}
    rows = [
        good,
        {"conversations": [{"from": "gpt", "value": "I speak first"}, {"from": "human", "value": "no"}]},
        {"conversations": [{"from": "human", "value": "Hello world"}]},
        {"conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": "boop"}]},
        good,
    ]
    bundle = build_datasets(make_config(write_jsonl(tmp_path / "c.jsonl", rows)), tokenizer)
    assert bundle.stats.samples == 2
    assert bundle.stats.dropped == 3
    reasons = " | ".join(bundle.stats.drop_reasons)
    assert "turn 1 is 'assistant'" in reasons
    assert "last turn is not an assistant" in reasons
    assert "unknown role 'robot'" in reasons


def test_worker_processes_give_the_same_rows_as_one_process(
    tmp_path: Path, tokenizer: Any, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "MIN_SHARD_TOKENS", 1000)  # shards of this small data too
    monkeypatch.setattr(readers, "PIECE_BYTES", 4096)  # pieces of this small file for both processes to take
    rows = [{"instruction": f"item {i}", "output": "word " * (i % 7)} for i in range(2500)]
    rows[5] = {"conversations": "not alpaca"}  # dropped, and counted the same either way
    data = write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": r.get("instruction"), "output": r.get("output")} for r in rows]
    )
    serial = build_datasets(make_config(data, cache=tmp_path / "one", training={"packing": True}), tokenizer, workers=1)
    pooled = build_datasets(make_config(data, cache=tmp_path / "two", training={"packing": True}), tokenizer, workers=2)
    assert pooled.stats == serial.stats
    assert serial.stats.dropped == 1
    assert pooled.train["input_ids"] == serial.train["input_ids"]
    assert pooled.train["labels"] == serial.train["labels"]
    assert pooled.train["position_ids"] == serial.train["position_ids"]
    # One process writes one file; two write a few shards each, which load as one dataset.
    assert [f.name for f in serial.cache_path.glob("*.arrow")] == ["train-00000-of-00001.arrow"]
    shards = sorted(f.name for f in pooled.cache_path.glob("*.arrow"))
    assert shards == [f"train-{i:05d}-of-00008.arrow" for i in range(8)]
    monkeypatch.undo()
    small = build_datasets(make_config(data, cache=tmp_path / "three", val_size=0.01), tokenizer, workers=2)
    assert sorted(f.name for f in small.cache_path.glob("*.arrow")) == [
        "eval-00000-of-00001.arrow",
        "train-00000-of-00001.arrow",
    ], "a split under MIN_SHARD_TOKENS stays one file"
