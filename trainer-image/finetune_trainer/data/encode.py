"""Rendered conversations → token ids and labels, truncated at cutoff_len, as LLaMA-Factory's SFT preprocessing does.

Every text piece of a rendering is tokenized on its own (without special tokens) and the ids are concatenated, as
LLaMA-Factory's `Template._encode` does; each distinct piece of a batch once, by the word cache (wordcache.py: the
Rust tokenizer's ids at Python speed, for ASCII text and byte-level BPE tokenizers) or else by the Rust tokenizer's
`encode_batch` in one call. Ids travel as native int32 bytes (joins and slices in C, no Python int per token) until
one array per batch. Then, per (prompt, response) pair, its `SupervisedDatasetProcessor._encode_data_example`:
the cutoff is shared between prompt and response by `infer_seqlen` (turns in order; with mask_history the last turn
first), prompt tokens get no label, response tokens are their own label (only the last turn's with mask_history),
and templates with `efficient_eos` label EOS on the first position of each later prompt and end with EOS.

One difference, on purpose: a sample left with no label at all (its response cut away) is dropped and counted,
where LLaMA-Factory keeps it to train nothing (docs/trainer.md).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from finetune_trainer.data.packing import IGNORE
from finetune_trainer.data.templates import ChatTemplate, Rendered
from finetune_trainer.data.wordcache import WordCache, pack_ids

__all__ = ["IGNORE", "Encoded", "Encoder", "Masking", "Sample", "encode", "infer_seqlen"]

log = logging.getLogger("finetune_trainer.data")

IGNORE_ID = struct.pack("i", IGNORE)
# Texts of the first batch compared with the Rust tokenizer's own ids before the word cache is trusted.
SPOT_CHECK = 64


@dataclass(frozen=True)
class Masking:
    """Which tokens carry a label, and the longest sample kept."""

    cutoff_len: int
    train_on_prompt: bool = False  # prompt tokens labeled too
    mask_history: bool = False  # only the last model turn labeled


@dataclass(frozen=True)
class Sample:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where no loss
    truncated: bool


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """How many prompt and response tokens of a turn fit in `cutoff_len` (LLaMA-Factory's rule).

    A short response is kept whole and the prompt cut; else a short prompt is kept whole and the response cut;
    else both are cut in proportion to their lengths.
    """
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


@dataclass
class Encoded:
    """A batch encoded: the kept samples' ids and labels concatenated, their lengths, and the dropped ones."""

    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where no loss
    lengths: np.ndarray  # int64, one per kept sample
    cut: np.ndarray  # bool, one per kept sample: truncated at cutoff_len
    labeled: np.ndarray  # int64, one per kept sample: its tokens that carry a loss
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (index in the batch, reason)

    @property
    def truncated(self) -> int:
        return int(self.cut.sum())

    def samples(self) -> list[Sample]:
        ends = np.cumsum(self.lengths).tolist()
        starts = [0, *ends[:-1]]
        return [
            Sample(self.input_ids[a:b], self.labels[a:b], bool(c))
            for a, b, c in zip(starts, ends, self.cut.tolist(), strict=True)
        ]


def _usable_as_is(backend: Any, special_tokens: Sequence[str]) -> bool:
    """Whether the Rust tokenizer already is what the copy below would make (saves copying a large vocabulary):
    no truncation or padding, and every stop word already an added token (adding it again changes nothing).
    """
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    return backend.truncation is None and backend.padding is None and set(special_tokens) <= added


class Encoder:
    """Encodes batches of rendered conversations for one tokenizer, template and masking; built once per run."""

    def __init__(self, tokenizer: Any, masking: Masking, template: ChatTemplate) -> None:
        self.masking = masking
        self.efficient_eos = template.efficient_eos
        self.eos = template.eos_token_id
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not _usable_as_is(backend, template.special_tokens):
            # The Rust tokenizer is called directly (the transformers wrapper costs as much as the tokenization).
            # A copy: it must neither truncate nor pad, and it gets the template's stop words as special tokens,
            # as LLaMA-Factory adds them to the tokenizer (they are in the vocabulary: the template checked).
            from tokenizers import AddedToken, Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
            if template.special_tokens:
                backend.add_special_tokens(
                    [AddedToken(t, special=True, normalized=False) for t in template.special_tokens]
                )
        self.tokenizer: Any = None if backend is not None else tokenizer  # only without a Rust tokenizer
        self.backend = backend
        self.words = WordCache.build(backend) if backend is not None else None
        self.checked = False
        eos = self.eos if self.eos is not None else IGNORE
        self.eos_id = struct.pack("i", eos)

    def _ids(self, texts: list[str]) -> list[bytes]:
        """The ids of each text (tokenized on its own, no special tokens added) as int32 bytes."""
        if self.words is not None:
            if not self.checked:
                self.checked = True
                if not self.words.check(texts[:SPOT_CHECK]):
                    self.words = None
                    return self._ids(texts)
            return self.words.encode(texts)
        if self.backend is not None:
            return [pack_ids(e.ids) for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [pack_ids(ids) for ids in encoded]

    def __call__(self, batch: Sequence[Rendered]) -> Encoded:
        """The batch's samples; those with no label left are dropped with their reason."""
        pieces = dict.fromkeys(p for r in batch for m in r.messages for p in m)
        texts = [p for p in pieces if isinstance(p, str)]
        ids: dict[str | int, bytes] = dict(zip(texts, self._ids(texts), strict=True))
        for piece in pieces:
            if not isinstance(piece, str):
                ids[piece] = struct.pack("i", piece)
        get = ids.__getitem__
        all_ids: list[bytes] = []
        all_labels: list[bytes] = []
        truncated: list[bool] = []
        for rendered in batch:
            sample_ids, sample_labels, cut = self._sample([b"".join(map(get, m)) for m in rendered.messages])
            all_ids.append(sample_ids)
            all_labels.append(sample_labels)
            truncated.append(cut)
        return self._finish(all_ids, all_labels, truncated)

    def _sample(self, messages: list[bytes]) -> tuple[bytes, bytes, bool]:
        """One sample's ids and labels (int32 bytes: 4 per token) and whether it was cut."""
        masking = self.masking
        cutoff = masking.cutoff_len
        pairs = [(messages[i], messages[i + 1]) for i in range(0, len(messages), 2)]
        if masking.mask_history:
            pairs = pairs[::-1]  # the last turns first, as they matter most
        efficient_eos = self.efficient_eos
        full = sum(len(s) + len(t) for s, t in pairs) >> 2
        input_ids: list[bytes] = []
        labels: list[bytes] = []
        total = 1 if efficient_eos else 0
        for turn, (source, target) in enumerate(pairs):
            if total >= cutoff:
                break
            source_len, target_len = infer_seqlen(len(source) >> 2, len(target) >> 2, cutoff - total)
            source, target = source[: source_len << 2], target[: target_len << 2]
            total += source_len + target_len
            if masking.train_on_prompt:
                source_label = source
            elif efficient_eos and turn != 0 and source_len:
                source_label = self.eos_id + IGNORE_ID * (source_len - 1)
            else:
                source_label = IGNORE_ID * source_len
            target_label = IGNORE_ID * target_len if masking.mask_history and turn != 0 else target
            if masking.mask_history:
                input_ids[:0] = (source, target)
                labels[:0] = (source_label, target_label)
            else:
                input_ids += (source, target)
                labels += (source_label, target_label)
        if efficient_eos:
            input_ids.append(self.eos_id)
            labels.append(self.eos_id)
        sample_ids = b"".join(input_ids)
        return sample_ids, b"".join(labels), (len(sample_ids) >> 2) < full + (1 if efficient_eos else 0)

    @staticmethod
    def _finish(all_ids: list[bytes], all_labels: list[bytes], truncated: list[bool]) -> Encoded:
        """One array per batch; samples without a label past position 0 dropped."""
        input_ids = np.frombuffer(b"".join(all_ids), dtype=np.int32)
        labels = np.frombuffer(b"".join(all_labels), dtype=np.int32)
        lengths = np.fromiter(map(len, all_ids), dtype=np.int64, count=len(all_ids)) >> 2
        ends = np.cumsum(lengths)
        starts = ends - lengths
        labeled = labels != IGNORE
        counts = np.concatenate(([0], np.cumsum(labeled, dtype=np.int64)))
        # Label 0 is never a target (nothing comes before it to predict it from).
        first = np.zeros(len(lengths), dtype=bool)
        nonempty = lengths > 0
        first[nonempty] = labeled[starts[nonempty]]
        labeled_per_sample = counts[ends] - counts[starts]
        trainable = labeled_per_sample - first > 0
        cut = np.fromiter(truncated, dtype=bool, count=len(truncated))
        dropped = [
            (int(i), "no trainable tokens left within cutoffLen" if cut[i] else "no trainable tokens")
            for i in np.flatnonzero(~trainable)
        ]
        if dropped:
            keep = np.repeat(trainable, lengths)
            input_ids, labels, lengths, cut = input_ids[keep], labels[keep], lengths[trainable], cut[trainable]
            labeled_per_sample = labeled_per_sample[trainable]
        return Encoded(input_ids, labels, lengths, cut, labeled_per_sample, dropped)


def encode(batch: Sequence[Rendered], tokenizer: Any, masking: Masking, template: ChatTemplate) -> list[Sample | str]:
    """Encode one batch (see Encoder): each entry a Sample or, for a sample with no label left, why it is dropped."""
    encoded = Encoder(tokenizer, masking, template)(batch)
    reasons = dict(encoded.dropped)
    kept = iter(encoded.samples())
    return [reasons[i] if i in reasons else next(kept) for i in range(len(batch))]
