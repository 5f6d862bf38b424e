"""Checkpoint files written off the training thread: the state is copied into host memory while the step waits,
and serialized to disk in the background while training goes on.

A save blocks training for as long as it takes to write its files; for a full fine-tune that is the model's
weights and twice as much AdamW state, gigabytes through the page cache. Copying the same tensors into buffers
that are allocated once and reused from save to save takes a fraction of that (and, on a GPU, is the device-to-host
copy the write would make anyway, into pinned memory). The copy is the snapshot: the next optimizer step changes
the live tensors, never the staged ones. Before a save stages anything, the previous save's files must be written
(its buffers are reused), so at most one checkpoint's state is held beside the live one.

Where the Trainer gives a target in storage (the optimizer state and a full fine-tune's weights, the large files of
its checkpoint), the background thread serializes the staged state straight into the store (`save_staged`,
`save_weights_staged`) instead of local files that the uploader would read back: the bytes pass once through a few
reused part buffers rather than twice through gigabytes of fresh page cache.

The buffers can be reserved ahead (`reserve`, which the Trainer calls after its first step): allocated, and their
pages faulted in, by a background thread while training goes on. Otherwise the first save pays for that while the
step waits: on the development VM 4 GiB of fresh host memory for a 0.5B-parameter full fine-tune took 8 s to fault
in, longer than a training step, where copying into the same buffers at the next save took 0.4 s.

Staging is skipped (the Trainer writes synchronously, as before) when the buffers it would newly allocate exceed
half of the memory this process may still take: MemAvailable, and the cgroup's memory.max less memory.current in a
container with a limit. A Pod must never be OOM-killed for a faster save.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import functools
import logging
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch.utils.serialization import config as serialization_config

from finetune_trainer.errors import CheckpointWriteError
from finetune_trainer.merge.shards import plan_shards, tensor_entries, write_safetensors
from finetune_trainer.storage import Storage, StorageError

log = logging.getLogger(__name__)

_CGROUP = Path("/sys/fs/cgroup")


def available_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = _CGROUP) -> int | None:
    """Bytes this process can still allocate without the kernel or its cgroup reclaiming from it: the smaller of
    MemAvailable and (cgroup v2) memory.max - memory.current; None where neither can be read."""
    figures: list[int] = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                figures.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            figures.append(max(0, int(limit) - int((cgroup / "memory.current").read_text().strip())))
    except (OSError, ValueError):
        pass
    return min(figures) if figures else None


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault a range in, writable, in one call (the kernel zeroes the pages)
_populate_by_madvise = sys.platform.startswith("linux")  # turned off the first time the kernel says it cannot


@functools.cache
def _madvise() -> Any:
    """libc's madvise, loaded once (errno kept for the caller)."""
    return ctypes.CDLL(None, use_errno=True).madvise


def fault_in(buffer: torch.Tensor) -> None:
    """Make every page of a freshly allocated host buffer resident, so that the first copy into it does not fault
    them in one by one. The contents are not defined before or after (the buffer is about to be overwritten)."""
    global _populate_by_madvise
    start, size = buffer.untyped_storage().data_ptr(), buffer.untyped_storage().nbytes()
    if not size:
        return
    if _populate_by_madvise:
        page = mmap.PAGESIZE
        first = start - start % page
        # A foreign call without the GIL: training goes on in the other threads.
        if _madvise()(ctypes.c_void_p(first), ctypes.c_size_t(start + size - first), _MADV_POPULATE_WRITE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(code, f"madvise(MADV_POPULATE_WRITE): {errno.errorcode.get(code, code)}")
        log.debug("the kernel cannot populate memory by madvise (%s); writing a byte per page instead", code)
        _populate_by_madvise = False
    every_byte = torch.empty(0, dtype=torch.uint8).set_(buffer.untyped_storage())
    every_byte[:: mmap.PAGESIZE].zero_()
    every_byte[-1:].zero_()  # the last page, where the buffer does not start on a page boundary


Entries = list[dict[str, Any]]  # the node record's entries of files a write put straight into storage
Target = tuple[Storage, str]  # (storage, URI) of a file that goes straight into storage


def store_or_write(serialize: Callable[[str | IO[bytes]], None], path: str, target: Target | None) -> Entries:
    """Run `serialize` (which writes one file into the path or binary stream it is given) straight into storage at
    `target` where there is one, with no local file, returning the record's entry for it (path: the file's name in
    the checkpoint directory, size, sha256); without a target, or where the store fails, into the local file
    `path`, which the uploader then sends with the checkpoint's other files ([]). Whatever `serialize` reads (the
    staged buffers) stays as it is until this returns, so a failed stream loses nothing."""
    if target is not None:
        storage, uri = target
        writer = storage.open_writer(uri)
        try:
            serialize(cast(IO[bytes], writer))  # it only writes and flushes
            return [{"path": os.path.basename(path), **writer.commit()}]
        except StorageError as exc:
            writer.abort()
            log.warning("%s; writing %s to the local disk for the upload instead", exc, os.path.basename(path))
        except BaseException:
            writer.abort()
            raise
    serialize(path)
    return []


def save_staged(obj: Any, path: str, target: Target | None) -> Entries:
    """torch.save staged state (a write `defer`red by the Trainer) into storage or the local file: see
    `store_or_write`."""
    return store_or_write(functools.partial(torch.save, obj), path, target)


def save_weights_staged(
    tensors: Mapping[str, torch.Tensor], directory: str, target: Callable[[str], Target] | None, max_shard_bytes: int
) -> Entries:
    """Write a model's weights (`tensors`, staged, named as in its saved files) as transformers' save_pretrained
    lays them out (`model.safetensors`, or shards of at most `max_shard_bytes` and their index), each shard straight
    into storage at `target(file name)` where there is one (see `store_or_write`). The index, a few kilobytes, is
    written into `directory` for the uploader."""
    entries = tensor_entries(tensors)
    if entries is None:
        raise CheckpointWriteError("a tensor of the model has a dtype safetensors cannot hold")
    plan = plan_shards(entries, max_shard_bytes)
    plan.write_index(Path(directory))
    stored: Entries = []
    for name, shard in zip(plan.files, plan.shards, strict=True):
        serialize = functools.partial(write_safetensors, entries=shard, tensors=tensors)
        stored += store_or_write(serialize, os.path.join(directory, name), target(name) if target else None)
    return stored


class PendingWrites:
    """The files of one checkpoint being written in the background; `wait()` returns once they are all written
    and raises the first failure, naming the file. A write returns the record entries of the files it put
    straight into storage (`stored`), or None where it wrote local files only."""

    def __init__(self, writes: list[tuple[str, Callable[[], Entries | None]]]) -> None:
        self.paths = [path for path, _ in writes]
        self.stored: Entries = []
        self._writes = writes
        self._error: BaseException | None = None
        # torch.save's settings are thread-local: the writes follow those of the thread that staged them (the
        # recipe turns the zip CRC32s off there).
        self._compute_crc32 = bool(serialization_config.save.compute_crc32)
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="checkpoint-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        torch.serialization.set_crc32_options(self._compute_crc32)
        for path, write in self._writes:
            try:
                entry = write()
            except BaseException as exc:  # kept for wait(); nothing after a failed file is written
                self._error = CheckpointWriteError(f"cannot write checkpoint file {path}: {exc}")
                self._error.__cause__ = exc
                log.error("%s", self._error)
                return
            self.stored += entry or []
        log.debug("wrote %d staged checkpoint file(s) in %.1fs", len(self._writes), time.monotonic() - self.started)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds for the writes to end; whether they have."""
        self._thread.join(max(0.0, timeout))
        return self.done()

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class StagedWrites:
    """Copies checkpoint state into reusable host buffers (`stage`), collects the writes that serialize it
    (`defer`), and starts them in the background (`flush`). One instance per training process."""

    def __init__(
        self,
        *,
        memory_fraction: float = 0.5,
        available: Callable[[], int | None] = available_memory,
    ) -> None:
        self.memory_fraction = memory_fraction
        self.available = available
        self.staged_saves = 0  # checkpoints whose state went through the buffers (for logs and tests)
        self.buffer_bytes = 0
        self.reserved_bytes = 0  # of them allocated ahead by reserve()
        self.allocated_in_save = 0  # of them allocated by stage() itself, while a step waited
        self._buffers: dict[tuple[str, ...], torch.Tensor] = {}
        self._reservation: _Reservation | None = None
        self._deferred: list[tuple[str, Callable[[], Entries | None]]] = []
        self._pending: PendingWrites | None = None
        self._declined = False  # said why checkpoints are written synchronously
        self._failed = False  # a buffer could not be allocated: no more staging in this process

    # -- one save ------------------------------------------------------------------------------------------------

    def reserve(self, states: dict[str, Any]) -> None:
        """Start allocating, in one background thread, the buffers that later `stage(name, obj)` calls copy into
        (for each name and obj of `states`), and fault their pages in (see the module docstring). Only the tensors'
        shapes are read here; the values are copied by `stage()`. Nothing is reserved where the buffers would not
        fit (the same rule as `stage()`)."""
        self._take_reservation()
        if self._failed:
            return
        needed = [
            (key, tensor)
            for name, obj in states.items()
            for key, tensor in _layout(obj, name)[1].values()
            if not self._fits(key, tensor)
        ]
        if needed and self._room_for(sum(tensor.nbytes for _, tensor in needed)):
            self._reservation = _Reservation(needed)

    def ready(self, patience: float | None = None) -> bool:
        """Wait until the previous checkpoint's files are written (its buffers are about to be reused) and a
        reservation is done; raise the write's failure. With `patience` (seconds): return False instead of
        waiting past the moment those writes have run that long (a store that stopped answering holds a stream
        until the client's timeouts): they go on, the buffers stay theirs, and the caller saves without staging."""
        self._take_reservation()
        pending = self._pending
        if pending is None:
            return True
        if patience is not None and not pending.join(pending.started + patience - time.monotonic()):
            return False
        self._pending = None
        pending.wait()
        return True

    def stage(self, name: str, obj: Any) -> Any | None:
        """A copy of `obj` (nested dicts, lists and tuples of tensors and plain values) whose tensors live in this
        instance's buffers, or None when the buffers it would newly need do not fit (see the module docstring):
        the caller then saves `obj` itself. Tensors that are the same view of the same storage (tied weights) stay
        one tensor. Call `ready()` first."""
        assert self._pending is None, "ready() before staging: the previous checkpoint may still be writing"
        self._take_reservation()
        if self._failed:
            return None
        views, unique = _layout(obj, name)
        needed = sum(t.nbytes for key, t in unique.values() if not self._fits(key, t))
        if needed and not self._room_for(needed):
            return None
        started = time.monotonic()
        staged: dict[tuple[Any, ...], torch.Tensor] = {}
        cuda = False
        for view, (key, tensor) in unique.items():
            if not self._fits(key, tensor):
                try:
                    self._keep(key, _host_buffer(tensor.size(), tensor.stride(), tensor.dtype, tensor.is_cuda))
                except RuntimeError as exc:  # pinned memory can run out before MemAvailable does: stop staging
                    self._stop_staging(f"allocating {tensor.nbytes / 2**20:.0f} MiB of host memory failed: {exc}")
                    return None
                self.allocated_in_save += tensor.nbytes
            buffer = self._buffers[key]
            buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
            cuda = cuda or tensor.is_cuda
            staged[view] = buffer
        if cuda:
            torch.cuda.synchronize()
        log.debug("staged %s: %d tensor(s) in %.2fs", name, len(staged), time.monotonic() - started)
        return _rebuild(obj, (name,), {key: staged[view] for key, view in views.items()})

    def defer(self, path: str, write: Callable[[], Entries | None]) -> None:
        """Run `write` (which writes `path` from staged state, or stores it: see PendingWrites) in the background at
        the next `flush()`."""
        self._deferred.append((path, write))

    def discard(self) -> None:
        """Forget the writes deferred so far (the save they belong to failed)."""
        self._deferred = []

    def flush(self) -> PendingWrites | None:
        """Start this checkpoint's deferred writes in the background; None when nothing was deferred."""
        writes, self._deferred = self._deferred, []
        if not writes:
            return None
        self.staged_saves += 1
        self._pending = PendingWrites(writes)
        return self._pending

    def busy_since(self) -> float | None:
        """When (time.monotonic()) the background work in progress began, reserving buffers or writing a
        checkpoint's files (the older of the two); None when there is none."""
        reservation, pending = self._reservation, self._pending
        started = []
        if reservation is not None and reservation.thread.is_alive():
            started.append(reservation.started)
        if pending is not None and not pending.done():
            started.append(pending.started)
        return min(started, default=None)

    # -- memory ----------------------------------------------------------------------------------------------------

    def _fits(self, key: tuple[str, ...], tensor: torch.Tensor) -> bool:
        buffer = self._buffers.get(key)
        return (
            buffer is not None
            and buffer.size() == tensor.size()
            and buffer.stride() == tensor.stride()
            and buffer.dtype == tensor.dtype
        )

    def _keep(self, key: tuple[str, ...], buffer: torch.Tensor) -> None:
        previous = self._buffers.get(key)
        if previous is not None:
            self.buffer_bytes -= previous.nbytes
        self._buffers[key] = buffer
        self.buffer_bytes += buffer.nbytes

    def _stop_staging(self, reason: str) -> None:
        self._buffers.clear()
        self.buffer_bytes = 0
        self._failed = True
        self._decline(reason)

    def _take_reservation(self) -> None:
        """Wait for the reservation in flight, if any, and keep its buffers."""
        reservation, self._reservation = self._reservation, None
        if reservation is None:
            return
        reservation.thread.join()
        if reservation.error is not None:  # as a failed allocation in stage(): no more staging in this process
            self._stop_staging(f"reserving host memory for checkpoints failed: {reservation.error}")
            return
        for key, buffer in reservation.buffers.items():
            self._keep(key, buffer)
            self.reserved_bytes += buffer.nbytes
        log.debug("reserved %.0f MiB for checkpoint state in %.2fs", reservation.nbytes / 2**20, reservation.seconds)

    def _room_for(self, needed: int) -> bool:
        available = self.available()
        if available is not None and needed <= self.memory_fraction * available:
            return True
        self._decline(
            f"staging them needs {needed / 2**20:.0f} MiB of host memory beside {self.buffer_bytes / 2**20:.0f} MiB "
            f"already staged, more than {self.memory_fraction * 100:.0f}% of the "
            + ("unknown amount" if available is None else f"{available / 2**20:.0f} MiB")
            + " this process may still use"
        )
        return False

    def _decline(self, reason: str) -> None:
        if not self._declined:  # once: every later save would say the same
            log.warning("checkpoints are written synchronously: %s", reason)
            self._declined = True


class _Reservation:
    """Allocates and faults in host buffers for the given tensors' shapes in a background thread."""

    def __init__(self, tensors: list[tuple[tuple[str, ...], torch.Tensor]]) -> None:
        # Shapes only: the tensors themselves are not read in the background (the next step changes them).
        self._specs = [(key, tensor.size(), tensor.stride(), tensor.dtype, tensor.is_cuda) for key, tensor in tensors]
        self.nbytes = sum(tensor.nbytes for _, tensor in tensors)
        self.buffers: dict[tuple[str, ...], torch.Tensor] = {}
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="checkpoint-reserve", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for key, size, stride, dtype, cuda in self._specs:
                buffer = _host_buffer(size, stride, dtype, cuda)
                if not cuda:  # pinned memory is resident once allocated
                    fault_in(buffer)
                self.buffers[key] = buffer
        except (RuntimeError, OSError) as exc:
            self.buffers.clear()
            self.error = exc
        self.seconds = time.monotonic() - self.started


def _host_buffer(size: torch.Size, stride: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """An uninitialized host tensor of that layout; pinned for a copy from a GPU."""
    return torch.empty_strided(size, stride, dtype=dtype, device="cpu", pin_memory=pinned)


def _layout(
    obj: Any, name: str
) -> tuple[dict[tuple[str, ...], tuple[Any, ...]], dict[tuple[Any, ...], tuple[tuple[str, ...], torch.Tensor]]]:
    """The view of each tensor in `obj` by key, and the tensors by view (tied weights once), each with the key of
    its first occurrence."""
    tensors: dict[tuple[str, ...], torch.Tensor] = {}
    _collect(obj, (name,), tensors)
    views = {key: _view_key(tensor) for key, tensor in tensors.items()}
    unique: dict[tuple[Any, ...], tuple[tuple[str, ...], torch.Tensor]] = {}
    for key, tensor in tensors.items():
        unique.setdefault(views[key], (key, tensor))
    return views, unique


def _collect(obj: Any, key: tuple[str, ...], out: dict[tuple[str, ...], torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[key] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _collect(v, (*key, repr(k)), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _collect(v, (*key, str(i)), out)


def _rebuild(obj: Any, key: tuple[str, ...], staged: dict[tuple[str, ...], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return staged[key]
    if isinstance(obj, dict):  # a copy keeps the mapping's type and attributes (a state dict's _metadata)
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = _rebuild(v, (*key, repr(k)), staged)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_rebuild(v, (*key, str(i)), staged) for i, v in enumerate(obj)))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rebuild(v, (*key, str(i)), staged) for i, v in enumerate(obj))
    return obj  # numbers, strings, None: not changed by training in place


def _view_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.size()),
        tuple(tensor.stride()),
        tensor.dtype,
    )
