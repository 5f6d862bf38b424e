"""Batching tokenized rows for the model: padded batches, packed rows, and the padding-free layout.

How packed samples are kept apart (transformers 5.x, read from its masking_utils and flash-attention code):

* sdpa / eager / flex: when `attention_mask` is None and `position_ids` restart inside a row, `create_causal_mask`
  finds the sample boundaries (`find_packed_sequence_indices`) and builds a block-diagonal causal mask itself.
  Packed batches therefore carry `position_ids` and no `attention_mask`. That detection is skipped when the forward
  pass builds a KV cache (`use_cache`, which model configs default to True outside the HF Trainer), and the samples
  would then silently attend to each other; packed batches carry `use_cache=False` to rule that out.
* flash_attention_2/3: the varlen kernel is used when position_ids restart, but only for a batch of ONE row, so the
  `padding_free` layout concatenates the whole micro-batch into one row of shape [1, total tokens].
* `block_mask_dtype` builds the 4D block-diagonal causal mask explicitly (additive: 0 where attention is allowed,
  the dtype's minimum elsewhere), which transformers 5.x passes to sdpa/eager unchanged. It is the fallback for
  models whose mask code does not look at position_ids (custom modeling code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from finetune_trainer.data.encode import IGNORE


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Each token's sample index within its row: a new sample starts wherever positions do not step by 1."""
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[..., :1] - 1)
    return (step != 1).cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive [batch, 1, q, k] mask that lets a token see only earlier tokens of its own sample."""
    ids = sequence_ids(position_ids)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (ids[:, :, None] == ids[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None, :, :]


def _as_list(value: Any) -> list[int]:
    return value.tolist() if isinstance(value, np.ndarray | torch.Tensor) else list(value)


@dataclass
class SFTCollator:
    """Turns dataset rows ({input_ids, labels[, position_ids]}) into model inputs.

    * unpacked rows: right-padded `input_ids`, `labels` (-100 on padding) and `attention_mask`;
    * packed rows: right-padded `input_ids`, `labels` and `position_ids` (the padding is one more "sample" with its
      own positions and no labels), `use_cache=False`, no `attention_mask`; with `block_mask_dtype` the explicit 4D
      mask instead;
    * `padding_free`: every row of the micro-batch concatenated into one row, with `position_ids` (for flash
      attention's varlen path); works for packed and unpacked rows.
    """

    pad_token_id: int
    padding_free: bool = False
    block_mask_dtype: torch.dtype | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ids = [_as_list(f["input_ids"]) for f in features]
        labels = [_as_list(f["labels"]) for f in features]
        if "position_ids" in features[0]:
            positions = [_as_list(f["position_ids"]) for f in features]
        else:
            positions = [list(range(len(row))) for row in ids]
        packed = "position_ids" in features[0]
        if self.padding_free:
            flat_positions = torch.tensor([[p for row in positions for p in row]], dtype=torch.long)
            batch: dict[str, Any] = {
                "input_ids": torch.tensor([[t for row in ids for t in row]], dtype=torch.long),
                "labels": torch.tensor([[t for row in labels for t in row]], dtype=torch.long),
                "position_ids": flat_positions,
                "use_cache": False,
            }
            if self.block_mask_dtype is not None:
                batch["attention_mask"] = block_causal_mask(flat_positions, self.block_mask_dtype)
            return batch
        width = max(len(row) for row in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        target = torch.full((len(ids), width), IGNORE, dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(zip(ids, labels, strict=True)):
            input_ids[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            target[row, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
        batch = {"input_ids": input_ids, "labels": target}
        if not packed:
            attention = torch.zeros((len(ids), width), dtype=torch.long)
            for row, row_ids in enumerate(ids):
                attention[row, : len(row_ids)] = 1
            batch["attention_mask"] = attention
            return batch
        position_ids = torch.zeros((len(ids), width), dtype=torch.long)
        for row, row_positions in enumerate(positions):
            used = len(row_positions)
            position_ids[row, :used] = torch.tensor(row_positions, dtype=torch.long)
            position_ids[row, used:] = torch.arange(width - used)
        batch["position_ids"] = position_ids
        batch["use_cache"] = False
        if self.block_mask_dtype is not None:
            batch["attention_mask"] = block_causal_mask(position_ids, self.block_mask_dtype)
        return batch
