"""kopf handler registrations, and nothing else: each handler hands over to `finetune_operator.reconcile`.

Run with `ftj operator` (or `kopf run -m finetune_operator.handlers --standalone`). Settings come from environment
variables (see `finetune_operator.settings`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import kopf

from finetune_operator import k8s, metrics, reconcile
from finetune_operator.api import PLURAL
from finetune_operator.leader import LeaderElector
from finetune_operator.render import JOB_LABEL
from finetune_operator.settings import Settings
from finetune_trainer.config import API_GROUP, API_VERSION

SETTINGS = Settings.from_env()
FTJ = (API_GROUP, API_VERSION, PLURAL)
CHILD = {JOB_LABEL: kopf.PRESENT}
log = logging.getLogger(__name__)
# The client's DEBUG output is every request and response body: noise, and objects do not belong in logs.
logging.getLogger("kubernetes.client.rest").setLevel(logging.INFO)
_elector: LeaderElector | None = None


def _event(body: dict[str, Any], kind: str, reason: str, message: str) -> None:
    # Posted directly rather than through kopf.event: the resync thread has no kopf event queue to post into.
    k8s.post_event(body, kind, reason, message, component="finetune-operator")


def _retrying(handler: str, step: Any, *args: Any) -> Any:
    try:
        return step(*args)
    except reconcile.RetryLater as exc:
        raise kopf.TemporaryError(str(exc), delay=exc.delay) from None
    except k8s.TransientError as exc:
        metrics.RECONCILE_ERRORS.labels(handler=handler).inc()
        raise kopf.TemporaryError(str(exc), delay=5) from None
    except Exception:
        metrics.RECONCILE_ERRORS.labels(handler=handler).inc()
        raise


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _elector
    # Progress in annotations only: status.kopf would be pruned by the structural schema.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="finetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="finetune.dev")
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    metrics.serve(SETTINGS.metrics_port)
    if SETTINGS.leader_election:
        _elector = LeaderElector(
            SETTINGS.lease_name, SETTINGS.lease_namespace, SETTINGS.lease_seconds, on_lost=lambda: os._exit(1)
        )
        _elector.wait_until_leader()
        _elector.start_renewing()
    # One loop for every job instead of a kopf timer per job: timers would put a finalizer on each FineTuneJob,
    # and an uninstalled operator would then leave them undeletable.
    threading.Thread(target=_resync_forever, name="resync", daemon=True).start()


def _resync_forever() -> None:
    while True:
        time.sleep(SETTINGS.resync_seconds)
        try:
            reconcile.resync_all(SETTINGS, _event)
        except Exception:
            metrics.RECONCILE_ERRORS.labels(handler="resync").inc()
            log.exception("resync failed; trying again in %ss", SETTINGS.resync_seconds)


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    if _elector is not None:
        _elector.release()


@kopf.on.create(*FTJ)
@kopf.on.resume(*FTJ)
def ensure(body: kopf.Body, name: str, namespace: str | None, **_: Any) -> None:
    _retrying("ensure", reconcile.ensure_children, dict(body), SETTINGS, _event)
    _retrying("sync", reconcile.sync_status, namespace, name, SETTINGS, _event)


@kopf.on.field(*FTJ, field="spec.runPolicy.suspend")
def suspend_changed(name: str, namespace: str | None, new: Any, **_: Any) -> None:
    _retrying("suspend", reconcile.set_suspended, namespace, name, bool(new), SETTINGS)
    _retrying("sync", reconcile.sync_status, namespace, name, SETTINGS, _event)


@kopf.on.delete(*FTJ, optional=True)
def forget(name: str, namespace: str | None, **_: Any) -> None:
    metrics.set_phase(namespace or "", name, None)


def _parent_changed(namespace: str | None, labels: Mapping[str, str], handler: str) -> None:
    parent = labels.get(JOB_LABEL)
    if namespace and parent:
        _retrying(handler, reconcile.sync_status, namespace, parent, SETTINGS, _event)


@kopf.on.event("v1", "pods", labels=CHILD)
def pod_event(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    _parent_changed(namespace, labels, "pod-event")


@kopf.on.event("batch", "v1", "jobs", labels=CHILD)
def job_event(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    _parent_changed(namespace, labels, "job-event")


@kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels=CHILD)
def pytorchjob_event(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    _parent_changed(namespace, labels, "pytorchjob-event")
