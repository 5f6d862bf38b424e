"""Checkpoint files written off the training thread: the state is copied into host memory while the step waits,
and serialized to disk in the background while training goes on.

A save blocks training for as long as it takes to write its files; for a full fine-tune that is the model's
weights and twice as much AdamW state, gigabytes through the page cache. Copying the same tensors into buffers
that are allocated once and reused from save to save takes a fraction of that (and, on a GPU, is the device-to-host
copy the write would make anyway, into pinned memory). The copy is the snapshot: the next optimizer step changes
the live tensors, never the staged ones. Before a save stages anything, the previous save's files must be written
(its buffers are reused), so at most one checkpoint's state is held beside the live one.

Staging is skipped (the Trainer writes synchronously, as before) when the buffers it would newly allocate exceed
half of the memory this process may still take: MemAvailable, and the cgroup's memory.max less memory.current in a
container with a limit. A Pod must never be OOM-killed for a faster save.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.serialization import config as serialization_config

from finetune_trainer.errors import CheckpointWriteError

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


class PendingWrites:
    """The files of one checkpoint being written in the background; `wait()` returns once they are all on disk
    and raises the first failure, naming the file."""

    def __init__(self, writes: list[tuple[str, Callable[[], None]]]) -> None:
        self.paths = [path for path, _ in writes]
        self._writes = writes
        self._error: BaseException | None = None
        # torch.save's settings are thread-local: the writes follow those of the thread that staged them (the
        # recipe turns the zip CRC32s off there).
        self._compute_crc32 = bool(serialization_config.save.compute_crc32)
        self._thread = threading.Thread(target=self._run, name="checkpoint-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        torch.serialization.set_crc32_options(self._compute_crc32)
        for path, write in self._writes:
            try:
                write()
            except BaseException as exc:  # kept for wait(); nothing after a failed file is written
                self._error = CheckpointWriteError(f"cannot write checkpoint file {path}: {exc}")
                self._error.__cause__ = exc
                log.error("%s", self._error)
                return
        log.debug("wrote %d staged checkpoint file(s) in %.1fs", len(self._writes), time.monotonic() - started)

    def done(self) -> bool:
        return not self._thread.is_alive()

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
        self._buffers: dict[tuple[str, ...], torch.Tensor] = {}
        self._deferred: list[tuple[str, Callable[[], None]]] = []
        self._pending: PendingWrites | None = None
        self._declined = False  # said why checkpoints are written synchronously
        self._failed = False  # a buffer could not be allocated: no more staging in this process

    # -- one save ------------------------------------------------------------------------------------------------

    def ready(self) -> None:
        """Wait until the previous checkpoint's files are written (its buffers are about to be reused); raise its
        failure."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()

    def stage(self, name: str, obj: Any) -> Any | None:
        """A copy of `obj` (nested dicts, lists and tuples of tensors and plain values) whose tensors live in this
        instance's buffers, or None when the buffers it would newly need do not fit (see the module docstring):
        the caller then saves `obj` itself. Tensors that are the same view of the same storage (tied weights) stay
        one tensor. Call `ready()` first."""
        assert self._pending is None, "ready() before staging: the previous checkpoint may still be writing"
        if self._failed:
            return None
        tensors: dict[tuple[str, ...], torch.Tensor] = {}
        _collect(obj, (name,), tensors)
        views = {key: _view_key(tensor) for key, tensor in tensors.items()}
        unique: dict[tuple[Any, ...], tuple[tuple[str, ...], torch.Tensor]] = {}  # view -> (first key, tensor)
        for key, tensor in tensors.items():
            unique.setdefault(views[key], (key, tensor))
        needed = sum(t.nbytes for key, t in unique.values() if not _fits(self._buffers.get(key), t))
        if needed and not self._room_for(needed):
            return None
        started = time.monotonic()
        staged: dict[tuple[Any, ...], torch.Tensor] = {}
        cuda = False
        for view, (key, tensor) in unique.items():
            buffer = self._buffers.get(key)
            if buffer is None or not _fits(buffer, tensor):
                if buffer is not None:
                    self.buffer_bytes -= buffer.nbytes
                try:
                    buffer = torch.empty_strided(
                        tensor.size(), tensor.stride(), dtype=tensor.dtype, device="cpu", pin_memory=tensor.is_cuda
                    )
                except RuntimeError as exc:  # pinned memory can run out before MemAvailable does: stop staging
                    self._buffers.clear()
                    self.buffer_bytes = 0
                    self._failed = True
                    self._decline(f"allocating {tensor.nbytes / 2**20:.0f} MiB of host memory failed: {exc}")
                    return None
                self._buffers[key] = buffer
                self.buffer_bytes += buffer.nbytes
            buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
            cuda = cuda or tensor.is_cuda
            staged[view] = buffer
        if cuda:
            torch.cuda.synchronize()
        log.debug("staged %s: %d tensor(s) in %.2fs", name, len(staged), time.monotonic() - started)
        return _rebuild(obj, (name,), {key: staged[view] for key, view in views.items()})

    def defer(self, path: str, write: Callable[[], None]) -> None:
        """Run `write` (which writes `path` from staged state) in the background at the next `flush()`."""
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

    # -- memory ----------------------------------------------------------------------------------------------------

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


def _fits(buffer: torch.Tensor | None, tensor: torch.Tensor) -> bool:
    return (
        buffer is not None
        and buffer.size() == tensor.size()
        and buffer.stride() == tensor.stride()
        and buffer.dtype == tensor.dtype
    )
