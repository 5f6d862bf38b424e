"""The node-local cache of tokenized data: keyed by data, tokenizer and settings; written once, read by every rank.

Local rank 0 builds the data into a temporary directory and renames it into place with a COMPLETE marker inside,
so a directory under its final name is always whole. The other local ranks poll the file system for that marker
(bounded wait; no torch.distributed collective, whose NCCL/gloo timeout a long tokenization would trip). When rank
0 fails on the data or the config it leaves an error file, and the waiting ranks raise the same error at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from finetune_trainer.data.forking import shared
from finetune_trainer.data.packing import Layout
from finetune_trainer.errors import ConfigError, DataError, TrainerError

log = logging.getLogger(__name__)

# Bump when the tokenized layout or the meaning of a setting changes, so old caches are not read.
CACHE_VERSION = 3
MARKER = "COMPLETE"
# Tokens per Arrow record batch: its list offsets are int32, and rows are made (gathered from the encoded parts)
# one batch at a time, so this bounds the memory that takes; batches of a few MB also reuse their memory.
BATCH_TOKENS = 1 << 20
# With several processes, each split is written as this many shards per process, each of at least MIN_SHARD_TOKENS
# (a small split, an eval set say, stays one file).
SHARDS_PER_PROCESS = 4
MIN_SHARD_TOKENS = 1 << 18

_fingerprints: dict[tuple[str, int, int], str] = {}


def file_fingerprint(path: Path) -> str:
    """sha256 of the file's contents (about 1 GB/s), remembered per (path, size, mtime) within the process."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _fingerprints:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        _fingerprints[memo] = f"sha256:{digest.hexdigest()}:{stat.st_size}"
    return _fingerprints[memo]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything in the tokenizer that changes token ids or the rendered text."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "added": sorted(str(t) for t in getattr(tokenizer, "added_tokens_encoder", {})),
        "chat_template": tokenizer.chat_template,
    }
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(payload: Mapping[str, Any]) -> str:
    text = json.dumps({"version": CACHE_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _batches(offsets: np.ndarray, start: int, end: int) -> list[tuple[int, int]]:
    """Rows start..end in consecutive ranges of at most BATCH_TOKENS tokens (at least one row each)."""
    bounds = [start]
    while bounds[-1] < end:
        # The furthest row end whose tokens still fit in one batch.
        limit = offsets[bounds[-1]] + BATCH_TOKENS
        last = int(np.searchsorted(offsets, limit, side="right")) - 1
        bounds.append(min(end, max(last, bounds[-1] + 1)))
    return list(itertools.pairwise(bounds))


def _shards(layout: Layout, count: int) -> list[tuple[int, int]]:
    """The layout's rows in at most `count` consecutive non-empty ranges of about the same number of tokens."""
    targets = np.linspace(0, layout.offsets[-1], count + 1)[1:-1]
    cuts = np.searchsorted(layout.offsets, targets, side="left").tolist()
    bounds = sorted({0, *(int(c) for c in cuts if 0 < c < len(layout)), len(layout)})
    return list(itertools.pairwise(bounds))


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.arrow"


def _write_rows(layout: Layout, start: int, end: int, path: Path) -> None:
    """Rows start..end of the layout as an Arrow stream file, made and written one batch at a time."""
    import pyarrow as pa

    names = ["input_ids", "labels"] + (["position_ids"] if layout.packed else [])
    schema = pa.schema([(name, pa.list_(pa.int32())) for name in names])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for low, high in _batches(layout.offsets, start, end):
            rows = layout.rows(low, high)
            offsets = pa.array(rows.offsets.astype(np.int32))
            columns = [rows.input_ids, rows.labels] + ([rows.position_ids] if layout.packed else [])
            arrays = [pa.ListArray.from_arrays(offsets, pa.array(np.asarray(c, dtype=np.int32))) for c in columns]
            writer.write_batch(pa.record_batch(arrays, schema=schema))


class TokenCache:
    """One cache entry: <root>/<key>/ with each split's Arrow shards, stats.json and the COMPLETE marker."""

    def __init__(self, root: Path, key: str) -> None:
        self.root = root
        self.key = key
        self.path = root / key
        self.error_path = root / f"{key}.error.json"

    @property
    def complete(self) -> bool:
        return (self.path / MARKER).is_file()

    def write(self, splits: Mapping[str, Layout], stats: Mapping[str, Any], processes: int = 1) -> None:
        """Make and write the splits' rows, and the stats; the entry appears under its final name only when whole.

        Each split is written as shards of about the same number of tokens, `<split>-<i>-of-<n>.arrow`: one with
        one process or little data, else a few per process, the `processes` (this one and forked ones) making and
        writing them.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.key}.", dir=self.root))
        # Several shards per process: the processes take them one by one, so one that started later or runs slower
        # does fewer (see forking.shared).
        shards: list[tuple[str, int, int, int, int]] = []  # (split, first row, end, shard number, shards)
        for name, layout in splits.items():
            most = max(1, int(layout.offsets[-1]) // MIN_SHARD_TOKENS)
            ranges = _shards(layout, 1 if processes <= 1 else min(most, SHARDS_PER_PROCESS * processes))
            shards += [(name, start, end, number, len(ranges)) for number, (start, end) in enumerate(ranges)]

        def write(index: int) -> None:
            name, start, end, number, count = shards[index]
            _write_rows(splits[name], start, end, staging / shard_name(name, number, count))

        try:
            shared(len(shards), write, processes, what="token cache writer")
            (staging / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
            (staging / MARKER).write_text(json.dumps({"key": self.key, "time": time.time()}))
            try:
                staging.rename(self.path)
            except OSError:
                if not self.complete:  # somebody else's half-written entry cannot exist (renames are whole)
                    raise
                log.info("tokenized data %s was written concurrently; using that copy", self.key)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def load(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The splits as memory-mapped `datasets.Dataset`s, and the stats."""
        import datasets
        from datasets.table import ConcatenationTable, MemoryMappedTable

        stats = json.loads((self.path / "stats.json").read_text())
        shards: dict[str, list[Any]] = {}
        for file in sorted(self.path.glob("*.arrow")):
            shards.setdefault(file.name.split("-", 1)[0], []).append(MemoryMappedTable.from_file(str(file)))
        # One dataset over the memory-mapped shards (what Dataset.from_file per shard and concatenate_datasets make,
        # in a fifth of the time: they also build and merge an info and a fingerprint per shard).
        splits = {
            name: datasets.Dataset(tables[0] if len(tables) == 1 else ConcatenationTable.from_tables(tables))
            for name, tables in shards.items()
        }
        return splits, stats

    def record_error(self, error: TrainerError) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            payload = {"reason": error.reason, "message": str(error)}
            partial = self.error_path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(payload))
            partial.replace(self.error_path)
        except OSError as exc:  # the waiting ranks then time out instead; the original error still propagates
            log.warning("could not record the data error for the other ranks: %s", exc)

    def clear_error(self) -> None:
        self.error_path.unlink(missing_ok=True)

    def wait(self, timeout_s: float, poll_s: float = 1.0) -> None:
        """Block until the entry is complete; raise rank 0's error when it left one, TrainerError on timeout."""
        deadline = time.monotonic() + timeout_s
        delay = min(poll_s, 0.05)
        while not self.complete:
            if self.error_path.is_file():
                payload = json.loads(self.error_path.read_text())
                kind = {"DataError": DataError, "InvalidConfig": ConfigError}.get(payload["reason"], TrainerError)
                raise kind(f"local rank 0 could not prepare the data: {payload['message']}")
            if time.monotonic() >= deadline:
                raise TrainerError(
                    f"waited {timeout_s:.0f}s for local rank 0 to tokenize the data into {self.path}; "
                    "it neither finished nor reported an error"
                )
            time.sleep(delay)
            delay = min(delay * 2, poll_s)
