"""A work queue of object keys with the guarantees a level-triggered controller needs (as client-go's workqueue).

A key added while it waits is queued once; a key added while it is being processed runs again right after, never
twice at the same time; `add(key, delay)` queues it later. Worker threads take keys and call one function.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
log = logging.getLogger(__name__)


class WorkQueue(Generic[K]):
    """Keys in, one `process(key)` at a time per key out. `process` returns seconds to look again, or None."""

    def __init__(self, process: Callable[[K], float | None], workers: int = 4, name: str = "reconcile") -> None:
        self._process = process
        self._workers = workers
        self._name = name
        self._cond = threading.Condition()
        self._ready: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._later: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._stopped = False
        self._threads: list[threading.Thread] = []

    def add(self, key: K, delay: float = 0.0) -> None:
        with self._cond:
            if self._stopped:
                return
            if delay > 0:
                heapq.heappush(self._later, (time.monotonic() + delay, next(self._seq), key))
            elif key not in self._dirty:
                self._dirty.add(key)
                if key not in self._processing:
                    self._ready.append(key)
            self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._ready)

    def _take(self) -> K | None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    _, _, key = heapq.heappop(self._later)
                    if key not in self._dirty:
                        self._dirty.add(key)
                        if key not in self._processing:
                            self._ready.append(key)
                if self._ready:
                    key = self._ready.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                timeout = self._later[0][0] - now if self._later else None
                self._cond.wait(timeout)
            return None

    def _done(self, key: K) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:  # added again while it ran: run it once more
                self._ready.append(key)
                self._cond.notify()

    def _work(self) -> None:
        while (key := self._take()) is not None:
            try:
                again = self._process(key)
            except Exception:  # the process function reports its own errors; a worker never dies
                log.exception("%s %s failed", self._name, key)
                again = None
            finally:
                self._done(key)
            if again is not None:
                self.add(key, again)

    def start(self) -> None:
        for i in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
