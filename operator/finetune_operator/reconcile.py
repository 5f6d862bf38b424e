"""Reconcile steps the kopf handlers call: validate, create the children, follow them into status, suspend, expire.

Each step reads what it needs fresh from the API, so it is safe to run again at any time (after an operator restart,
from a timer, or from a Pod event): creates are idempotent and status is only written when it changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator import k8s, metrics
from finetune_operator.api import API_VERSION_FULL, KIND, FineTuneJobSpec, validate_spec
from finetune_operator.render import (
    JOB_LABEL,
    QUEUE_LABEL,
    JobRef,
    children,
    merge_job,
    merge_uri,
    owner_reference,
    workload,
)
from finetune_operator.settings import Settings
from finetune_operator.status import (
    TERMINAL,
    Observation,
    changed,
    invalid_spec,
    observe,
    observe_merge,
    status_patch,
)

log = logging.getLogger(__name__)
KUBEFLOW_API = "kubeflow.org/v1"
MISSING_KUBEFLOW = (
    "the PyTorchJob API (kubeflow.org/v1) is not served by this cluster: install the Kubeflow training operator "
    "(kubectl apply -k 'github.com/kubeflow/training-operator/manifests/overlays/standalone?ref=v1.8.1') "
    "or set spec.distribution.backend: job; the operator re-checks every {delay}s"
)

# Posts a Kubernetes Event on the FineTuneJob: (body, type, reason, message). The handlers pass k8s.post_event.
EventSink = Callable[[dict[str, Any], str, str, str], None]


class RetryLater(Exception):  # noqa: N818 - it is a signal, not a failure
    """The step cannot finish now; the handler retries after `delay` seconds."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


def _record(
    body: dict[str, Any],
    obs: Observation,
    generation: int | None,
    events: EventSink,
    artifacts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the operator's part of status (and artifacts not yet recorded) in one patch, only when something
    changed; an Event on every phase change."""
    meta = body["metadata"]
    old = body.get("status") or {}
    patch = status_patch(old, obs, generation)
    recorded = old.get("artifacts") or {}
    new_artifacts = {k: v for k, v in (artifacts or {}).items() if recorded.get(k) != v}
    if new_artifacts:
        patch["artifacts"] = new_artifacts
    if new_artifacts or changed(old, {k: v for k, v in patch.items() if k != "artifacts"}):
        k8s.patch_status(meta["namespace"], meta["name"], patch)
    if old.get("phase") != obs.phase:
        kind = (
            "Warning" if obs.phase == "Failed" or obs.reason in ("Unschedulable", "PyTorchJobAPIMissing") else "Normal"
        )
        events(body, kind, obs.reason, f"{obs.phase}: {obs.message}")
    metrics.set_phase(meta["namespace"], meta["name"], obs.phase)
    return patch


def parse(body: dict[str, Any]) -> tuple[FineTuneJobSpec | None, list[str]]:
    return validate_spec(body.get("spec") or {})


def ensure_children(body: dict[str, Any], settings: Settings, events: EventSink) -> list[dict[str, Any]]:
    """Validate, then create every child that is missing. Returns the children as they exist now."""
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta.get("uid")
    spec, errors = parse(body)
    if spec is None:
        # A spec that can never work: say so once, with the field paths, and do not retry.
        _record(body, invalid_spec(errors), meta.get("generation"), events)
        return []
    if spec.distribution.backend == "pytorchjob" and not k8s.served(KUBEFLOW_API, "pytorchjobs"):
        message = MISSING_KUBEFLOW.format(delay=settings.api_recheck_seconds)
        _record(body, Observation("Pending", "PyTorchJobAPIMissing", message), meta.get("generation"), events)
        raise RetryLater(message, settings.api_recheck_seconds)
    job = JobRef(name, namespace, spec)
    created_any = False
    out = []
    for obj in children(job, settings):
        # Owner references by hand rather than kopf.adopt: adopt also copies the owner's labels, and an Argo CD
        # tracking label copied onto children would make Argo CD prune them as strays.
        obj["metadata"]["ownerReferences"] = [owner_reference(name, uid or "")]
        existing, created = k8s.create(obj)
        created_any |= created
        out.append(existing)
    if created_any:
        created_at = meta.get("creationTimestamp")
        if created_at:
            age = datetime.now(UTC) - datetime.fromisoformat(created_at.replace("Z", "+00:00"))
            metrics.CHILDREN_SECONDS.observe(max(age.total_seconds(), 0.0))
        events(
            body,
            "Normal",
            "ChildrenCreated",
            "created " + ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in out),
        )
    refs = [{"apiVersion": o["apiVersion"], "kind": o["kind"], "name": o["metadata"]["name"]} for o in out]
    if (body.get("status") or {}).get("children") != refs:
        k8s.patch_status(namespace, name, {"children": refs})
    return out


def sync_status(namespace: str, name: str, settings: Settings, events: EventSink) -> Observation | None:
    """Read the FineTuneJob, its workload and Pods, and bring status up to date."""
    body = k8s.get(API_VERSION_FULL, KIND, namespace, name)
    if body is None:
        metrics.set_phase(namespace, name, None)
        return None
    status = body.get("status") or {}
    spec, _ = parse(body)
    if spec is None or status.get("phase") in TERMINAL:
        # Terminal phases stick: pods cleaned up after the end do not turn Succeeded back into Pending.
        return None
    job = JobRef(name, namespace, spec)
    child_ref = workload(job, settings, {})
    child = k8s.get(child_ref["apiVersion"], child_ref["kind"], namespace, name)
    if child is None and child_ref["kind"] == "PyTorchJob" and not k8s.served(KUBEFLOW_API, "pytorchjobs"):
        return None  # ensure_children reports the missing API and re-checks it
    pods = k8s.list_objects("v1", "Pod", namespace, f"{JOB_LABEL}={name},app.kubernetes.io/component=trainer")
    obs = observe(child, pods, spec.distribution.nodes, spec.run_policy.suspend)
    if child is None and status.get("phase") not in (None, "Pending"):
        obs = Observation("Pending", "ChildMissing", f"{child_ref['kind']} {name} is gone; recreating it")
    artifacts: dict[str, Any] = {}
    if obs.phase == "Succeeded":
        artifacts = training_artifacts(spec)
        if spec.merge_enabled():
            obs = _follow_merge(body, job, settings)
            if obs.phase == "Succeeded":
                artifacts["merged"] = merge_uri(spec)
    _record(body, obs, body["metadata"].get("generation"), events, artifacts)
    return obs


def training_artifacts(spec: FineTuneJobSpec) -> dict[str, Any]:
    out = spec.output.uri.rstrip("/") + "/"
    artifacts: dict[str, Any] = {"adapter" if spec.method.uses_adapter else "model": out}
    if spec.output.plot_loss:
        artifacts["lossPlot"] = out + "loss.png"
    return artifacts


def _follow_merge(body: dict[str, Any], job: JobRef, settings: Settings) -> Observation:
    """Training is done: run (or follow) the merge Job. Its failure never touches the adapter."""
    merge = k8s.get("batch/v1", "Job", job.namespace, f"{job.name}-merge")
    if merge is None:
        obj = merge_job(job, settings)
        obj["metadata"]["ownerReferences"] = [owner_reference(job.name, body["metadata"].get("uid") or "")]
        merge, _ = k8s.create(obj)
    pods = k8s.list_objects("v1", "Pod", job.namespace, f"{JOB_LABEL}={job.name},app.kubernetes.io/component=merge")
    return observe_merge(merge, pods, merge_uri(job.spec))


def set_suspended(namespace: str, name: str, suspend: bool, settings: Settings) -> bool:
    """Suspend or resume the workload. With a Kueue queue, resuming is Kueue's decision, not ours."""
    body = k8s.get(API_VERSION_FULL, KIND, namespace, name)
    if body is None:
        return False
    spec, _ = parse(body)
    if spec is None:
        return False
    child_ref = workload(JobRef(name, namespace, spec), settings, {})
    child = k8s.get(child_ref["apiVersion"], child_ref["kind"], namespace, name)
    if child is None:
        return False
    if not suspend and (child["metadata"].get("labels") or {}).get(QUEUE_LABEL):
        return False
    patch = (
        {"spec": {"runPolicy": {"suspend": suspend}}}
        if child["kind"] == "PyTorchJob"
        else {"spec": {"suspend": suspend}}
    )
    k8s.merge_patch(child["apiVersion"], child["kind"], namespace, name, patch)
    return True


def expire(body: dict[str, Any], now: datetime | None = None) -> bool:
    """Delete a finished FineTuneJob whose ttlSecondsAfterFinished has passed (children go with it; S3 stays)."""
    status = body.get("status") or {}
    ttl = ((body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    done = status.get("completionTime")
    if ttl is None or status.get("phase") not in TERMINAL or not done:
        return False
    finished = datetime.fromisoformat(done.replace("Z", "+00:00"))
    if (now or datetime.now(UTC)) < finished + timedelta(seconds=int(ttl)):
        return False
    meta = body["metadata"]
    log.info("deleting %s/%s: finished %s, ttlSecondsAfterFinished %s", meta["namespace"], meta["name"], done, ttl)
    return k8s.delete(API_VERSION_FULL, KIND, meta["namespace"], meta["name"])


def resync_all(settings: Settings, events: EventSink) -> int:
    """Bring every watched FineTuneJob up to date and expire finished ones; returns how many were looked at."""
    seen = 0
    for namespace in settings.watch_namespaces or (None,):
        for body in k8s.list_objects(API_VERSION_FULL, KIND, namespace, ""):
            meta = body["metadata"]
            seen += 1
            try:
                if (body.get("status") or {}).get("phase") in TERMINAL:
                    expire(body)
                else:
                    sync_status(meta["namespace"], meta["name"], settings, events)
            except k8s.TransientError as exc:
                log.warning("resync %s/%s: %s", meta["namespace"], meta["name"], exc)
    return seen
