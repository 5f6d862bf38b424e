"""The reconcile work queue: one key is never processed twice at once, a key added while it runs runs again once,
keys queued several times while waiting run once, and delayed keys come back after their delay."""

from __future__ import annotations

import threading
import time
from collections import Counter

from finetune_operator.workqueue import WorkQueue


def _wait(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_key_is_never_processed_twice_at_once_and_reruns_after_a_change() -> None:
    running: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    overlap: list[str] = []
    release = threading.Event()
    lock = threading.Lock()

    def process(key: str) -> float | None:
        with lock:
            running[key] += 1
            calls[key] += 1
            if running[key] > 1:
                overlap.append(key)
        if calls[key] == 1:
            release.wait(5)
        with lock:
            running[key] -= 1
        return None

    queue: WorkQueue[str] = WorkQueue(process, workers=4)
    queue.start()
    try:
        queue.add("a")
        _wait(lambda: calls["a"] == 1)
        for _ in range(5):  # five events while the first reconcile runs: one more reconcile, not five
            queue.add("a")
        time.sleep(0.1)
        assert calls["a"] == 1  # the other workers did not start a second one beside it
        release.set()
        _wait(lambda: calls["a"] == 2)
        time.sleep(0.1)
        assert calls["a"] == 2
        assert overlap == []
    finally:
        queue.stop()


def test_keys_queued_while_waiting_run_once_and_different_keys_run_in_parallel() -> None:
    gate = threading.Event()
    calls: Counter[str] = Counter()
    started = threading.Semaphore(0)

    def process(key: str) -> float | None:
        calls[key] += 1
        started.release()
        gate.wait(5)
        return None

    queue: WorkQueue[str] = WorkQueue(process, workers=2)
    queue.start()
    try:
        queue.add("a")
        queue.add("b")
        assert started.acquire(timeout=5)
        assert started.acquire(timeout=5)  # both at once: two workers, two keys
        for _ in range(3):
            queue.add("c")
        assert len(queue) == 1
        gate.set()
        _wait(lambda: calls["c"] == 1)
        time.sleep(0.1)
        assert calls == Counter({"a": 1, "b": 1, "c": 1})
    finally:
        queue.stop()


def test_a_returned_delay_requeues_the_key_after_it() -> None:
    times: list[float] = []

    def process(key: str) -> float | None:
        times.append(time.monotonic())
        return 0.3 if len(times) == 1 else None

    queue: WorkQueue[str] = WorkQueue(process, workers=1)
    queue.start()
    try:
        queue.add("a")
        _wait(lambda: len(times) == 2)
        assert times[1] - times[0] >= 0.3
    finally:
        queue.stop()


def test_a_failing_process_does_not_kill_the_worker() -> None:
    calls: list[str] = []

    def process(key: str) -> float | None:
        calls.append(key)
        if key == "bad":
            raise RuntimeError("boom")
        return None

    queue: WorkQueue[str] = WorkQueue(process, workers=1)
    queue.start()
    try:
        queue.add("bad")
        queue.add("good")
        _wait(lambda: calls == ["bad", "good"])
    finally:
        queue.stop()
