"""Start server processes for tests and guarantee they all stop: process groups, atexit, parent-death signal.

Each process runs in its own session (process group) with output in a log file. :meth:`ManagedProcess.stop`
terminates the whole group, an ``atexit`` hook stops whatever is still registered, and on Linux the child gets
``PR_SET_PDEATHSIG`` so that even a killed pytest leaves no server behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_live: set[ManagedProcess] = set()
_live_lock = threading.Lock()


class ProcessExitedError(RuntimeError):
    """A managed process died while we were waiting for it; the message carries its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel picks it; nothing is fixed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, max_bytes: int = 20_000) -> str:
    """The last ``max_bytes`` of a log file, decoded leniently ('' when it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return text if size <= max_bytes else f"[... {size - max_bytes} bytes elided ...]\n{text}"


def _die_with_parent() -> None:
    # Runs in the child between fork and exec; PR_SET_PDEATHSIG = 1.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


class ManagedProcess:
    """One server process in its own process group, logging to ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.log_path = log_path
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        with _live_lock:
            _live.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self._popen is not None, f"{self.name} was never started"
        return self._popen.pid

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def check_alive(self) -> None:
        """Raise ProcessExitedError with the log tail if the process is gone."""
        if self._popen is not None and self._popen.poll() is not None:
            raise ProcessExitedError(
                f"{self.name} exited with code {self._popen.returncode}; log {self.log_path}:\n"
                f"{log_tail(self.log_path, 6000)}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` seconds; safe to call twice."""
        popen = self._popen
        if popen is None:
            return
        with _live_lock:
            _live.discard(self)
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout)
        # The leader may be gone while children of its group linger; always sweep the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(5)

    def __enter__(self) -> ManagedProcess:
        return self if self._popen is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all() -> None:
    """Stop every process still registered (newest first); also runs at interpreter exit."""
    with _live_lock:
        procs = sorted(_live, key=lambda p: p.pid, reverse=True)
    for proc in procs:
        proc.stop(timeout=5)


atexit.register(stop_all)


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    watch: Sequence[ManagedProcess] = (),
) -> T:
    """Poll ``probe`` until it returns something truthy and return that; fail with ``what`` after ``timeout``.

    Exceptions from ``probe`` count as "not yet"; the last one is reported on timeout. Processes in ``watch`` are
    checked on every round so a crashed server fails fast with its log instead of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        for proc in watch:
            proc.check_alive()
        try:
            result = probe()
        except Exception as exc:
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            detail = f"; last error: {last_error!r}" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)
