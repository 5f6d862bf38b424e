"""Rendered conversations → token ids and labels: loss masking and truncation at cutoff_len.

Labels are -100 except on the model turns' tokens (their end-of-turn token included). The whole text is tokenized
at once, as at inference, and a token is a model token when any of its characters lies in a model-turn span (a fast
tokenizer's encoding maps characters to tokens). So a token that straddles the boundary, like " I" after
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


class Encoder:
    """Encodes batches of rendered conversations for one tokenizer and masking; built once per run."""

    def __init__(self, tokenizer: Any, masking: Masking, *, offsets: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.masking = masking
        backend = getattr(tokenizer, "backend_tokenizer", None)
        use_offsets = backend is not None if offsets is None else offsets
        if use_offsets and backend is not None and (backend.truncation or backend.padding):
            # The Rust tokenizer is called directly (the transformers wrapper costs as much as the tokenization);
            # a tokenizer.json that truncates or pads would do so silently, so use a copy that does neither.
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        self.backend = backend if use_offsets else None

    def __call__(self, batch: Sequence[Rendered]) -> list[Sample | str]:
        """Each entry a Sample or, for a sample with no label left, the reason it is dropped."""
        pairs = (
            self._by_characters(batch) if self.backend is not None else _by_pieces(batch, self.tokenizer, self.masking)
        )
        return [_finish(ids, labels, self.masking.cutoff_len) for ids, labels in pairs]

    def _by_characters(self, batch: Sequence[Rendered]) -> list[tuple[np.ndarray, np.ndarray]]:
        assert self.backend is not None
        encodings = self.backend.encode_batch([r.text for r in batch], add_special_tokens=False)
        out = []
        for rendered, encoding in zip(batch, encodings, strict=True):
            ids = np.array(encoding.ids, dtype=np.int32)
            labels = np.full(len(ids), IGNORE, dtype=np.int32)
            for start, end in _label_spans(rendered, self.masking):
                first, last = _token_range(encoding, start, end, len(rendered.text), len(ids))
                labels[first:last] = ids[first:last]
            out.append((ids, labels))
        return out


def _token_range(encoding: Any, start: int, end: int, text_length: int, count: int) -> tuple[int, int]:
    """[first, last) of the tokens that cover any character of [start, end).

    Characters a tokenizer maps to no token (some normalizers drop them) are skipped inward from both ends.
    """
    first = None
    for char in range(start, end):
        first = encoding.char_to_token(char)
        if first is not None:
            break
    if first is None:
        return 0, 0
    if end >= text_length:
        return first, count  # to the very end, also past a last character split over several byte tokens
    for char in range(end - 1, start - 1, -1):
        last = encoding.char_to_token(char)
        if last is not None:
            return first, last + 1
    return first, first + 1


def encode(
    batch: Sequence[Rendered], tokenizer: Any, masking: Masking, *, offsets: bool | None = None
) -> list[Sample | str]:
    """Encode one batch (see Encoder); `offsets` picks the path (default: character offsets for fast tokenizers)."""
    return Encoder(tokenizer, masking, offsets=offsets)(batch)


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
