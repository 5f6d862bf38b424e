"""Running pieces of data preparation in forked processes and getting their results back.

Only the node's main rank prepares the data while the other ranks wait, so large datasets are spread over the CPUs
the container may use. The children are forked once the data is in memory: they inherit the records, the template,
the encoder and the encoded parts, so nothing is shipped to them, and they start in milliseconds. Fork is safe here
because the children run only Python, numpy, pyarrow's writer and the Rust tokenizer's model (single-threaded:
tokenizers turns its thread pool off in a forked child) — never torch, CUDA or a lock another thread of the parent
could hold — and they end with os._exit, so none of the parent's exit handlers run in them. A child writes each
result, as soon as it is made, into a memory file that this process maps once the child has closed a pipe to say
all is there (its exit, slow for a forked copy of a big process, is not waited for): nothing here (no executor
thread, no result queue) competes with this process's own share of the work for the GIL.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import mmap
import multiprocessing
import os
import pickle
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from typing import Any


def usable(processes: int, count: int) -> int:
    """How many processes `shared` runs for `count` items when asked for `processes`: no more than items, and one
    where fork does not exist."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(processes, count))


class _Count:
    """A counter of this process alone, with the interface of a shared one."""

    def __init__(self) -> None:
        self.value = 0

    def get_lock(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


class _Counters:
    """The next item to take and the total size of the items done, shared by this process and its children (when
    `across` processes; else this process's own)."""

    def __init__(self, across: bool) -> None:
        if across:
            context = multiprocessing.get_context("fork")
            self.next: Any = context.Value("q", 0)
            self.done: Any = context.Value("q", 0)
        else:
            self.next, self.done = _Count(), _Count()

    def take(self, count: int) -> int | None:
        with self.next.get_lock():
            index = int(self.next.value)
            if index >= count:
                return None
            self.next.value = index + 1
        return index

    def finished(self, size: int) -> int:
        with self.done.get_lock():
            self.done.value += size
            return int(self.done.value)


def shared(
    count: int,
    work: Callable[[int], Any],
    processes: int,
    *,
    size: Callable[[int, Any], int] = lambda index, result: 1,
    progress: Callable[[int], None] | None = None,
    what: str = "data preparation worker",
) -> list[Any]:
    """`work(i)` for every i in range(count), in `processes` processes (this one and forked children); the results
    in index order.

    Every process takes the next index from one shared counter until none is left, so they finish within an item
    of each other whatever the machine's other load. A child sends each result as soon as it is made, so nothing is
    left to send at the end. `progress(done)` is called in this process after each item it finishes, and once at
    the end, with the total `size(i, result)` of the items all processes have finished. A child's exception is
    raised here (its text when it cannot be pickled), as is a child that died before it finished (`what` names it in
    the message); when this process fails first, the children are killed and reaped.

    A child's results are taken as soon as it says it has sent them all, not when it has exited: a forked copy of a
    large process takes milliseconds to tear down. The children are reaped before this returns, or, inside
    `reaping_later()`, when that block ends.
    """
    processes = usable(processes, count)
    counters = _Counters(across=processes > 1)

    def take_all(send: Callable[[int, Any], None], report: Callable[[int], None] | None) -> None:
        while (index := counters.take(count)) is not None:
            result = work(index)
            send(index, result)
            done = counters.finished(size(index, result))
            if report:
                report(done)

    results: list[Any] = [None] * count
    children: dict[int, tuple[int, int]] = {}  # pid -> (its result file, the end of its pipe this process reads)
    # Set while they fork: tokenizers then neither warns about the fork nor runs its thread pool in them, and this
    # process, sharing the CPUs with them, tokenizes on one thread as they do.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    if processes > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Out of the collector's sight meanwhile: its passes over the records and everything else already made would
    # free nothing, and with children they would write to every object the processes share, and so copy their
    # memory page by page.
    gc.freeze()
    try:
        for child in range(1, processes):
            out = _result_file(child)
            done_read, done_write = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child's coverage is not collected
                os.close(done_read)
                _child(out, done_write, take_all)
            # Closed here before the next child is forked, so that only this child holds it: the pipe reads as
            # ended once this child closes it (or dies).
            os.close(done_write)
            children[pid] = (out, done_read)
        take_all(results.__setitem__, progress)
        for pid in list(children):
            for index, result in _collect(pid, *children.pop(pid), what):
                results[index] = result
        if progress:  # the children's last items are done now too
            progress(int(counters.done.value))
    finally:
        for pid, files in children.items():  # this process failed first: the children's results are not needed
            for file in files:
                os.close(file)
            _kill(pid)
        gc.unfreeze()
        if not _later:
            reap()
        if processes > 1:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
    return results


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where the C library is glibc."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system: call it before `shared` forks workers.

    A fork copies the page table entries of every page this process has and marks each read-only, so that this
    process's next write to it faults; a child's exit then drops them again. Memory freed earlier in this process's
    life (a big list of texts, a tokenizer's batch output) stays mapped in the heap and costs all of that for nothing:
    in a process that had freed ~450 MB, the two forks of a two-process preparation of 20k records took 31-35 ms
    instead of 11-12, and the whole preparation ~40 ms longer, until its heap was trimmed. Trimming a heap with
    little free memory takes a few milliseconds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# Children whose results are in and that are left to reap (by `reap`), and whether `reaping_later` is in force.
_exiting: list[int] = []
_later = False


@contextlib.contextmanager
def reaping_later() -> Iterator[None]:
    """Within this block, `shared` leaves the children whose results are in to exit in their own time, and this
    block's end reaps them: their exits overlap with the work that follows instead of being waited for."""
    global _later
    outer = _later
    _later = True
    try:
        yield
    finally:
        _later = outer
        if not outer:
            reap()


def reap() -> None:
    """Wait for the children that have sent their results and are exiting."""
    while _exiting:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(_exiting.pop(), 0)


def _child(out: int, done: int, take_all: Callable[[Callable[[int, Any], None], None], None]) -> None:
    """The body of a forked child: each result into the file `out` as it is made, then "end" (or its error); then
    the pipe `done` closed, which tells the parent that all is there, and os._exit."""
    status = 1
    try:
        with os.fdopen(out, "wb") as sink:
            try:
                take_all(lambda index, result: _frame(sink, ("item", (index, result))), None)
                _frame(sink, ("end", None))
            except BaseException as exc:  # everything goes back to the parent, which raises it
                try:
                    _frame(sink, ("error", exc))
                except Exception:  # an error that cannot be pickled: its text then
                    _frame(sink, ("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        os.close(done)
        status = 0
    finally:
        os._exit(status)


# A child's result file: frames, each a header (the pickle's length and each out-of-band buffer's), the pickle,
# then the buffers (numpy arrays), each at an aligned offset, so the parent maps them instead of copying them.
HEADER = struct.Struct("<Q")
ALIGN = 64


def _frame(sink: Any, payload: tuple[str, Any]) -> None:
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    header = pickle.dumps((len(body), [view.nbytes for view in views]))
    sink.write(HEADER.pack(len(header)) + header + body)
    for view in views:
        sink.write(b"\0" * (-sink.tell() % ALIGN))
        sink.write(view)
    sink.write(b"\0" * (-sink.tell() % ALIGN))


def _frames(source: int) -> list[tuple[str, Any]]:
    """The whole frames in the file (one cut short, by a child that died writing it, is left out)."""
    size = os.fstat(source).st_size
    if size == 0:
        return []
    mapped = mmap.mmap(source, size, access=mmap.ACCESS_COPY)  # private: the arrays are writable, nothing copied
    view = memoryview(mapped)
    frames = []
    at = 0
    while at + HEADER.size <= size:
        (length,) = HEADER.unpack_from(view, at)
        at += HEADER.size
        if at + length > size:
            break
        body_length, sizes = pickle.loads(view[at : at + length])
        at += length
        body = view[at : at + body_length]
        at += body_length
        buffers = []
        for nbytes in sizes:
            at += -at % ALIGN
            buffers.append(view[at : at + nbytes])
            at += nbytes
        at += -at % ALIGN
        if at > size:
            break
        frames.append(pickle.loads(body, buffers=buffers))
    return frames


def _result_file(index: int) -> int:
    """An anonymous file for one child's results (memory-backed where the system has memfd)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create(f"ftj-prepare-{index}")
    with tempfile.TemporaryFile() as handle:
        return os.dup(handle.fileno())


def _kill(pid: int) -> None:
    """Kill a child and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _collect(pid: int, out: int, done: int, what: str) -> list[tuple[int, Any]]:
    """A child's results, once it has sent them all (it closed the pipe `done`) or died; its error is raised here.
    A child that finished is left to exit and be reaped (`reap`), one that did not is waited for here."""
    try:
        while os.read(done, 1):  # nothing is written to it: it reads as ended once the child has closed it
            pass
        frames = _frames(out)
    except BaseException:  # interrupted here: the child is not left behind
        _kill(pid)
        raise
    finally:
        os.close(out)
        os.close(done)
    if frames and frames[-1][0] in ("end", "error"):
        _exiting.append(pid)
        if frames[-1][0] == "error":
            raise frames[-1][1]
    else:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        raise RuntimeError(
            f"a {what} (pid {pid}) ended with {how} before it finished "
            "(out of memory? the container's memory limit counts every process)"
        )
    return [item for kind, item in frames[:-1]]
