"""Variable-length token rows kept as flat arrays, and packing samples into rows of at most cutoff_len tokens.

A packed row carries position_ids that restart at 0 for every sample in it; that is what tells the attention
(transformers' packed-sequence masks, flash-attention's varlen path) where one sample ends and the next begins.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE = -100  # the label of a token without loss


@dataclass(frozen=True)
class Rows:
    """Rows of token ids as flat arrays: row i is `input_ids[offsets[i]:offsets[i+1]]` (same for the others)."""

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray  # int64, len = rows + 1
    position_ids: np.ndarray | None = None  # only for packed rows

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_samples(cls, input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> Rows:
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        empty = np.zeros(0, dtype=np.int32)
        return cls(
            np.concatenate(input_ids) if len(input_ids) else empty,
            np.concatenate(labels) if len(labels) else empty,
            offsets,
        )


def _gather_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat indices of the slices [start, start+length), one after another."""
    if not len(lengths):
        return np.zeros(0, dtype=np.int64)
    index: np.ndarray = np.concatenate(
        [np.arange(a, a + n) for a, n in zip(starts.tolist(), lengths.tolist(), strict=True)]
    )
    return index


def best_fit_bins(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Group sample indices into bins of total length <= capacity: best-fit decreasing.

    Longest first, each sample into the fullest bin it still fits in; O(n log n) with a sorted list of the open
    bins' free space. Every length must be <= capacity (samples are truncated before packing).
    """
    order = np.argsort(-lengths, kind="stable")
    free: list[int] = []  # sorted free space of the open bins
    owner: list[int] = []  # bin index for each entry of `free`
    bins: list[list[int]] = []
    for index in order.tolist():
        size = int(lengths[index])
        slot = bisect_left(free, size)
        if slot < len(free):
            target = owner.pop(slot)
            space = free.pop(slot)
        else:
            target, space = len(bins), capacity
            bins.append([])
        bins[target].append(index)
        space -= size
        if space > 0:
            slot = bisect_left(free, space)
            free.insert(slot, space)
            owner.insert(slot, target)
    return bins


def pack(samples: Rows, capacity: int, seed: int | None = None) -> Rows:
    """Samples packed into rows of at most `capacity` tokens, position_ids restarting at 0 per sample.

    Best fit orders rows roughly by fill; with a `seed` the rows come out in a seeded random order instead.
    """
    bins = best_fit_bins(samples.lengths, capacity)
    if seed is not None:
        bins = [bins[i] for i in np.random.default_rng(seed).permutation(len(bins)).tolist()]
    order = np.fromiter((i for members in bins for i in members), dtype=np.int64, count=len(samples))
    lengths = samples.lengths[order]
    index = _gather_index(samples.offsets[order], lengths)
    sample_starts = np.cumsum(lengths) - lengths
    position_ids = (np.arange(len(index)) - np.repeat(sample_starts, lengths)).astype(np.int32)
    # A sample's first token follows the previous sample's last one in the row: it must not be a target there.
    labels = samples.labels[index]
    labels[sample_starts[lengths > 0]] = IGNORE
    row_sizes = np.fromiter((len(members) for members in bins), dtype=np.int64, count=len(bins))
    row_lengths = np.add.reduceat(lengths, np.cumsum(row_sizes) - row_sizes) if len(bins) else row_sizes
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum(row_lengths, out=offsets[1:])
    return Rows(samples.input_ids[index], labels, offsets, position_ids)
