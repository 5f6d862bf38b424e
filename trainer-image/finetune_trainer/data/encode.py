"""Rendered conversations → token ids and labels: loss masking and truncation at cutoff_len.

Labels are -100 except on the model turns' tokens (their end-of-turn token included). The whole text is tokenized
at once, as at inference, and a token is a model token when any of its characters lies in a model-turn span (a fast
tokenizer's offsets say which characters each token covers). So a token that straddles the boundary, like " I" after
"Assistant:" with a byte-level BPE whose space belongs to the word, is a target: the model must produce it.
Tokenizers without offsets fall back to tokenizing the prompt and model pieces separately and concatenating them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from finetune_trainer.data.templates import Rendered

IGNORE = -100


@dataclass(frozen=True)
class Masking:
    """Which tokens carry a label, and the longest sample kept."""

    cutoff_len: int
    train_on_prompt: bool = False  # every token labeled (takes precedence over mask_history)
    mask_history: bool = False  # only the last model turn labeled


@dataclass(frozen=True)
class Sample:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where no loss
    truncated: bool


def _label_spans(rendered: Rendered, masking: Masking) -> Sequence[tuple[int, int]]:
    if masking.train_on_prompt:
        return ((0, len(rendered.text)),)
    if masking.mask_history:
        return rendered.spans[-1:]
    return rendered.spans


def encode(
    batch: Sequence[Rendered], tokenizer: Any, masking: Masking, *, offsets: bool | None = None
) -> list[Sample | str]:
    """Encode a batch; each entry is a Sample or, for a sample with no label left, the reason it is dropped.

    `offsets` chooses the tokenization path (default: offsets when the tokenizer is a fast one).
    """
    use_offsets = getattr(tokenizer, "is_fast", False) if offsets is None else offsets
    pairs = _with_offsets(batch, tokenizer, masking) if use_offsets else _by_pieces(batch, tokenizer, masking)
    return [_finish(ids, labels, masking.cutoff_len) for ids, labels in pairs]


def _with_offsets(batch: Sequence[Rendered], tokenizer: Any, masking: Masking) -> list[tuple[np.ndarray, np.ndarray]]:
    encoded = tokenizer(
        [r.text for r in batch], add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False
    )
    out = []
    for rendered, ids_list, offsets in zip(batch, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        ids = np.asarray(ids_list, dtype=np.int32)
        bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        keep = np.zeros(len(ids), dtype=bool)
        for start, end in _label_spans(rendered, masking):
            keep |= (bounds[:, 0] < end) & (bounds[:, 1] > start)
        out.append((ids, np.where(keep, ids, IGNORE).astype(np.int32)))
    return out


def _by_pieces(batch: Sequence[Rendered], tokenizer: Any, masking: Masking) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for rendered in batch:
        pieces: list[tuple[str, bool]] = []
        done = 0
        for start, end in _label_spans(rendered, masking):
            pieces += [(rendered.text[done:start], False), (rendered.text[start:end], True)]
            done = end
        pieces.append((rendered.text[done:], False))
        pieces = [(text, trainable) for text, trainable in pieces if text]
        ids_parts = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"] if pieces else []
        ids_list: list[int] = []
        label_list: list[int] = []
        for (_, trainable), part in zip(pieces, ids_parts, strict=True):
            ids_list += part
            label_list += part if trainable else [IGNORE] * len(part)
        out.append((np.asarray(ids_list, dtype=np.int32), np.asarray(label_list, dtype=np.int32)))
    return out


def _finish(ids: np.ndarray, labels: np.ndarray, cutoff_len: int) -> Sample | str:
    truncated = len(ids) > cutoff_len
    if truncated:
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    if len(labels):
        # Nothing precedes the first token, so it is never a target; marking it keeps a packed sample from being
        # trained to predict its own first token from the previous sample's last one.
        labels = labels.copy()
        labels[0] = IGNORE
    if not (labels != IGNORE).any():
        return "no trainable tokens left within cutoffLen" if truncated else "no trainable tokens"
    return Sample(ids, labels, truncated)
