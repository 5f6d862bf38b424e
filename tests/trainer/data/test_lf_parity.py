"""build_datasets against LLaMA-Factory itself: every parity case, row by row, against the committed reference.

tests/parity/lf_reference.json.gz is what LLaMA-Factory's own template and SFT preprocessing code made of the parity
sets (`make lf-reference` regenerates it in a separate venv). Rows are compared token for token when this side
builds the same tokenizer.json as the generator did (same sha256), else as text: the trained and untrained runs.
Where LLaMA-Factory drops a row both sides drop it; where it fails on a row (and would stop the whole run) this side
drops that row; where it keeps a row with no trainable token this side drops it (docs/trainer.md).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from parity.cases import SEED, TOOL_DATE
from parity.tokenizers_build import build as build_tokenizer_dir
from trainer.datafiles import config_for

from finetune_trainer.data import build_datasets
from finetune_trainer.data.lf_templates import TEMPLATES as LF_TEMPLATES
from finetune_trainer.errors import ConfigError

PARITY = Path(__file__).resolve().parents[2] / "parity"
REFERENCE = PARITY / "lf_reference.json.gz"
IGNORE = -100


@cache
def reference() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = gzip.decompress(REFERENCE.read_bytes()).decode().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def _cases() -> list[Any]:
    return [pytest.param(case, id=case["key"]) for case in reference()[1]]


@pytest.fixture(scope="session")
def parity_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, bool]]:
    """Each parity tokenizer, and whether it is byte for byte the one the reference was made with."""
    from transformers import AutoTokenizer

    meta, _ = reference()
    root = tmp_path_factory.mktemp("parity-tokenizers")
    out = {}
    for kind, sha in meta["tokenizer_sha256"].items():
        directory = build_tokenizer_dir(kind, root / kind, LF_TEMPLATES)
        same = hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest() == sha
        out[kind] = (AutoTokenizer.from_pretrained(str(directory)), same)
    return out


def _dataset(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "uri": (PARITY / "sets" / entry["file_name"]).as_uri(),
        "format": entry.get("formatting", "alpaca"),
        "columns": entry.get("columns", {}),
    }
    if entry.get("tags"):
        spec["tags"] = entry["tags"]
    return spec


def _labels(row: dict[str, Any]) -> list[int]:
    other = row.get("label_other", {})
    return [
        IGNORE if mark == "." else token if mark == "x" else other[str(i)]
        for i, (token, mark) in enumerate(zip(row["input_ids"], row["labels"], strict=True))
    ]


def _segments(tokenizer: Any, ids: list[int], labels: list[int]) -> list[list[Any]]:
    """Runs of untrained and trained tokens as text (the generator's `segments`, made on this side)."""
    runs: list[list[Any]] = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] == IGNORE) != (labels[start] == IGNORE):
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            runs.append([text, labels[start] != IGNORE])
            start = end
    return runs


def _trains(row: dict[str, Any]) -> bool:
    return row["status"] == "ok" and any(mark != "." for mark in row["labels"][1:])


def _expected(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any] | None], int]:
    """The rows in build_datasets' order (None where this side drops one), and how many are dropped in all.

    Rows LLaMA-Factory drops as malformed are dropped when read, before the seeded shuffle; the others are
    shuffled, then those it fails on or keeps without any trainable token are dropped after tokenization.
    """
    read = [row for row in rows if row["status"] != "dropped"]
    order = list(range(len(read)))
    random.Random(SEED).shuffle(order)
    shuffled = [read[i] if _trains(read[i]) else None for i in order]
    return shuffled, len(rows) - sum(row is not None for row in shuffled)


@pytest.mark.parametrize("case", _cases())
def test_build_datasets_matches_llamafactory(
    case: dict[str, Any],
    parity_tokenizers: dict[str, tuple[Any, bool]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = case["case"]
    tokenizer, same_tokenizer = parity_tokenizers[spec["tokenizer"]]
    monkeypatch.setattr("finetune_trainer.data.tools.today", lambda: f"{TOOL_DATE[2]:02d} Jan {TOOL_DATE[0]}")
    info = json.loads((PARITY / "sets" / "dataset_info.json").read_text())
    config = config_for(
        *[_dataset(name, info[name]) for name in spec["sets"]],
        cache=tmp_path / "cache",
        template=spec["template"],
        training={
            "cutoff_len": spec["cutoff_len"],
            "train_on_prompt": spec["train_on_prompt"],
            "mask_history": spec["mask_history"],
            "seed": SEED,
        },
    )
    if "error" in case:  # LLaMA-Factory refuses the setup (train_on_prompt with an efficient_eos template)
        with pytest.raises(ConfigError):
            build_datasets(config, tokenizer, workers=1)
        return
    bundle = build_datasets(config, tokenizer, workers=1)
    expected, dropped = _expected(case["rows"])
    kept = [row for row in expected if row is not None]
    ours = list(zip(bundle.train["input_ids"], bundle.train["labels"], strict=True))
    assert len(ours) == len(kept), f"{len(ours)} rows here, {len(kept)} trainable rows in LLaMA-Factory's"
    assert bundle.stats.dropped == dropped
    for (ids, labels), row in zip(ours, kept, strict=True):
        where = f"{row['set']} row {row['index']}"
        if same_tokenizer:
            assert list(ids) == row["input_ids"], f"{where}: input_ids differ"
            assert list(labels) == _labels(row), f"{where}: labels differ"
        else:
            assert _segments(tokenizer, list(ids), list(labels)) == row["segments"], f"{where}: text differs"


def test_reference_covers_every_text_template() -> None:
    meta, cases = reference()
    assert sorted(LF_TEMPLATES) == meta["templates"]
    covered = {case["case"]["template"] for case in cases if "error" not in case}
    assert covered == set(meta["text_templates"])
    assert len(covered) >= 119


def test_truncation_keeps_samples_and_shares_the_cutoff(parity_tokenizers: dict[str, tuple[Any, bool]]) -> None:
    """At a small cutoff LLaMA-Factory keeps the samples, each cut to at most cutoff tokens (before: 7 of 18 kept)."""
    _, cases = reference()
    case = next(c for c in cases if c["key"] == "default/nobos/long+sharegpt/48")
    ok = [row for row in case["rows"] if row["status"] == "ok"]
    assert ok
    assert all(len(row["input_ids"]) <= 48 for row in ok)
    trainable = sum(_trains(row) for row in ok)
    assert trainable == len(ok)
    assert np.mean([len(row["input_ids"]) for row in ok]) > 24
