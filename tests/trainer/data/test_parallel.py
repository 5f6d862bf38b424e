"""Worker processes of data preparation: parts come back complete and in order from every process, and a worker
that fails or dies fails the build with a message that says so, leaving no process behind."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from finetune_trainer.data import cache as token_cache
from finetune_trainer.data import forking
from finetune_trainer.data.cache import TokenCache
from finetune_trainer.data.formats import PART
from finetune_trainer.data.packing import Layout, Rows
from finetune_trainer.data.parallel import Part, encode_parts

PARENT = os.getpid()


@dataclass
class _File:
    """A file of `count` records in pieces of PART, as a formats.Reader has them."""

    count: int
    exact = True

    @property
    def pieces(self) -> int:
        return -(-self.count // PART)

    def span(self, piece: int) -> tuple[int, int]:
        return piece * PART, min((piece + 1) * PART, self.count)


class _Encoder:
    """Makes a part from a piece's records (ids = the record numbers), noting which process made it; `fail` is
    called first in every process but this one."""

    def __init__(self, fail: Any = None, slow: float = 0.0) -> None:
        self.fail = fail
        self.slow = slow

    def __call__(self, reader: _File, piece: int) -> Part:
        start, end = reader.span(piece)
        if self.fail is not None and os.getpid() != PARENT:
            self.fail(start)
        time.sleep(self.slow)  # parts take long enough that every process gets some
        ids = np.arange(start, end, dtype=np.int32)
        return Part(
            conversations=end - start,
            read_drops=[("pid", os.getpid())],
            input_ids=ids,
            labels=-ids,
            lengths=np.ones(end - start, dtype=np.int64),
            cut=np.zeros(end - start, dtype=bool),
            labeled=np.ones(end - start, dtype=np.int64),
        )


def _children() -> set[int]:
    """This process's child processes, zombies included (test servers other tests started are among them)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == PARENT:
            out.add(int(stat.parent.name))
    return out


@pytest.fixture(autouse=True)
def _no_worker_left_behind() -> Iterator[None]:
    before = _children()
    yield
    assert _children() <= before, "every worker was reaped"


def test_every_process_takes_parts_and_they_come_back_in_order() -> None:
    files = [_File(10 * PART + 7), _File(3 * PART)]
    done: list[int] = []
    grouped = encode_parts(_Encoder(slow=0.01), files, workers=3, progress=done.append)

    assert [len(parts) for parts in grouped] == [11, 3]
    for file, parts in zip(files, grouped, strict=True):
        ids = np.concatenate([part.input_ids for part in parts])
        assert ids.tolist() == list(range(file.count))
        assert np.concatenate([part.labels for part in parts]).tolist() == [-i for i in range(file.count)]
    makers = {part.read_drops[0][1] for parts in grouped for part in parts}
    assert len(makers) > 1, "the forked workers made parts too"
    assert PARENT in makers
    # Each part counts its records (here one more than its conversations: the record naming its maker).
    assert done[-1] == sum(f.count + f.pieces for f in files)


def test_a_workers_parts_are_taken_without_waiting_for_it_to_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker says it has sent everything before it exits (a forked copy of a big process takes a while to tear
    down); inside reaping_later() it is left to exit on its own and reaped when the block ends, outside it before
    encode_parts returns."""
    real_exit = os._exit

    def slow_exit(status: int) -> None:  # only the forked workers call it
        time.sleep(2.0)
        real_exit(status)

    monkeypatch.setattr(forking.os, "_exit", slow_exit)
    before = _children()
    started = time.monotonic()
    with forking.reaping_later():
        grouped = encode_parts(_Encoder(slow=0.01), [_File(8 * PART)], workers=2)
        took = time.monotonic() - started
        exiting = _children() - before
    reaped = time.monotonic() - started

    assert np.concatenate([part.input_ids for part in grouped[0]]).tolist() == list(range(8 * PART))
    assert {part.read_drops[0][1] for part in grouped[0]} > {PARENT}, "the worker made parts"
    assert took < 1.5, f"the parts were taken once sent, not after the worker's exit ({took:.1f} s)"
    assert exiting, "the worker was still exiting when encode_parts returned"
    assert reaped >= 2.0, "the block's end waited for the worker"
    assert not _children() - before, "the block's end reaped the worker"

    started = time.monotonic()
    encode_parts(_Encoder(slow=0.01), [_File(8 * PART)], workers=2)
    assert time.monotonic() - started >= 2.0, "outside the block the worker is waited for before the return"
    assert not _children() - before, "outside the block the worker is reaped before the return"


def test_a_workers_error_fails_the_build_with_its_message() -> None:
    def fail(start: int) -> None:
        raise ValueError(f"bad record range starting at {start}")

    with pytest.raises(ValueError, match="bad record range starting at"):
        encode_parts(_Encoder(fail, slow=0.01), [_File(8 * PART)], workers=2)


def test_a_worker_killed_on_the_way_fails_the_build_and_says_how() -> None:
    def die(start: int) -> None:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would

    with pytest.raises(RuntimeError, match=r"worker \(pid \d+\) ended with signal 9 before it finished"):
        encode_parts(_Encoder(die, slow=0.01), [_File(8 * PART)], workers=2)


def test_when_this_process_fails_first_the_workers_are_stopped() -> None:
    class _Failing(_Encoder):
        def __call__(self, reader: _File, piece: int) -> Part:
            if os.getpid() == PARENT and piece >= 2:
                raise KeyError("main process failed")
            time.sleep(0.5 if os.getpid() != PARENT else 0.0)
            return super().__call__(reader, piece)

    started = time.monotonic()
    with pytest.raises(KeyError, match="main process failed"):
        encode_parts(_Failing(), [_File(40 * PART)], workers=2)
    assert time.monotonic() - started < 5, "the worker was killed, not waited for through 40 slow parts"


def test_a_cache_writer_that_fails_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards are written by every process; one that fails fails the write, and nothing appears under the entry's
    name (the next run builds it again)."""
    monkeypatch.setattr(token_cache, "MIN_SHARD_TOKENS", 1000)  # shards of this small data too
    samples = Rows.from_samples(
        [np.arange(n, dtype=np.int32) for n in range(1, 400)], [np.arange(n, dtype=np.int32) for n in range(1, 400)]
    )

    def gather(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if os.getpid() != PARENT:
            raise OSError(28, "No space left on device")
        time.sleep(0.2)  # the forked writer takes shards too (else this process could take them all first)
        return samples.gather(rows)

    layout = Layout.unpacked(np.arange(len(samples)), samples.lengths, gather)
    cache = TokenCache(tmp_path, "key")
    with pytest.raises(OSError, match="No space left on device"):
        cache.write({"train": layout}, {"train": {}}, processes=2)
    assert not cache.complete
    assert list(tmp_path.iterdir()) == [], "the staging directory is removed"

    cache.write({"train": Layout.unpacked(np.arange(len(samples)), samples.lengths, samples.gather)}, {}, processes=2)
    loaded, _ = cache.load()
    assert loaded["train"]["input_ids"] == [list(range(n)) for n in range(1, 400)]
