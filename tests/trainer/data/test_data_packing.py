"""Packing: rows of at most cutoff_len tokens holding whole samples, position_ids restarting per sample, and no
attention across samples: a tiny Llama gives the same loss on packed and on padded unpacked batches of the same
samples, with every attention implementation and batch layout the collator offers on CPU.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from trainer.datafiles import MakeConfig, write_jsonl
from trainer.tiny import tiny_llama

from finetune_trainer.data import build_datasets
from finetune_trainer.data.collate import SFTCollator, block_causal_mask
from finetune_trainer.data.packing import IGNORE, Layout, Rows, best_fit_bins, pack

CUTOFF = 96
SENTENCE = "the quick brown fox jumps over the lazy dog and then the capital of France is Paris"
WORDS = SENTENCE.split()


def dataset(tmp_path: Path) -> Path:
    rows = [
        {
            "instruction": " ".join(WORDS[i % 7 : i % 7 + 2 + (i * 3) % 9]),
            "output": " ".join(WORDS[(i * 2) % 5 : (i * 2) % 5 + 1 + (i * 5) % 11]),
        }
        for i in range(10)
    ]
    return write_jsonl(tmp_path / "a.jsonl", rows)


@pytest.fixture
def packed_and_unpacked(tmp_path: Path, tokenizer: Any, make_config: MakeConfig) -> tuple[Any, Any]:
    data = dataset(tmp_path)
    training = {"cutoff_len": CUTOFF, "seed": 3}
    packed = build_datasets(make_config(data, training={**training, "packing": True}), tokenizer)
    unpacked = build_datasets(make_config(data, training={**training, "packing": False}), tokenizer)
    return packed, unpacked


def test_packed_rows_hold_whole_samples_with_restarting_positions(packed_and_unpacked: tuple[Any, Any]) -> None:
    packed, unpacked = packed_and_unpacked
    assert packed.stats.samples == unpacked.stats.samples == 10
    assert packed.stats.rows < unpacked.stats.rows, "several samples must share a row"
    pieces = []
    for row in packed.train:
        positions = np.asarray(row["position_ids"])
        assert len(positions) <= CUTOFF
        starts = np.flatnonzero(positions == 0)
        assert starts[0] == 0
        for begin, end in zip(starts, [*starts[1:], len(positions)], strict=True):
            assert positions[begin:end].tolist() == list(range(end - begin))
            pieces.append((row["input_ids"][begin:end], row["labels"][begin:end]))
    expected = sorted(zip(unpacked.train["input_ids"], unpacked.train["labels"], strict=True))
    assert sorted(pieces) == expected


def loss(model: Any, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["padded", "padding_free", "4d_mask"])
def test_packed_and_unpacked_batches_give_the_same_loss(
    packed_and_unpacked: tuple[Any, Any], tokenizer: Any, attention: str, layout: str
) -> None:
    packed, unpacked = packed_and_unpacked
    model = tiny_llama(len(tokenizer), attn_implementation=attention)
    pad = tokenizer.pad_token_id
    reference = loss(model, SFTCollator(pad)(list(unpacked.train)))
    collator = SFTCollator(
        pad, padding_free=layout == "padding_free", block_mask_dtype=torch.float32 if layout == "4d_mask" else None
    )
    batch = collator(list(packed.train))
    if layout == "4d_mask":
        assert batch["attention_mask"].shape[1] == 1
    else:
        assert "attention_mask" not in batch, "transformers must find the samples from position_ids"
    assert loss(model, batch) == pytest.approx(reference, abs=1e-5)


def test_the_loss_comparison_notices_attention_across_samples(
    packed_and_unpacked: tuple[Any, Any], tokenizer: Any
) -> None:
    # The same packed rows with positions that do not restart: samples see each other and the loss changes.
    packed, unpacked = packed_and_unpacked
    model = tiny_llama(len(tokenizer))
    reference = loss(model, SFTCollator(tokenizer.pad_token_id)(list(unpacked.train)))
    batch = SFTCollator(tokenizer.pad_token_id)(list(packed.train))
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    assert abs(loss(model, batch) - reference) > 1e-3


def test_block_causal_mask_lets_tokens_see_only_earlier_tokens_of_their_sample() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    allowed = block_causal_mask(positions, torch.float32)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


def test_unpacked_batches_are_right_padded_with_an_attention_mask() -> None:
    batch = SFTCollator(pad_token_id=7)(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=80), st.integers(50, 120))
def test_best_fit_puts_every_sample_in_exactly_one_row_within_capacity(lengths: list[int], capacity: int) -> None:
    sizes = np.asarray(lengths)
    bins = best_fit_bins(sizes, capacity)
    assert sorted(i for members in bins for i in members) == list(range(len(lengths)))
    assert all(sizes[members].sum() <= capacity for members in bins)
    # Best fit never leaves two rows that could have been one.
    totals = sorted(int(sizes[members].sum()) for members in bins)
    assert len(totals) < 2 or totals[0] + totals[1] > capacity


def test_pack_keeps_each_samples_tokens_together() -> None:
    samples = Rows.from_samples(
        [np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32), np.array([6, 7, 8, 9], np.int32)],
        [np.array([-100, 2, 3], np.int32), np.array([-100, 5], np.int32), np.array([-100, 7, 8, 9], np.int32)],
    )
    rows = pack(samples, capacity=6)
    assert len(rows) == 2
    assert rows.lengths.tolist() == [6, 3]  # longest first: [6 7 8 9][4 5], then [1 2 3]
    assert rows.input_ids.tolist() == [6, 7, 8, 9, 4, 5, 1, 2, 3]
    assert rows.position_ids is not None
    assert rows.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2]


@pytest.mark.parametrize(("attention", "expected"), [("auto", "sdpa"), ("sdpa", "sdpa"), ("eager", "eager")])
def test_every_attention_choice_that_runs_on_cpu_keeps_packed_samples_apart(
    packed_and_unpacked: tuple[Any, Any], tokenizer: Any, tmp_path: Path, attention: str, expected: str
) -> None:
    # The product's path: training.attention -> load_model -> the collator the data bundle picks for that model.
    from trainer.tinymodels import write_model

    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.methods import load_model

    packed, unpacked = packed_and_unpacked
    model_dir = write_model(tmp_path / "model")
    config = TrainerConfig.model_validate(
        {
            "model": {"uri": model_dir.as_uri()},
            "datasets": [{"uri": "file:///unused.jsonl"}],
            "method": {"type": "full"},
            "training": {"attention": attention, "precision": "fp32", "gradientCheckpointing": False},
            "output": {"uri": (tmp_path / "out").as_uri()},
        }
    )
    model = load_model(config, model_dir)
    assert model.config._attn_implementation == expected
    reference = loss(model, unpacked.collator(expected)(list(unpacked.train)))
    assert loss(model, packed.collator(model.config._attn_implementation)(list(packed.train))) == pytest.approx(
        reference, abs=1e-5
    )


def test_rows_made_range_by_range_are_the_rows_made_at_once() -> None:
    rng = np.random.default_rng(3)
    ids = [rng.integers(0, 1000, int(n), dtype=np.int32) for n in rng.integers(1, 40, 200)]
    labels = [np.where(rng.random(len(x)) < 0.3, IGNORE, x).astype(np.int32) for x in ids]
    samples = Rows.from_samples(ids, labels)
    order = rng.permutation(len(samples))[:150]
    for layout in (
        Layout.unpacked(order, samples.lengths, samples.gather),
        Layout.packed_rows(order, samples.lengths, samples.gather, capacity=64, seed=1),
    ):
        whole = layout.rows()
        cuts = [0, 1, len(layout) // 3, len(layout) - 1, len(layout)]
        pieces = [layout.rows(a, b) for a, b in itertools.pairwise(cuts)]
        columns = ("input_ids", "labels", "lengths") + (("position_ids",) if layout.packed else ())
        for column in columns:
            joined = np.concatenate([getattr(piece, column) for piece in pieces])
            assert joined.tolist() == getattr(whole, column).tolist(), column
        assert layout.packed or whole.position_ids is None
    # Unpacked: row i is sample order[i], untouched.
    unpacked = Layout.unpacked(order, samples.lengths, samples.gather).rows(10, 12)
    assert unpacked.input_ids.tolist() == ids[order[10]].tolist() + ids[order[11]].tolist()
    assert unpacked.labels.tolist() == labels[order[10]].tolist() + labels[order[11]].tolist()
    # Packed: every sample of `order` once, whole, its first label ignored, positions from 0.
    packed = Layout.packed_rows(order, samples.lengths, samples.gather, capacity=64, seed=1)
    made = packed.rows()
    assert sorted(packed.order.tolist()) == sorted(order.tolist())
    assert made.lengths.max() <= 64
    at = 0
    for sample in packed.order.tolist():
        n = len(ids[sample])
        assert made.input_ids[at : at + n].tolist() == ids[sample].tolist()
        assert made.labels[at] == IGNORE
        assert made.labels[at + 1 : at + n].tolist() == labels[sample][1:].tolist()
        assert made.position_ids is not None
        assert made.position_ids[at : at + n].tolist() == list(range(n))
        at += n
