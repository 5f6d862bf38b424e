"""The reconcile of one FineTuneJob: read what exists now, converge towards the spec, write the operator's status.

Level-triggered: whatever woke it (the job's own events, a child's or a Pod's, the periodic resync, a restart), the
same `reconcile(namespace, name)` runs, and the work queue never runs two for one job at once. It decides only from
fresh reads: the FineTuneJob, its children (ours only when their controller ownerReference carries this job's uid),
the workload's Pods. Terminal phases are final: nothing is ever created again for a Succeeded or Failed job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator import backends, k8s, metrics
from finetune_operator.api import API_VERSION_FULL, KIND, FineTuneJobSpec, validate_spec
from finetune_operator.render import (
    CONTAINER,
    JOB_LABEL,
    QUEUE_LABEL,
    JobRef,
    children,
    merge_job,
    merge_uri,
)
from finetune_operator.settings import Settings
from finetune_operator.status import (
    CREATION_FAILED,
    MISSING_REASONS,
    TERMINAL,
    Observation,
    backoff_exceeded,
    changed,
    invalid_spec,
    observe,
    observe_merge,
    operator_status,
    pod_problem,
    transient_failures,
    workload_suspended,
)

log = logging.getLogger(__name__)
# How soon a job waiting for an old run's children to go away looks again.
CONFLICT_RECHECK_SECONDS = 5.0
CHILDREN_CREATED = "ChildrenCreated"

# Posts a Kubernetes Event on the FineTuneJob: (body, type, reason, message). The handlers pass k8s.post_event.
EventSink = Callable[[dict[str, Any], str, str, str], None]


@dataclass
class Children:
    """The job's children as they exist now, or why they cannot be used."""

    workload: dict[str, Any] | None = None
    refs: list[dict[str, Any]] = field(default_factory=list)
    blocked: Observation | None = None
    retry_after: float | None = None
    # The workload was created by this reconcile: it has no Pods yet.
    fresh_workload: bool = False
    # What this reconcile created, for the Event (Kind/name).
    created: list[str] = field(default_factory=list)


# When each job last had every child read (monotonic seconds): the other reconciles read only its workload.
_full_check: dict[tuple[str, str], float] = {}


def reconcile(namespace: str, name: str, settings: Settings, events: EventSink) -> float | None:
    """Converge one FineTuneJob. Returns seconds after which to look again (None: when something changes)."""
    body = k8s.get(API_VERSION_FULL, KIND, namespace, name)
    if body is None:
        metrics.set_phase(namespace, name, None)
        _full_check.pop((namespace, name), None)
        forget_job(namespace, name)
        return None
    status = body.get("status") or {}
    phase = status.get("phase")
    if phase in TERMINAL:
        metrics.set_phase(namespace, name, phase)
        return expire(body)
    meta = body["metadata"]
    spec, errors = validate_spec(body.get("spec") or {})
    if spec is None:
        # A spec that can never work: say so once, with the field paths, and do not retry.
        _record(body, invalid_spec(errors), events)
        return None
    backend = backends.choose(spec, status.get("backend"), settings)
    if backend != spec.distribution.backend:
        spec = spec.with_backend(backend)
    job = JobRef(name, namespace, spec, meta.get("uid") or "")
    if phase == "Merging":
        # Training has succeeded: only the merge is left. A deleted workload is not recreated to train again.
        merge_obs, merge_artifacts = _follow_merge(job, settings)
        _record(body, merge_obs, events, artifacts=merge_artifacts)
        return None
    kids = ensure_children(body, job, settings, events)
    if kids.blocked is not None:
        _record(body, kids.blocked, events, children=kids.refs or None)
        return kids.retry_after
    workload = kids.workload
    assert workload is not None
    _converge_suspension(workload, spec)
    jobset = None
    if workload["kind"] == "TrainJob" and not kids.fresh_workload:
        jobset = backends.train_jobset(workload)
        backends.mirror_progress(workload, status.get("progress"))
    pods = [] if kids.fresh_workload else backends.pods(namespace, name, "trainer", workload, jobset)
    obs = observe(workload, pods, spec.distribution.nodes, spec.run_policy.suspend)
    if workload["kind"] == "TrainJob" and jobset is None and not kids.fresh_workload and obs.phase == "Pending":
        obs = backends.creation_failure(workload, settings.jobset_grace_seconds) or obs
    failed: list[str] | None = None
    if workload["kind"] == "PyTorchJob":
        failed, over = _count_transient_failures(status, workload, pods, spec)
        if over is not None and obs.phase not in TERMINAL:
            obs = over
            _stop(workload)
    elif jobset is not None:
        obs = _count_jobset_restarts(workload, jobset, spec, obs)
    artifacts: dict[str, Any] = {}
    if obs.phase == "Succeeded":
        artifacts = training_artifacts(spec)
        if spec.merge_enabled():
            obs, merged = _follow_merge(job, settings)
            artifacts.update(merged)
    _record(
        body,
        obs,
        events,
        children=kids.refs,
        artifacts=artifacts,
        failed_replicas=failed,
        created=kids.created,
        backend=backend,
    )
    if failed is not None:
        forget_transient(workload["metadata"].get("uid") or "", failed, obs.phase in ("Succeeded", "Failed"))
    return None


# Transient failures of PyTorchJob replicas seen in Pod events, whose Pods the training operator deletes at once:
# workload uid -> pod uids. Status keeps them across operator restarts (status.failedReplicas).
_transient: dict[str, set[str]] = {}


# The last failure of a TrainJob's replica, by JobSet uid: JobSet deletes the Pods when it restarts the run.
_jobset_failures: dict[str, str] = {}

# The keys of the two maps above that each FineTuneJob (namespace, name) has, so that a job deleted mid-run leaves
# nothing behind (a finished run empties its entries itself).
_keys_of_job: dict[tuple[str, str], set[str]] = {}


def _remember(meta: dict[str, Any], key: str) -> None:
    job = (meta.get("labels") or {}).get(JOB_LABEL)
    if job:
        _keys_of_job.setdefault((str(meta.get("namespace") or ""), job), set()).add(key)


def forget_job(namespace: str, name: str) -> None:
    """The failures remembered from the Pods of a FineTuneJob that is gone."""
    for key in _keys_of_job.pop((namespace, name), set()):
        _transient.pop(key, None)
        _jobset_failures.pop(key, None)


def note_pod(pod: dict[str, Any]) -> None:
    """Called for every Pod event: remember a replica's transient failure, which its Pod may not outlive."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get("app.kubernetes.io/component") != "trainer":
        return
    jobset_uid = labels.get(backends.JOBSET_UID_LABEL)
    if jobset_uid and (pod.get("status") or {}).get("phase") == "Failed":
        problem = pod_problem([pod])
        if problem is not None:
            _jobset_failures[jobset_uid] = problem.message
            _remember(meta, jobset_uid)
        return
    if not any(r.get("controller") and r.get("kind") == "PyTorchJob" for r in meta.get("ownerReferences") or []):
        return  # the other backends' controllers count their replicas' failures themselves
    owner = k8s.controller_uid(pod)
    for uid in transient_failures([pod], CONTAINER):
        if owner:
            _transient.setdefault(owner, set()).add(uid)
            _remember(meta, owner)


def forget_transient(workload_uid: str, recorded: list[str], finished: bool) -> None:
    """Once status.failedReplicas holds them (or the run is over), the failures remembered from Pod events are not
    needed any more: without this the map would grow by every failed replica the operator ever saw."""
    remaining = set() if finished else _transient.get(workload_uid, set()) - set(recorded)
    if remaining:
        _transient[workload_uid] = remaining
    else:
        _transient.pop(workload_uid, None)


def _count_transient_failures(
    status: dict[str, Any], workload: dict[str, Any], pods: list[dict[str, Any]], spec: FineTuneJobSpec
) -> tuple[list[str], Observation | None]:
    """runPolicy.backoffLimit for the PyTorchJob backend: under restartPolicy ExitCode the training operator
    replaces a replica that failed with a retryable code without counting it, so the operator counts."""
    seen = _transient.get(workload["metadata"].get("uid") or "", set())
    failures = set(status.get("failedReplicas") or []) | set(transient_failures(pods, CONTAINER)) | seen
    limit = spec.run_policy.backoff_limit
    over = backoff_exceeded(len(failures), limit) if len(failures) > limit else None
    return sorted(failures)[: limit + 1], over


def _count_jobset_restarts(
    trainjob: dict[str, Any], jobset: dict[str, Any], spec: FineTuneJobSpec, obs: Observation
) -> Observation:
    """runPolicy.backoffLimit for the TrainJob backend: JobSet restarts the whole run after each transient failure,
    up to the runtime's maxRestarts; the job's own limit is the operator's to enforce. The failure itself went with
    the restarted Pods: the one their events showed is named."""
    uid = jobset["metadata"]["uid"]
    restarts = backends.restarts(jobset)
    last = _jobset_failures.get(uid)
    if restarts > spec.run_policy.backoff_limit and obs.phase not in TERMINAL:
        obs = backoff_exceeded(restarts, spec.run_policy.backoff_limit, last)
        _stop(trainjob)
    elif restarts and obs.phase == "Running":
        detail = f"; restarted {restarts} time(s)" + (f", last failure: {last}" if last else "")
        obs = Observation(obs.phase, obs.reason, obs.message + detail)
    if obs.phase in TERMINAL:
        _jobset_failures.pop(uid, None)
    return obs


def _stop(workload: dict[str, Any]) -> None:
    """Suspend a workload whose run has failed for good: its Pods go, the object stays for inspection."""
    _suspend(workload, True)


def _suspend(workload: dict[str, Any], value: bool) -> None:
    """Set the workload's suspension (spec.runPolicy.suspend on a PyTorchJob, spec.suspend on a Job or TrainJob)."""
    meta = workload["metadata"]
    patch = backends.suspension_patch(workload, value)
    updated = k8s.merge_patch(workload["apiVersion"], workload["kind"], meta["namespace"], meta["name"], patch)
    if updated is not None:
        workload.update(updated)


def _record(
    body: dict[str, Any],
    obs: Observation,
    events: EventSink,
    *,
    children: list[dict[str, Any]] | None = None,
    artifacts: dict[str, Any] | None = None,
    failed_replicas: list[str] | None = None,
    created: list[str] | None = None,
    backend: str | None = None,
) -> None:
    """Apply the operator's status when it changed; one Event per phase change (the first one names the children
    this reconcile created, so a new job costs one Event, not two)."""
    meta = body["metadata"]
    old = body.get("status") or {}
    new = operator_status(
        old,
        obs,
        meta.get("generation"),
        children=children,
        artifacts=artifacts,
        failed_replicas=failed_replicas,
        backend=backend,
    )
    if changed(old, new):
        k8s.apply_status(meta["namespace"], meta["name"], new, read=body)
    made = "created " + ", ".join(created) if created else ""
    if old.get("phase") != obs.phase:
        warning = obs.phase == "Failed" or obs.reason in (
            "Unschedulable",
            "ChildConflict",
            CREATION_FAILED,
            *MISSING_REASONS,
        )
        reason, message = (CHILDREN_CREATED, f"{made}; {obs.phase}: {obs.message}") if made else (obs.reason, "")
        events(body, "Warning" if warning else "Normal", reason, message or f"{obs.phase}: {obs.message}")
    elif made:
        events(body, "Normal", CHILDREN_CREATED, made)
    metrics.set_phase(meta["namespace"], meta["name"], obs.phase)


def _describe(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _foreign(obj: dict[str, Any], uid: str) -> str | None:
    """Why an existing same-named object is not this job's child (None when it is)."""
    owner = k8s.controller_uid(obj)
    if owner == uid:
        return None
    going = " and is being deleted" if obj["metadata"].get("deletionTimestamp") else ""
    if owner is None:
        whose = "has no controller (an orphan, e.g. of a FineTuneJob deleted with propagationPolicy Orphan)"
        hint = "delete it, or rename this FineTuneJob"
    else:
        whose = f"belongs to another owner (uid {owner}, e.g. an earlier FineTuneJob of this name)"
        hint = "it goes away with its owner" if going else "delete it, or rename this FineTuneJob"
    return f"{_describe(obj)} already exists and {whose}{going}; waiting until it is gone ({hint})"


def ensure_children(body: dict[str, Any], job: JobRef, settings: Settings, events: EventSink) -> Children:
    """Create every child that is missing. Same-named objects that are not ours are never used: the job waits.

    A job that has recorded no children yet creates them straight away (a create that finds one already there reads
    it and checks its owner). After that the workload is read on every reconcile and every child once per resync
    interval, or at once when the workload has gone: a deleted child is recreated within one resync interval.
    """
    wanted = children(job, settings)
    last = len(wanted) - 1
    refs = [{"apiVersion": o["apiVersion"], "kind": o["kind"], "name": o["metadata"]["name"]} for o in wanted]
    recorded = {(r.get("kind"), r.get("name")) for r in (body.get("status") or {}).get("children") or []}
    key = (job.namespace, job.name)
    full = time.monotonic() - _full_check.get(key, float("-inf")) >= settings.resync_seconds
    to_read = (range(len(wanted)) if full else [last]) if recorded else []
    current = {i: _read(wanted[i], job.namespace) for i in to_read}
    if recorded and current[last] is None and not full:
        current.update({i: _read(wanted[i], job.namespace) for i in range(last)})
        full = True
    conflicts = [why for obj in current.values() if obj is not None and (why := _foreign(obj, job.uid))]
    if conflicts:
        blocked = Observation("Pending", "ChildConflict", "; ".join(conflicts))
        return Children(blocked=blocked, retry_after=CONFLICT_RECHECK_SECONDS)
    missing = [i for i in range(len(wanted)) if current.get(i) is None and (i in current or not recorded)]
    if last in missing and (absent := backends.missing(job.spec.distribution.backend, settings)) is not None:
        return Children(blocked=absent, retry_after=settings.api_recheck_seconds)
    created: list[str] = []
    recreated: list[str] = []
    for i in missing:
        obj = wanted[i]
        made, fresh = k8s.create(obj)
        why = _foreign(made, job.uid)
        if why:  # there already (a new job's first reconcile), or appeared between our read and our create
            return Children(blocked=Observation("Pending", "ChildConflict", why), retry_after=CONFLICT_RECHECK_SECONDS)
        current[i] = made
        if fresh:
            (recreated if (obj["kind"], obj["metadata"]["name"]) in recorded else created).append(_describe(obj))
    if full:
        _full_check[key] = time.monotonic()
    if created:
        _observe_startup(body)
        log.info("%s/%s: created %s", job.namespace, job.name, ", ".join(created))
    if recreated:
        log.info("%s/%s: recreated %s", job.namespace, job.name, ", ".join(recreated))
        events(body, "Warning", "ChildRecreated", "recreated " + ", ".join(recreated) + " (it had been deleted)")
    return Children(workload=current[last], refs=refs, fresh_workload=last in missing, created=created)


def _read(obj: dict[str, Any], namespace: str) -> dict[str, Any] | None:
    return k8s.get(obj["apiVersion"], obj["kind"], namespace, obj["metadata"]["name"])


def _observe_startup(body: dict[str, Any]) -> None:
    created_at = body["metadata"].get("creationTimestamp")
    if created_at:
        age = datetime.now(UTC) - datetime.fromisoformat(created_at.replace("Z", "+00:00"))
        metrics.CHILDREN_SECONDS.observe(max(age.total_seconds(), 0.0))


def _converge_suspension(workload: dict[str, Any], spec: FineTuneJobSpec) -> None:
    """Bring the workload's suspension to what the spec asks. With a Kueue queue, resuming is Kueue's decision."""
    want = spec.run_policy.suspend
    current = workload_suspended(workload)
    if current == want:
        return
    if not want and (workload["metadata"].get("labels") or {}).get(QUEUE_LABEL):
        return
    _suspend(workload, want)


def training_artifacts(spec: FineTuneJobSpec) -> dict[str, Any]:
    out = spec.output.uri.rstrip("/") + "/"
    return {"adapter" if spec.method.uses_adapter else "model": out}


def _follow_merge(job: JobRef, settings: Settings) -> tuple[Observation, dict[str, Any]]:
    """Training is done: run (or follow) the merge Job. Its failure never touches the adapter."""
    artifacts = training_artifacts(job.spec)
    merge = k8s.get("batch/v1", "Job", job.namespace, f"{job.name}-merge")
    if merge is None:
        merge, _ = k8s.create(merge_job(job, settings))
    why = _foreign(merge, job.uid)
    if why:
        return Observation("Merging", "ChildConflict", why), artifacts
    pods = backends.pods(job.namespace, job.name, "merge", merge)
    obs = observe_merge(merge, pods, merge_uri(job.spec))
    if obs.phase == "Succeeded":
        artifacts["merged"] = merge_uri(job.spec)
    return obs, artifacts


def expire(body: dict[str, Any], now: datetime | None = None) -> float | None:
    """Delete a finished FineTuneJob whose ttlSecondsAfterFinished has passed (children go with it; S3 stays).
    Returns the seconds left until it is due, None when it has no TTL or was deleted."""
    status = body.get("status") or {}
    ttl = ((body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    done = status.get("completionTime")
    if ttl is None or status.get("phase") not in TERMINAL or not done:
        return None
    finished = datetime.fromisoformat(done.replace("Z", "+00:00"))
    left = (finished + timedelta(seconds=int(ttl)) - (now or datetime.now(UTC))).total_seconds()
    if left > 0:
        return left
    meta = body["metadata"]
    log.info("deleting %s/%s: finished %s, ttlSecondsAfterFinished %s", meta["namespace"], meta["name"], done, ttl)
    k8s.delete(API_VERSION_FULL, KIND, meta["namespace"], meta["name"])
    return None


def keys(settings: Settings) -> list[tuple[str, str]]:
    """Every watched FineTuneJob, as (namespace, name): what the periodic resync queues."""
    out = []
    for namespace in settings.watch_namespaces or (None,):
        for body in k8s.list_objects(API_VERSION_FULL, KIND, namespace, ""):
            out.append((body["metadata"]["namespace"], body["metadata"]["name"]))
    return out
