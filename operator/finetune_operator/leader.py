"""Leader election on a coordination.k8s.io Lease, so that of several operator replicas exactly one acts.

The replica that holds the Lease renews it every third of its duration; the others wait until it expires. A leader
that fails to renew in time stops itself (its pod restarts as a standby) rather than risk two actors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator import k8s

log = logging.getLogger(__name__)
API = "coordination.k8s.io/v1"


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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self, now: datetime | None = None) -> bool:
        """One attempt: take the Lease when it is free, expired or already ours."""
        now = now or datetime.now(UTC)
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
            (stop or self._stop).wait(max(1.0, self.duration / 3))
        return False

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        last_ok = datetime.now(UTC)
        while not self._stop.wait(self.duration / 3):
            try:
                if self.try_acquire():
                    last_ok = datetime.now(UTC)
                    continue
            except Exception as exc:  # any failure to renew counts against the deadline
                log.warning("leader election: renewal failed: %s", exc)
            if datetime.now(UTC) - last_ok > timedelta(seconds=self.duration):
                log.error("leader election: lost lease %s/%s; stopping", self.namespace, self.name)
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
            with contextlib.suppress(k8s.TransientError):
                k8s.replace(lease)
