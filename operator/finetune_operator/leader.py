"""Leader election on a coordination.k8s.io Lease, so that of several operator replicas exactly one acts.

The replica that holds the Lease tries to renew it every retry period; the others wait until it expires (the lease
duration after its last renewal). A leader that has not renewed within the renew deadline, which is shorter than the
lease duration, stops itself (its pod restarts as a standby) before any standby may take over; every write of the
operator checks the deadline first (`check`), so a leader that was frozen (SIGSTOP, a stalled node) and wakes after
the deadline never writes again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator import k8s

log = logging.getLogger(__name__)
API = "coordination.k8s.io/v1"
# As client-go's defaults (15 s lease, 10 s renew deadline, 2 s retry), in proportion to the lease duration.
RENEW_DEADLINE_FRACTION = 2 / 3
RETRY_FRACTION = 2 / 15


class LeadershipLost(RuntimeError):  # noqa: N818 - reads as what happened
    """This replica may no longer act: its lease was not renewed within the renew deadline."""


def _micro(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class LeaderElector:
    """Acquire and keep a Lease; `on_lost` runs when leadership is lost."""

    def __init__(
        self,
        name: str,
        namespace: str,
        duration: int,
        holder: str | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.name, self.namespace, self.duration = name, namespace, duration
        self.holder = holder or identity()
        self.on_lost = on_lost
        self.renew_deadline = duration * RENEW_DEADLINE_FRACTION
        self.retry_period = max(0.5, duration * RETRY_FRACTION)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # monotonic time at which the last successful acquire or renewal was sent (None: not the leader)
        self._renewed: float | None = None

    def try_acquire(self, now: datetime | None = None) -> bool:
        """One attempt: take the Lease when it is free, expired or already ours."""
        sent = time.monotonic()
        if self._try_acquire(now or datetime.now(UTC)):
            self._renewed = sent
            return True
        return False

    def leading(self) -> bool:
        """Whether the lease was renewed within the renew deadline."""
        return self._renewed is not None and time.monotonic() - self._renewed <= self.renew_deadline

    def check(self) -> None:
        """Raise LeadershipLost (after calling on_lost) unless this replica still leads; k8s.write_guard calls it."""
        if self.leading():
            return
        log.error(
            "leader election: lease %s/%s not renewed within %.1fs; stopping",
            self.namespace,
            self.name,
            self.renew_deadline,
        )
        if self.on_lost:
            self.on_lost()
        raise LeadershipLost(f"lease {self.namespace}/{self.name} not renewed within {self.renew_deadline:.1f}s")

    def _try_acquire(self, now: datetime) -> bool:
        lease = k8s.get(API, "Lease", self.namespace, self.name)
        spec: dict[str, Any] = {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration,
            "renewTime": _micro(now),
        }
        if lease is None:
            body = {
                "apiVersion": API,
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": _micro(now), "leaseTransitions": 0},
            }
            _, created = k8s.create(body)
            return created
        current = lease.get("spec") or {}
        renewed = _parse(current.get("renewTime")) or _parse(current.get("acquireTime"))
        held_for = timedelta(seconds=current.get("leaseDurationSeconds") or self.duration)
        ours = current.get("holderIdentity") == self.holder
        if not ours and current.get("holderIdentity") and renewed and renewed + held_for > now:
            return False
        transitions = current.get("leaseTransitions") or 0
        lease["spec"] = {
            **current,
            **spec,
            "acquireTime": current.get("acquireTime") if ours else _micro(now),
            "leaseTransitions": transitions if ours else transitions + 1,
        }
        try:
            k8s.replace(lease)  # resourceVersion makes a concurrent taker lose cleanly
        except k8s.TransientError:
            return False
        return True

    def wait_until_leader(self, stop: threading.Event | None = None) -> bool:
        while not (stop and stop.is_set()):
            try:
                if self.try_acquire():
                    log.info("leader election: %s holds lease %s/%s", self.holder, self.namespace, self.name)
                    return True
            except k8s.TransientError as exc:
                log.warning("leader election: %s", exc)
            (stop or self._stop).wait(self.retry_period)
        return False

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.retry_period):
            try:
                if self.try_acquire():
                    continue
                log.warning("leader election: lease %s/%s is held by another replica", self.namespace, self.name)
            except Exception as exc:  # any failure to renew counts against the deadline
                log.warning("leader election: renewal failed: %s", exc)
            if not self.leading():
                log.error("leader election: lost lease %s/%s; stopping", self.namespace, self.name)
                self._renewed = None
                if self.on_lost:
                    self.on_lost()
                return

    def release(self) -> None:
        """Step down on a clean shutdown so a standby takes over at once."""
        self._stop.set()
        lease = k8s.get(API, "Lease", self.namespace, self.name)
        if lease and (lease.get("spec") or {}).get("holderIdentity") == self.holder:
            lease["spec"]["holderIdentity"] = None
            lease["spec"]["renewTime"] = None
            with contextlib.suppress(k8s.TransientError, LeadershipLost):
                k8s.replace(lease)
