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
from finetune_operator.workqueue import WorkQueue
from finetune_trainer.config import API_GROUP, API_VERSION

SETTINGS = Settings.from_env()
FTJ = (API_GROUP, API_VERSION, PLURAL)
CHILD = {JOB_LABEL: kopf.PRESENT}
log = logging.getLogger(__name__)
# The client's DEBUG output is every request and response body: noise, and objects do not belong in logs.
logging.getLogger("kubernetes.client.rest").setLevel(logging.INFO)
_elector: LeaderElector | None = None


QUEUE_WORKERS = 4
# Backoff after a failed reconcile: the API server had trouble (transient) or something unexpected broke.
TRANSIENT_RETRY_SECONDS = 5.0
ERROR_RETRY_SECONDS = 30.0


def _event(body: dict[str, Any], kind: str, reason: str, message: str) -> None:
    # Posted directly rather than through kopf.event: reconciles run on the work queue's threads, outside kopf.
    k8s.post_event(body, kind, reason, message, component="finetune-operator")


def _reconcile(key: tuple[str, str]) -> float | None:
    namespace, name = key
    try:
        return reconcile.reconcile(namespace, name, SETTINGS, _event)
    except k8s.StaleReadError as exc:  # the job changed while it was reconciled (or was re-created): read it again now
        log.info("reconcile %s/%s: %s; again at once", namespace, name, exc)
        return 0.0
    except k8s.TransientError as exc:
        metrics.RECONCILE_ERRORS.labels(handler="reconcile").inc()
        log.warning("reconcile %s/%s: %s; again in %ss", namespace, name, exc, TRANSIENT_RETRY_SECONDS)
        return TRANSIENT_RETRY_SECONDS
    except Exception:
        metrics.RECONCILE_ERRORS.labels(handler="reconcile").inc()
        log.exception("reconcile %s/%s failed; again in %ss", namespace, name, ERROR_RETRY_SECONDS)
        return ERROR_RETRY_SECONDS


# Every trigger only queues the job's key; the queue runs one reconcile per job at a time (finetune_operator.workqueue).
QUEUE: WorkQueue[tuple[str, str]] = WorkQueue(_reconcile, workers=QUEUE_WORKERS)


def _stop_at_once() -> None:
    """The lease is lost: stop now, before any other write can leave (os._exit: no handler, no thread gets to run
    first), leaving no copy of the kubeconfig's credentials behind."""
    k8s.remove_credential_files()
    os._exit(1)


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _elector
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    metrics.serve(SETTINGS.metrics_port)
    if SETTINGS.leader_election:
        _elector = LeaderElector(
            SETTINGS.lease_name, SETTINGS.lease_namespace, SETTINGS.lease_seconds, on_lost=_stop_at_once
        )
        _elector.wait_until_leader()
        _elector.start_renewing()
        # No write leaves this process unless the lease was renewed within the renew deadline.
        k8s.write_guard = _elector.check
    QUEUE.start()
    # One loop for every job instead of a kopf timer per job: timers would put a finalizer on each FineTuneJob,
    # and an uninstalled operator would then leave them undeletable.
    threading.Thread(target=_resync_forever, name="resync", daemon=True).start()


def _resync_forever() -> None:
    while True:
        time.sleep(SETTINGS.resync_seconds)
        try:
            for key in reconcile.keys(SETTINGS):
                QUEUE.add(key)
        except Exception:
            metrics.RECONCILE_ERRORS.labels(handler="resync").inc()
            log.exception("resync failed; trying again in %ss", SETTINGS.resync_seconds)


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    QUEUE.stop()
    if _elector is not None:
        _elector.release()


# Only event handlers: kopf then keeps no progress or diff-base annotations on the objects and adds no finalizer, so
# a FineTuneJob costs no writes beyond the operator's own, and an uninstalled operator leaves nothing undeletable.
# The generation each FineTuneJob was last queued for: a change of status alone (the operator's own writes, the
# trainer's progress every logging step) needs no reconcile, as controller-runtime's GenerationChangedPredicate.
_generations: dict[tuple[str, str], int | None] = {}


@kopf.on.event(*FTJ)
def finetunejob_event(event: kopf.RawEvent, body: kopf.Body, name: str, namespace: str | None, **_: Any) -> None:
    if not namespace:
        return
    key = (namespace, name)
    kind = event.get("type")
    if kind == "DELETED":
        _generations.pop(key, None)
    else:
        generation = body.get("metadata", {}).get("generation")
        if kind == "MODIFIED" and _generations.get(key) == generation:
            return
        _generations[key] = generation
    QUEUE.add(key)


def _parent_changed(event: kopf.RawEvent, namespace: str | None, labels: Mapping[str, str]) -> None:
    # A child appearing is the operator's own doing (or, for Pods, the workload controller's first step, which a
    # status change follows): only changes and deletions say something new.
    parent = labels.get(JOB_LABEL)
    if namespace and parent and event.get("type") != "ADDED":
        QUEUE.add((namespace, parent))


@kopf.on.event("v1", "pods", labels=CHILD)
def pod_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, labels: Mapping[str, str], **_: Any
) -> None:
    reconcile.note_pod(dict(body))
    _parent_changed(event, namespace, labels)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD)
def job_event(event: kopf.RawEvent, namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    _parent_changed(event, namespace, labels)


@kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels=CHILD)
def pytorchjob_event(event: kopf.RawEvent, namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    _parent_changed(event, namespace, labels)


@kopf.on.event("trainer.kubeflow.org", "v1alpha1", "trainjobs", labels=CHILD)
def trainjob_event(event: kopf.RawEvent, namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    _parent_changed(event, namespace, labels)
