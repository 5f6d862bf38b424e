"""Prometheus metrics: FineTuneJobs by phase, reconcile errors, and seconds from creation to children."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from finetune_operator.api import PHASES

REGISTRY = CollectorRegistry()
JOBS = Gauge("finetune_jobs", "FineTuneJobs by phase", ["phase"], registry=REGISTRY)
RECONCILE_ERRORS = Counter(
    "finetune_reconcile_errors_total", "Reconcile attempts that raised", ["handler"], registry=REGISTRY
)
CHILDREN_SECONDS = Histogram(
    "finetune_children_created_seconds",
    "Seconds from a FineTuneJob's creation to all its children existing",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def set_phase(namespace: str, name: str, phase: str | None) -> None:
    """Record a job's phase (None when it is gone) and refresh the per-phase gauge."""
    with _lock:
        if phase is None:
            _phases.pop((namespace, name), None)
        else:
            _phases[(namespace, name)] = phase
        counts: dict[str, int] = {}
        for p in _phases.values():
            counts[p] = counts.get(p, 0) + 1
        for p in PHASES:
            JOBS.labels(phase=p).set(counts.get(p, 0))


def serve(port: int) -> None:
    if port:
        start_http_server(port, registry=REGISTRY)
