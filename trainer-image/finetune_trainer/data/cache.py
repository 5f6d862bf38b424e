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

from finetune_trainer.data.packing import Rows
from finetune_trainer.errors import ConfigError, DataError, TrainerError

log = logging.getLogger(__name__)

# Bump when the tokenized layout or the meaning of a setting changes, so old caches are not read.
CACHE_VERSION = 2
MARKER = "COMPLETE"
# Arrow list offsets are int32: keep each record batch well below 2**31 tokens.
BATCH_TOKENS = 1 << 26

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


def _write_rows(rows: Rows, path: Path) -> None:
    import pyarrow as pa

    columns = {"input_ids": rows.input_ids, "labels": rows.labels}
    if rows.position_ids is not None:
        columns["position_ids"] = rows.position_ids
    schema = pa.schema([(name, pa.list_(pa.int32())) for name in columns])
    bounds = [0]
    while bounds[-1] < len(rows):
        # The furthest row end whose tokens still fit in one batch (at least one row per batch).
        limit = rows.offsets[bounds[-1]] + BATCH_TOKENS
        end = int(np.searchsorted(rows.offsets, limit, side="right")) - 1
        bounds.append(min(len(rows), max(end, bounds[-1] + 1)))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start, end in itertools.pairwise(bounds):
            offsets = (rows.offsets[start : end + 1] - rows.offsets[start]).astype(np.int32)
            low, high = rows.offsets[start], rows.offsets[end]
            arrays = [
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(values[low:high], dtype=np.int32)))
                for values in columns.values()
            ]
            writer.write_batch(pa.record_batch(arrays, schema=schema))


class TokenCache:
    """One cache entry: <root>/<key>/ with <split>.arrow files, stats.json and the COMPLETE marker."""

    def __init__(self, root: Path, key: str) -> None:
        self.root = root
        self.key = key
        self.path = root / key
        self.error_path = root / f"{key}.error.json"

    @property
    def complete(self) -> bool:
        return (self.path / MARKER).is_file()

    def write(self, splits: Mapping[str, Rows], stats: Mapping[str, Any]) -> None:
        """Write the splits and stats; the entry appears under its final name only when whole."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.key}.", dir=self.root))
        try:
            for name, rows in splits.items():
                _write_rows(rows, staging / f"{name}.arrow")
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

        stats = json.loads((self.path / "stats.json").read_text())
        splits = {file.stem: datasets.Dataset.from_file(str(file)) for file in sorted(self.path.glob("*.arrow"))}
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
