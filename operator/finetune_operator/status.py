"""Map the observed children (workload and Pods) to the FineTuneJob's phase, conditions and message: pure functions.

Status has two writers, each with its own server-side-apply field manager. The operator owns phase, message, its
conditions (CONDITION_TYPES), times, children, observedGeneration and the adapter/model/merged artifacts; the trainer
owns progress, checkpoints, resumedFromStep, artifacts.lossPlot/tensorboard/samples, sampleCount, tracking and its
own conditions (TrainerFailed). What `operator_status` builds is the operator's whole part, applied as one document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from finetune_trainer.timefmt import now_rfc3339

TERMINAL = ("Succeeded", "Failed")
# Waiting reasons of a container that no amount of waiting fixes without a person.
STUCK_WAITING = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError")
# Failure reasons that say only that something failed.
GENERIC_REASONS = (
    "Error",
    "Failed",
    "PodFailurePolicy",
    "PyTorchJobFailed",
    # JobSet's, which a TrainJob's Failed condition passes on.
    "FailedJobs",
    "FailJobSetFailurePolicyAction",
)
CONDITION_TYPES = ("Created", "Running", "Merging", "Succeeded", "Failed", "Suspended")
# Where each workload kind keeps its suspension in its spec.
SUSPEND_PATHS: dict[str, tuple[str, ...]] = {
    "PyTorchJob": ("runPolicy", "suspend"),
    "TrainJob": ("suspend",),
    "Job": ("suspend",),
}


def workload_suspended(workload: dict[str, Any]) -> bool:
    value: Any = workload.get("spec") or {}
    for key in SUSPEND_PATHS[workload["kind"]]:
        value = (value or {}).get(key)
    return bool(value)


@dataclass(frozen=True)
class Observation:
    """What the children say, reduced to a phase with the reason and message a person can act on."""

    phase: str
    reason: str
    message: str


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in (obj.get("status") or {}).get("conditions") or []}


def _true(conds: dict[str, dict[str, Any]], kind: str) -> bool:
    return conds.get(kind, {}).get("status") == "True"


def pod_problem(pods: list[dict[str, Any]]) -> Observation | None:
    """The most telling trouble among the Pods: unschedulable, image pull, OOMKilled, a non-zero exit."""
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                reason = cond.get("reason") or "Unschedulable"
                return Observation("Pending", reason, f"pod {name}: {cond.get('message') or reason}")
        for cs in status.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING:
                message = waiting.get("message") or waiting["reason"]
                return Observation("Pending", waiting["reason"], f"pod {name}: {message}")
            for state in ((cs.get("state") or {}).get("terminated"), (cs.get("lastState") or {}).get("terminated")):
                if state and state.get("exitCode", 0) != 0:
                    return _terminated(name, cs.get("name", "?"), state)
    return None


def _terminated(pod: str, container: str, state: dict[str, Any]) -> Observation:
    code = state.get("exitCode")
    reason = state.get("reason") or "Error"
    detail = (state.get("message") or "").strip()
    if reason == "OOMKilled":
        return Observation(
            "Failed",
            "OOMKilled",
            f"container {container} in pod {pod} ran out of memory (exit {code}); raise resources.limits.memory "
            "or lower training.perDeviceBatchSize / cutoffLen",
        )
    text = f"container {container} in pod {pod} exited with code {code}"
    reported = _trainer_report(detail)
    if reported is not None:
        return Observation("Failed", reported[0], f"{text}: {reported[0]}: {reported[1]}")
    # Otherwise the message is the log tail (FallbackToLogsOnError); its last line usually names the error.
    head = detail.splitlines()[-1] if detail else ""
    if ":" in head and head.split(":", 1)[0].isidentifier():
        reason = head.split(":", 1)[0]
    return Observation("Failed", reason, f"{text}: {head}" if head else text)


def _trainer_report(detail: str) -> tuple[str, str] | None:
    """The trainer's termination message: JSON {"reason": ..., "message": ...} (finetune_trainer.cli)."""
    try:
        report = json.loads(detail)
    except ValueError:
        return None
    if isinstance(report, dict) and isinstance(report.get("reason"), str) and report["reason"].isidentifier():
        return report["reason"], str(report.get("message", ""))
    return None


def observe(
    child: dict[str, Any] | None, pods: list[dict[str, Any]], replicas: int, suspend_requested: bool
) -> Observation:
    """Reduce the workload (PyTorchJob or Job) and its Pods to one phase."""
    if child is None:
        return Observation("Pending", "CreatingChildren", "creating the training workload")
    conds = _conditions(child)
    kind = child.get("kind")
    if _true(conds, "Succeeded") or _true(conds, "Complete"):
        return Observation("Succeeded", "TrainingSucceeded", f"training finished on {replicas} node(s)")
    if _true(conds, "Failed"):
        failed = conds["Failed"]
        problem = pod_problem(pods)
        reason = failed.get("reason") or "Failed"
        text = f"{kind} {child['metadata']['name']}: {failed.get('message') or reason}"
        if problem is not None and problem.phase == "Failed":
            # The pod's own reason (the trainer's DataError, OOMKilled) says more than the workload's, unless the
            # pod only says "Error" and the workload knows why it gave up (BackoffLimitExceeded, DeadlineExceeded).
            if problem.reason in GENERIC_REASONS and reason not in GENERIC_REASONS:
                return Observation("Failed", reason, f"{text}; last failure: {problem.message}")
            return problem
        return Observation("Failed", reason, text)
    if suspend_requested or workload_suspended(child) or _true(conds, "Suspended"):
        if not suspend_requested and (child.get("metadata", {}).get("labels") or {}).get("kueue.x-k8s.io/queue-name"):
            return Observation("Suspended", "Queued", "waiting for Kueue to admit the workload")
        return Observation("Suspended", "Suspended", "suspended; resuming continues from the newest checkpoint")
    # Terminating pods (after a suspension, say) are on their way out and do not count as running.
    live = [
        p
        for p in pods
        if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        and not p["metadata"].get("deletionTimestamp")
    ]
    problem = pod_problem(live)
    if problem is not None and problem.phase == "Pending":
        return problem
    if not pods:
        return Observation("Pending", "WaitingForPods", f"waiting for {replicas} pod(s) to be created")
    running = [p for p in live if (p.get("status") or {}).get("phase") == "Running"]
    # Replicas that finished while the workload has not yet said Complete: training is ending, not starting over.
    finished = [
        p
        for p in pods
        if (p.get("status") or {}).get("phase") == "Succeeded" and not p["metadata"].get("deletionTimestamp")
    ]
    restarting = problem.message if problem is not None else ""
    if len(running) + len(finished) >= replicas and running:
        message = f"{replicas} node(s) training" + (f"; last restart: {restarting}" if restarting else "")
        return Observation("Running", "Training", message)
    if len(finished) >= replicas:
        return Observation("Running", "Training", f"{replicas} node(s) finished training; waiting for the workload")
    scheduled = [p for p in live if (p.get("spec") or {}).get("nodeName")]
    if live and len(scheduled) == len(live):
        return Observation("Initializing", "StartingContainers", f"{len(running)}/{replicas} pod(s) running")
    return Observation("Pending", "Scheduling", f"{len(scheduled)}/{replicas} pod(s) scheduled")


def observe_merge(merge: dict[str, Any] | None, pods: list[dict[str, Any]], target: str) -> Observation:
    """The merge Job after training: Merging until it completes, then Succeeded or Failed with the reason."""
    if merge is None:
        return Observation("Merging", "MergeStarting", f"creating the merge Job for {target}")
    conds = _conditions(merge)
    if _true(conds, "Complete"):
        return Observation("Succeeded", "Merged", f"merged model written to {target}")
    if _true(conds, "Failed"):
        problem = pod_problem(pods)
        if problem is not None and problem.phase == "Failed":
            reason = problem.reason if problem.reason not in ("Error", "Failed") else "MergeFailed"
            return Observation("Failed", reason, f"merge failed, the adapter is kept: {problem.message}")
        failed = conds["Failed"]
        return Observation("Failed", "MergeFailed", f"merge failed, the adapter is kept: {failed.get('message', '')}")
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    problem = pod_problem(live)
    if problem is not None and problem.phase == "Pending":
        return problem
    return Observation("Merging", "Merging", f"merging the adapter into the base model; writing {target}")


# Reasons under which a backend's workload cannot be created yet (finetune_operator.backends.missing).
MISSING_REASONS = ("PyTorchJobAPIMissing", "TrainJobAPIMissing", "TrainingRuntimeMissing")
# The Trainer controller could not make the TrainJob's JobSet (finetune_operator.backends.creation_failure).
CREATION_FAILED = "TrainJobResourcesCreationFailed"
# Reasons under which the children do not exist (yet): the Created condition is False.
NOT_CREATED = ("CreatingChildren", "InvalidSpec", "ChildConflict", CREATION_FAILED, *MISSING_REASONS)


def conditions(
    old: list[dict[str, Any]] | None, obs: Observation, generation: int | None, now: str
) -> list[dict[str, Any]]:
    """The operator's Kubernetes-style conditions for the phase; lastTransitionTime moves only when a status flips.
    Conditions of other writers (the trainer's) are not in the result: server-side apply leaves them alone."""
    previous = {c.get("type"): c for c in old or []}
    wanted = {
        "Created": obs.reason not in NOT_CREATED,
        "Running": obs.phase == "Running",
        "Merging": obs.phase == "Merging",
        "Succeeded": obs.phase == "Succeeded",
        "Failed": obs.phase == "Failed",
        "Suspended": obs.phase == "Suspended",
    }
    out = []
    for kind in CONDITION_TYPES:
        status = "True" if wanted[kind] else "False"
        prev = previous.get(kind) or {}
        kept = prev.get("lastTransitionTime") if prev.get("status") == status else None
        cond: dict[str, Any] = {
            "type": kind,
            "status": status,
            # Every condition carries the current reason; the message only where it explains this condition.
            "reason": obs.reason,
            "message": obs.message if status == "True" or kind == "Created" else "",
            "lastTransitionTime": kept or now,
        }
        if generation is not None:
            cond["observedGeneration"] = generation
        out.append(cond)
    return out


def operator_status(
    old_status: dict[str, Any] | None,
    obs: Observation,
    generation: int | None,
    *,
    children: list[dict[str, Any]] | None = None,
    artifacts: dict[str, Any] | None = None,
    failed_replicas: list[str] | None = None,
    backend: str | None = None,
    now: str | None = None,
) -> dict[str, Any]:
    """The operator's whole part of status for an observation. Times are set once and kept; children and artifacts
    recorded earlier are kept when this observation has none to say (server-side apply would drop an owned field
    that the next apply leaves out)."""
    now = now or now_rfc3339()
    old = old_status or {}
    out: dict[str, Any] = {
        "phase": obs.phase,
        "message": obs.message,
        "conditions": conditions(old.get("conditions"), obs, generation, now),
    }
    if generation is not None:
        out["observedGeneration"] = generation
    start = old.get("startTime") or (now if obs.phase in ("Initializing", "Running", "Merging", *TERMINAL) else None)
    if start:
        out["startTime"] = start
    done = old.get("completionTime") or (now if obs.phase in TERMINAL else None)
    if done:
        out["completionTime"] = done
    chosen = backend or old.get("backend")
    if chosen:
        out["backend"] = chosen
    refs = children if children is not None else old.get("children")
    if refs:
        out["children"] = refs
    failed = failed_replicas if failed_replicas is not None else old.get("failedReplicas")
    if failed:
        out["failedReplicas"] = failed
    kept = {k: v for k, v in (old.get("artifacts") or {}).items() if k in OPERATOR_ARTIFACTS}
    owned = {**kept, **(artifacts or {})}
    if owned:
        out["artifacts"] = owned
    return out


# The artifacts the operator reports; lossPlot is the trainer's (only it knows whether the plot was written).
OPERATOR_ARTIFACTS = ("adapter", "model", "merged")


def changed(old_status: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether applying the operator's status would change anything (avoids write storms on every event)."""
    old = dict(old_status or {})
    old["conditions"] = [c for c in old.get("conditions") or [] if c.get("type") in CONDITION_TYPES]
    old["artifacts"] = {k: v for k, v in (old.get("artifacts") or {}).items() if k in OPERATOR_ARTIFACTS} or None
    return any(old.get(k) != v for k, v in new.items())


def transient_failures(pods: list[dict[str, Any]], container: str) -> list[str]:
    """Uids of Pods whose `container` failed with a retryable exit code (128 or above): what the training operator
    restarts under restartPolicy ExitCode without counting it against backoffLimit."""
    out = []
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") != "Failed":
            continue
        for cs in status.get("containerStatuses") or []:
            code = ((cs.get("state") or {}).get("terminated") or {}).get("exitCode")
            if cs.get("name") == container and code is not None and code >= RETRYABLE_MIN:
                out.append(str(pod["metadata"]["uid"]))
    return out


# The training operator's restartPolicy ExitCode restarts exit codes 128-255 and fails on 1-127.
RETRYABLE_MIN = 128


def backoff_exceeded(failures: int, limit: int, last: str | None = None) -> Observation:
    return Observation(
        "Failed",
        "BackoffLimitExceeded",
        f"{failures} replica failure(s) that a restart could fix, more than runPolicy.backoffLimit ({limit}) allows"
        + (f" (last: {last})" if last else "")
        + "; the last checkpoint is kept, and a new FineTuneJob with the same spec resumes from it",
    )


def invalid_spec(errors: list[str]) -> Observation:
    return Observation("Failed", "InvalidSpec", "; ".join(errors))
