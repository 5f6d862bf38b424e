"""Variable-length token rows kept as flat arrays, and packing samples into rows of at most cutoff_len tokens.

A packed row carries position_ids that restart at 0 for every sample in it; that is what tells the attention
(transformers' packed-sequence masks, flash-attention's varlen path) where one sample ends and the next begins.

Rows are planned first (`Layout`: which samples, in which order, make each row) and made range by range later, so
that the cache writer makes and writes a bounded number of rows at a time, and several processes each their own
range, without one process ever holding every row.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
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

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The input_ids and labels of these rows, one after another (new arrays)."""
        index = _gather_index(self.offsets[rows], self.lengths[rows])
        return self.input_ids[index], self.labels[index]

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
    ends = np.cumsum(lengths)
    index: np.ndarray = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    index += np.repeat(starts - (ends - lengths), lengths)
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


# What a Layout makes its rows from: the input_ids and labels of the given samples, one after another (new arrays).
Gather = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Layout:
    """Rows planned but not made yet: row i holds the samples `order[bounds[i]:bounds[i + 1]]`, one after another.

    `lengths` are those samples' lengths (in `order`'s order), `offsets` the rows' token offsets, and `gather`
    fetches samples' tokens. Packed rows (`packed`) get position_ids restarting at 0 per sample, and the first
    label of each sample is IGNORE (it follows the previous sample's last token).
    """

    order: np.ndarray  # int64 sample numbers
    bounds: np.ndarray  # int64, rows + 1: where each row's samples start in `order`
    lengths: np.ndarray  # int64, per entry of `order`
    offsets: np.ndarray  # int64, rows + 1
    gather: Gather
    packed: bool

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @classmethod
    def unpacked(cls, order: np.ndarray, lengths: np.ndarray, gather: Gather) -> Layout:
        """One row per sample of `order`; `lengths` are every sample's lengths (indexed by sample number)."""
        order = np.asarray(order, dtype=np.int64)
        chosen = lengths[order]
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(chosen, out=offsets[1:])
        return cls(order, np.arange(len(order) + 1, dtype=np.int64), chosen, offsets, gather, packed=False)

    @classmethod
    def packed_rows(
        cls, order: np.ndarray, lengths: np.ndarray, gather: Gather, capacity: int, seed: int | None = None
    ) -> Layout:
        """The samples of `order` packed into rows of at most `capacity` tokens by best fit; with a `seed` the rows
        come out in a seeded random order (best fit alone orders them roughly by fill)."""
        order = np.asarray(order, dtype=np.int64)
        bins = best_fit_bins(lengths[order], capacity)
        if seed is not None:
            bins = [bins[i] for i in np.random.default_rng(seed).permutation(len(bins)).tolist()]
        members = np.fromiter((i for members in bins for i in members), dtype=np.int64, count=len(order))
        samples = order[members]
        chosen = lengths[samples]
        sizes = np.fromiter((len(members) for members in bins), dtype=np.int64, count=len(bins))
        bounds = np.zeros(len(bins) + 1, dtype=np.int64)
        np.cumsum(sizes, out=bounds[1:])
        token_ends = np.concatenate(([0], np.cumsum(chosen)))
        return cls(samples, bounds, chosen, token_ends[bounds], gather, packed=True)

    def rows(self, start: int = 0, end: int | None = None) -> Rows:
        """Rows start..end made."""
        end = len(self) if end is None else end
        first, last = int(self.bounds[start]), int(self.bounds[end])
        input_ids, labels = self.gather(self.order[first:last])
        offsets = self.offsets[start : end + 1] - self.offsets[start]
        if not self.packed:
            return Rows(input_ids, labels, offsets)
        lengths = self.lengths[first:last]
        sample_starts = np.cumsum(lengths) - lengths
        position_ids = np.arange(len(input_ids), dtype=np.int32)
        position_ids -= np.repeat(sample_starts.astype(np.int32), lengths)
        labels[sample_starts[lengths > 0]] = IGNORE
        return Rows(input_ids, labels, offsets, position_ids)


def pack(samples: Rows, capacity: int, seed: int | None = None) -> Rows:
    """Samples packed into rows of at most `capacity` tokens, position_ids restarting at 0 per sample (see
    `Layout.packed_rows`)."""
    order = np.arange(len(samples), dtype=np.int64)
    return Layout.packed_rows(order, samples.lengths, samples.gather, capacity, seed).rows()
