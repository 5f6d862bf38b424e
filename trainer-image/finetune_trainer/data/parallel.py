"""Converting, rendering and tokenizing records in parts, in this process and, for large data, worker processes.

Only the node's main rank preprocesses while the other ranks wait, so large datasets are spread over the CPUs the
container may use. The work is split into parts (a range of records of one file): each part is converted to
conversations, rendered and encoded where it is taken up, and only its arrays come back. The caller puts the
conversations in their seeded order afterwards, so the result does not depend on the number of processes.

Worker processes are forked once the files are parsed: they inherit the records, the template and the encoder, so
nothing is shipped to them but part numbers, and they start in milliseconds. Fork is safe here because the workers
run only Python, numpy and the Rust tokenizer's model (single-threaded: tokenizers turns its thread pool off in a
forked child) — never torch, CUDA or a lock another thread of the parent could hold — and they end with os._exit,
so none of the parent's exit handlers run in them. Where fork does not exist everything runs in this process.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune_trainer.data.conversation import Conversation
from finetune_trainer.data.encode import Encoder, Masking
from finetune_trainer.data.formats import Reader
from finetune_trainer.data.templates import ChatTemplate, Rendered, RenderError

log = logging.getLogger("finetune_trainer.data")

# Records per part: small enough that the processes finish close together (the last parts are waited for), large
# enough that a part's arrays are worth a trip through a pipe.
PART = 250
# Below this many records, or with fewer CPUs, one process does it all: workers would not pay for themselves (on
# the 2-CPU development machine, shared with other work, two processes measured slower than one: docs/benchmarks.md).
PARALLEL_MIN = 10_000
MIN_CPUS = 4
MAX_WORKERS = 16


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a Pod's CPU limit)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return count


def default_workers(records: int) -> int:
    """Processes (this one included) to prepare this many records with: one for small data or few CPUs, else one
    per CPU.
    """
    cpus = available_cpus()
    if records < PARALLEL_MIN or cpus < MIN_CPUS:
        return 1
    return min(MAX_WORKERS, cpus)


@dataclass
class Part:
    """What one range of records became.

    `conversations` counts the records converted (the others are in `read_drops` as (reason, where), in order);
    per conversation, `lengths` (0 where it was dropped) and `cut` (truncated at cutoff_len); the kept samples'
    ids and labels concatenated; and (conversation index, reason, origin) for each conversation dropped.
    """

    conversations: int
    read_drops: list[tuple[str, str]]
    input_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    cut: np.ndarray
    dropped: list[tuple[int, str, str]] = field(default_factory=list)


class PartEncoder:
    """Converts, renders and encodes ranges of records."""

    def __init__(self, template: ChatTemplate, tokenizer: Any, masking: Masking) -> None:
        self.template = template
        self.encoder = Encoder(tokenizer, masking, template)

    def __call__(self, reader: Reader, start: int, end: int) -> Part:
        conversations, read_drops = reader.convert(start, end)
        return self.encode(conversations, read_drops)

    def encode(self, conversations: Sequence[Conversation], read_drops: list[tuple[str, str]] | None = None) -> Part:
        count = len(conversations)
        dropped: list[tuple[int, str, str]] = []
        rendered: list[Rendered] = []
        positions: list[int] = []
        render = self.template.render
        for index, conversation in enumerate(conversations):
            try:
                rendered.append(render(conversation))
                positions.append(index)
            except RenderError as exc:
                dropped.append((index, str(exc), conversation.origin))
        encoded = self.encoder(rendered)
        for index, reason in encoded.dropped:
            dropped.append((positions[index], reason, conversations[positions[index]].origin))
        dropped.sort()
        lengths = np.zeros(count, dtype=np.int64)
        cut = np.zeros(count, dtype=bool)
        kept = np.ones(len(positions), dtype=bool)
        kept[[index for index, _ in encoded.dropped]] = False
        where = np.asarray(positions, dtype=np.int64)[kept]
        lengths[where] = encoded.lengths
        cut[where] = encoded.cut
        return Part(count, read_drops or [], encoded.input_ids, encoded.labels, lengths, cut, dropped)


# What forked workers inherit: the encoder and the readers the part numbers refer to.
_inherited: tuple[PartEncoder, Sequence[Reader]] | None = None


def _run_part(reader_index: int, start: int, end: int) -> Part:
    assert _inherited is not None
    encoder, readers = _inherited
    return encoder(readers[reader_index], start, end)


def _start_worker() -> None:
    # Never the Rust tokenizer's thread pool in a forked worker: its threads did not survive the fork.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@contextlib.contextmanager
def _forked_workers(processes: int, inherited: tuple[PartEncoder, Sequence[Reader]]) -> Iterator[ProcessPoolExecutor]:
    """A pool of `processes` workers forked from this process, which inherit `inherited`."""
    global _inherited
    _inherited = inherited
    # Set while they fork: tokenizers then neither warns about the fork nor runs its thread pool in them, and this
    # process, sharing the CPUs with them, tokenizes on one thread as they do.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Out of the collector's sight while the workers live: its passes would write to every object the processes
    # share, and so copy their memory page by page.
    gc.freeze()
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        gc.unfreeze()
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
        _inherited = None


def encode_parts(
    encoder: PartEncoder,
    readers: Sequence[Reader],
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[list[Part]]:
    """For each reader, its records converted and encoded, in parts, in order; `workers` processes, this one included.

    This process works through the parts from the front while the workers take them from the back, two each in
    flight, so that nobody waits long for anybody at the end.
    """
    tasks = [
        (r, start, min(start + PART, reader.count))
        for r, reader in enumerate(readers)
        for start in range(0, reader.count, PART)
    ]
    processes = min(workers, len(tasks)) - 1
    if processes > 0 and "fork" not in multiprocessing.get_all_start_methods():
        processes = 0
    results: list[Part | None] = [None] * len(tasks)
    with contextlib.ExitStack() as stack:
        pool = None
        if processes > 0:
            log.info("preparing %d records in %d processes", sum(r.count for r in readers), processes + 1)
            pool = stack.enter_context(_forked_workers(processes, (encoder, readers)))
        pending: dict[Future[Part], int] = {}
        front, back = 0, len(tasks)
        done = 0
        while front < back or pending:
            while pool is not None and len(pending) < 2 * processes and front < back:
                back -= 1
                pending[pool.submit(_run_part, *tasks[back])] = back
            if front < back:
                results[front] = encoder(readers[tasks[front][0]], *tasks[front][1:])
                done += tasks[front][2] - tasks[front][1]
                front += 1
                finished = [future for future in pending if future.done()]
            else:
                finished = list(wait(pending, return_when=FIRST_COMPLETED).done)
            for future in finished:
                index = pending.pop(future)
                results[index] = future.result()
                done += tasks[index][2] - tasks[index][1]
            if progress:
                progress(done)
    grouped: list[list[Part]] = [[] for _ in readers]
    for (r, _, _), part in zip(tasks, results, strict=True):
        assert part is not None
        grouped[r].append(part)
    return grouped
