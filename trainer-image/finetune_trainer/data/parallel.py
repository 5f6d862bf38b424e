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
import mmap
import multiprocessing
import os
import pickle
import signal
import struct
import tempfile
from collections.abc import Callable, Sequence
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


def encode_parts(
    encoder: PartEncoder,
    readers: Sequence[Reader],
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[list[Part]]:
    """For each reader, its records converted and encoded, in parts, in order; `workers` processes, this one included.

    Every process takes the next part from one shared counter until none is left, so they finish within a part of
    each other whatever the machine's other load. The forked workers send what they made back once, at the end,
    through a memory file this process maps: nothing here (no executor thread, no result queue) competes with its
    own encoding for the GIL.
    """
    tasks = [
        (r, start, min(start + PART, reader.count))
        for r, reader in enumerate(readers)
        for start in range(0, reader.count, PART)
    ]
    processes = min(workers, len(tasks)) - 1
    if processes > 0 and "fork" not in multiprocessing.get_all_start_methods():
        processes = 0
    if processes > 0:
        log.info("preparing %d records in %d processes", sum(r.count for r in readers), processes + 1)
        results = _encode_forked(encoder, readers, tasks, processes, progress)
    else:
        results, done = [], 0
        for r, start, end in tasks:
            results.append(encoder(readers[r], start, end))
            done += end - start
            if progress:
                progress(done)
    grouped: list[list[Part]] = [[] for _ in readers]
    for (r, _, _), part in zip(tasks, results, strict=True):
        grouped[r].append(part)
    return grouped


Task = tuple[int, int, int]  # (reader index, first record, end)


class _Counters:
    """The next part to take and the records done, shared by this process and the workers it forks."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self.next = context.Value("q", 0)
        self.done = context.Value("q", 0)

    def take(self, count: int) -> int | None:
        with self.next.get_lock():
            index = int(self.next.value)
            if index >= count:
                return None
            self.next.value = index + 1
        return index

    def finished(self, records: int) -> int:
        with self.done.get_lock():
            self.done.value += records
            return int(self.done.value)


def _work(
    encoder: PartEncoder,
    readers: Sequence[Reader],
    tasks: Sequence[Task],
    counters: _Counters,
    progress: Callable[[int], None] | None = None,
) -> dict[int, Part]:
    made: dict[int, Part] = {}
    while (index := counters.take(len(tasks))) is not None:
        r, start, end = tasks[index]
        made[index] = encoder(readers[r], start, end)
        done = counters.finished(end - start)
        if progress:
            progress(done)
    return made


def _worker(out: int, encoder: PartEncoder, readers: Sequence[Reader], tasks: Sequence[Task], c: _Counters) -> None:
    """The body of a forked worker: its parts (or its error) into the file `out`, then os._exit."""
    status = 1
    try:
        try:
            payload: tuple[str, Any] = ("parts", _work(encoder, readers, tasks, c))
        except BaseException as exc:  # everything goes back to the parent, which raises it
            payload = ("error", exc)
        try:
            _send(out, payload)
        except Exception:  # an error that cannot be pickled: its text then
            _send(out, ("error", RuntimeError(f"{type(payload[1]).__name__}: {payload[1]}")))
        status = 0
    finally:
        os._exit(status)


# A worker's result file: a header (the pickle's length and each out-of-band buffer's), the pickle, then the
# buffers (the parts' arrays), each at an aligned offset, so the parent maps them instead of copying them.
HEADER = struct.Struct("<Q")
ALIGN = 64


def _send(out: int, payload: tuple[str, Any]) -> None:
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    header = pickle.dumps((len(body), [view.nbytes for view in views]))
    # From the start, also when an earlier attempt wrote part of a payload that could not be pickled whole (the dup
    # shares its file offset with `out`).
    os.ftruncate(out, 0)
    os.lseek(out, 0, os.SEEK_SET)
    with os.fdopen(os.dup(out), "wb") as sink:
        sink.write(HEADER.pack(len(header)) + header + body)
        for view in views:
            sink.write(b"\0" * (-sink.tell() % ALIGN))
            sink.write(view)


def _receive(source: int) -> tuple[str, Any] | None:
    size = os.fstat(source).st_size
    if size == 0:
        return None
    mapped = mmap.mmap(source, size, access=mmap.ACCESS_COPY)  # private: the arrays are writable, nothing copied
    view = memoryview(mapped)
    (length,) = HEADER.unpack_from(view)
    at = HEADER.size + length
    body_length, sizes = pickle.loads(view[HEADER.size : at])
    body = view[at : at + body_length]
    at += body_length
    buffers = []
    for nbytes in sizes:
        at += -at % ALIGN
        buffers.append(view[at : at + nbytes])
        at += nbytes
    result: tuple[str, Any] = pickle.loads(body, buffers=buffers)
    return result


def _result_file(index: int) -> int:
    """An anonymous file for one worker's result (memory-backed where the system has memfd)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create(f"ftj-prepare-{index}")
    with tempfile.TemporaryFile() as handle:
        return os.dup(handle.fileno())


def _encode_forked(
    encoder: PartEncoder,
    readers: Sequence[Reader],
    tasks: Sequence[Task],
    processes: int,
    progress: Callable[[int], None] | None,
) -> list[Part]:
    counters = _Counters()
    children: dict[int, int] = {}  # pid -> its result file
    made: dict[int, Part] = {}
    # Set while they fork: tokenizers then neither warns about the fork nor runs its thread pool in them, and this
    # process, sharing the CPUs with them, tokenizes on one thread as they do.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Out of the collector's sight while the workers live: its passes would write to every object the processes
    # share, and so copy their memory page by page.
    gc.freeze()
    try:
        for index in range(processes):
            out = _result_file(index)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child's coverage is not collected
                _worker(out, encoder, readers, tasks, counters)
            children[pid] = out
        made.update(_work(encoder, readers, tasks, counters, progress))
        for pid in list(children):
            made.update(_collect(pid, children.pop(pid)))
        if progress:  # the workers' last parts are done now too
            progress(int(counters.done.value))
    finally:
        for pid, out in children.items():  # this process failed first: the workers' results are not needed
            os.close(out)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        gc.unfreeze()
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    return [made[index] for index in range(len(tasks))]


def _collect(pid: int, out: int) -> dict[int, Part]:
    """A worker's parts, once it has ended; its error is raised here."""
    _, status = os.waitpid(pid, 0)
    try:
        received = _receive(out)
    finally:
        os.close(out)
    if received is not None and received[0] == "error":
        raise received[1]
    if received is None or received[0] != "parts":
        code = os.waitstatus_to_exitcode(status)
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        raise RuntimeError(
            f"a data preparation worker (pid {pid}) ended with {how} before sending its parts "
            "(out of memory? the container's memory limit counts every worker)"
        )
    parts: dict[int, Part] = received[1]
    return parts
