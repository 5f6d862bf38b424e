"""Rendered conversations → token ids and labels, truncated at cutoff_len, as LLaMA-Factory's SFT preprocessing does.

Every text piece of a rendering is tokenized on its own (without special tokens) and the ids are concatenated, as
LLaMA-Factory's `Template._encode` does; the pieces of a whole batch go through the Rust tokenizer in one call, each
distinct piece once. Then, per (prompt, response) pair, its `SupervisedDatasetProcessor._encode_data_example`:
the cutoff is shared between prompt and response by `infer_seqlen` (turns in order; with mask_history the last turn
first), prompt tokens get no label, response tokens are their own label (only the last turn's with mask_history),
and templates with `efficient_eos` label EOS on the first position of each later prompt and end with EOS.

One difference, on purpose: a sample left with no label at all (its response cut away) is dropped and counted,
where LLaMA-Factory keeps it to train nothing (docs/trainer.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from finetune_trainer.data.packing import IGNORE
from finetune_trainer.data.templates import ChatTemplate, Rendered

__all__ = ["IGNORE", "Encoder", "Masking", "Sample", "encode", "infer_seqlen"]


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


class Encoder:
    """Encodes batches of rendered conversations for one tokenizer, template and masking; built once per run."""

    def __init__(self, tokenizer: Any, masking: Masking, template: ChatTemplate) -> None:
        self.tokenizer = tokenizer
        self.masking = masking
        self.efficient_eos = template.efficient_eos
        self.eos = template.eos_token_id
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
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
        self.backend = backend

    def _ids(self, texts: list[str]) -> dict[str, list[int]]:
        unique = list(dict.fromkeys(texts))
        if self.backend is not None:
            encoded = [e.ids for e in self.backend.encode_batch(unique, add_special_tokens=False)]
        else:
            encoded = self.tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
        return dict(zip(unique, encoded, strict=True))

    def __call__(self, batch: Sequence[Rendered]) -> list[Sample | str]:
        """Each entry a Sample or, for a sample with no label left, the reason it is dropped."""
        ids = self._ids([p for r in batch for m in r.messages for p in m if isinstance(p, str)])
        out: list[Sample | str] = []
        for rendered in batch:
            messages = [[t for p in m for t in (ids[p] if isinstance(p, str) else (p,))] for m in rendered.messages]
            out.append(self._sample(messages))
        return out

    def _sample(self, messages: list[list[int]]) -> Sample | str:
        masking = self.masking
        cutoff = masking.cutoff_len
        pairs = [(messages[i], messages[i + 1]) for i in range(0, len(messages), 2)]
        if masking.mask_history:
            pairs = pairs[::-1]  # the last turns first, as they matter most
        full = sum(len(s) + len(t) for s, t in pairs)
        input_ids: list[int] = []
        labels: list[int] = []
        eos = self.eos if self.eos is not None else IGNORE
        total = 1 if self.efficient_eos else 0
        for turn, (source, target) in enumerate(pairs):
            if total >= cutoff:
                break
            source_len, target_len = infer_seqlen(len(source), len(target), cutoff - total)
            source, target = source[:source_len], target[:target_len]
            total += source_len + target_len
            if masking.train_on_prompt:
                source_label = source
            elif self.efficient_eos and turn != 0 and source_len:
                source_label = [eos] + [IGNORE] * (source_len - 1)
            else:
                source_label = [IGNORE] * source_len
            target_label = [IGNORE] * target_len if masking.mask_history and turn != 0 else target
            if masking.mask_history:
                input_ids = source + target + input_ids
                labels = source_label + target_label + labels
            else:
                input_ids += source + target
                labels += source_label + target_label
        if self.efficient_eos:
            input_ids.append(eos)
            labels.append(eos)
        truncated = len(input_ids) < full + (1 if self.efficient_eos else 0)
        labels_array = np.asarray(labels, dtype=np.int32)
        # Label 0 is never a target (nothing comes before it to predict it from).
        if not (labels_array[1:] != IGNORE).any():
            return "no trainable tokens left within cutoffLen" if truncated else "no trainable tokens"
        return Sample(np.asarray(input_ids, dtype=np.int32), labels_array, truncated)


def encode(batch: Sequence[Rendered], tokenizer: Any, masking: Masking, template: ChatTemplate) -> list[Sample | str]:
    """Encode one batch (see Encoder)."""
    return Encoder(tokenizer, masking, template)(batch)
