"""Status mapping: what the workload and its Pods say becomes one phase with a reason a person can act on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from finetune_operator.reconcile import expire
from finetune_operator.status import Observation, changed, conditions, observe, operator_status


def pod(name: str, phase: str = "Running", node: str | None = "gpu-0", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"nodeName": node} if node else {},
        "status": {"phase": phase, **status},
    }


def child(kind: str = "PyTorchJob", conds: list[tuple[str, str]] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {"name": "demo", "labels": spec.pop("labels", {})},
        "spec": spec,
        "status": {
            "conditions": [{"type": t, "status": s, "reason": t + "Reason", "message": t} for t, s in conds or []]
        },
    }


def terminated(reason: str, code: int, message: str = "") -> dict[str, Any]:
    return {"name": "pytorch", "state": {"terminated": {"reason": reason, "exitCode": code, "message": message}}}


@pytest.mark.parametrize(
    ("workload", "pods", "phase", "reason"),
    [
        (None, [], "Pending", "CreatingChildren"),
        (child(), [], "Pending", "WaitingForPods"),
        (child(), [pod("m", "Pending", node=None)], "Pending", "Scheduling"),
        (child(), [pod("m", "Pending")], "Initializing", "StartingContainers"),
        (child(), [pod("m"), pod("w", "Pending")], "Initializing", "StartingContainers"),
        (child(), [pod("m"), pod("w")], "Running", "Training"),
        (child(conds=[("Succeeded", "True")]), [pod("m", "Succeeded")], "Succeeded", "TrainingSucceeded"),
        (child("Job", conds=[("Complete", "True")]), [], "Succeeded", "TrainingSucceeded"),
        (child("Job", conds=[("Failed", "True")]), [], "Failed", "FailedReason"),
        (child("Job", suspend=True), [], "Suspended", "Suspended"),
        (child(runPolicy={"suspend": True}), [], "Suspended", "Suspended"),
        (child(runPolicy={"suspend": True}, labels={"kueue.x-k8s.io/queue-name": "q"}), [], "Suspended", "Queued"),
    ],
)
def test_phase_from_workload_and_pods(
    workload: dict[str, Any] | None, pods: list[dict[str, Any]], phase: str, reason: str
) -> None:
    obs = observe(workload, pods, replicas=2, suspend_requested=False)
    assert (obs.phase, obs.reason) == (phase, reason)


def test_unschedulable_carries_the_schedulers_message() -> None:
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    p = pod(
        "m",
        "Pending",
        node=None,
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}],
    )
    obs = observe(child(), [p], 1, False)
    assert (obs.phase, obs.reason) == ("Pending", "Unschedulable")
    assert message in obs.message


def test_image_pull_backoff_is_reported() -> None:
    waiting = {"name": "pytorch", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull access denied"}}}
    obs = observe(child(), [pod("m", "Pending", containerStatuses=[waiting])], 1, False)
    assert (obs.phase, obs.reason) == ("Pending", "ImagePullBackOff")
    assert "pull access denied" in obs.message


def test_oomkilled_failure_names_the_pod_and_the_fix() -> None:
    failed = pod("demo-master-0", "Failed", containerStatuses=[terminated("OOMKilled", 137)])
    obs = observe(child(conds=[("Failed", "True")]), [failed], 1, False)
    assert (obs.phase, obs.reason) == ("Failed", "OOMKilled")
    assert "demo-master-0" in obs.message
    assert "resources.limits.memory" in obs.message


def test_trainer_termination_message_gives_the_reason() -> None:
    msg = "Traceback...\nDataError: /data/train.jsonl line 7: not valid JSON"
    failed = pod("demo-0", "Failed", containerStatuses=[terminated("Error", 3, msg)])
    obs = observe(child("Job", conds=[("Failed", "True")]), [failed], 1, False)
    assert (obs.phase, obs.reason) == ("Failed", "DataError")
    assert "exited with code 3" in obs.message
    assert "line 7" in obs.message


def test_trainer_json_termination_message_gives_reason_and_message() -> None:
    report = '{"reason": "InvalidConfig", "message": "spec.method.lora.target: unknown module q_projx"}'
    failed = pod("demo-0", "Failed", containerStatuses=[terminated("Error", 3, report)])
    obs = observe(child("Job", conds=[("Failed", "True")]), [failed], 1, False)
    assert (obs.phase, obs.reason) == ("Failed", "InvalidConfig")
    assert obs.message.endswith("InvalidConfig: spec.method.lora.target: unknown module q_projx")


def test_a_restart_while_running_is_mentioned_but_not_fatal() -> None:
    restarted = pod(
        "m",
        containerStatuses=[
            {
                "name": "pytorch",
                "state": {"running": {}},
                "lastState": {"terminated": {"reason": "Error", "exitCode": 1}},
            }
        ],
    )
    obs = observe(child(), [restarted], 1, False)
    assert obs.phase == "Running"
    assert "exited with code 1" in obs.message


def test_terminating_pods_do_not_count_as_running() -> None:
    leaving = pod("m")
    leaving["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert observe(child(), [leaving, pod("w")], 2, False).phase != "Running"


def test_requested_suspension_wins_over_running_pods() -> None:
    assert observe(child(), [pod("m")], 1, suspend_requested=True).phase == "Suspended"


def test_operator_status_sets_times_once_and_keeps_transition_times() -> None:
    running = Observation("Running", "Training", "1 node(s) training")
    first = operator_status({}, running, 3, now="2026-01-01T00:00:00Z")
    assert first["startTime"] == "2026-01-01T00:00:00Z"
    assert "completionTime" not in first
    assert first["observedGeneration"] == 3
    by_type = {c["type"]: c for c in first["conditions"]}
    assert by_type["Running"]["status"] == "True"
    assert by_type["Succeeded"]["status"] == "False"
    later = operator_status({**first}, running, 3, now="2026-01-01T01:00:00Z")
    # Server-side apply drops an owned field that an apply leaves out: the start time is carried, unchanged.
    assert later["startTime"] == "2026-01-01T00:00:00Z"
    assert later["conditions"] == first["conditions"]  # nothing flipped, nothing moved
    assert not changed(first, later)
    done = operator_status(
        {**first}, Observation("Succeeded", "TrainingSucceeded", "ok"), 3, now="2026-01-01T02:00:00Z"
    )
    assert done["completionTime"] == "2026-01-01T02:00:00Z"
    by_type = {c["type"]: c for c in done["conditions"]}
    assert by_type["Running"]["lastTransitionTime"] == "2026-01-01T02:00:00Z"
    assert by_type["Created"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"


def test_operator_status_keeps_its_children_and_artifacts_but_never_the_trainers() -> None:
    old = {
        "children": [{"apiVersion": "batch/v1", "kind": "Job", "name": "x"}],
        "artifacts": {"adapter": "s3://b/x/", "lossPlot": "s3://b/x/loss.png"},
        "progress": {"step": 3},
        "conditions": [{"type": "TrainerFailed", "status": "True", "reason": "DataError", "message": "line 7"}],
    }
    new = operator_status(old, Observation("Merging", "Merging", "m"), 1, artifacts={"merged": "s3://b/m/"})
    assert new["children"] == old["children"]
    assert new["artifacts"] == {"adapter": "s3://b/x/", "merged": "s3://b/m/"}
    assert "progress" not in new
    assert "TrainerFailed" not in {c["type"] for c in new["conditions"]}


def test_changed_detects_only_real_changes() -> None:
    new = {"phase": "Running", "message": "x"}
    assert not changed({"phase": "Running", "message": "x", "progress": {"step": 3}}, new)
    assert changed({"phase": "Pending"}, new)
    theirs = {"type": "TrainerFailed", "status": "True"}
    assert not changed({"conditions": [theirs]}, {"conditions": []})


def test_invalid_spec_conditions_say_not_created() -> None:
    conds = conditions(None, Observation("Failed", "InvalidSpec", "spec.x: bad"), 1, "t")
    by_type = {c["type"]: c for c in conds}
    assert by_type["Created"]["status"] == "False"
    assert by_type["Failed"]["status"] == "True"
    assert by_type["Failed"]["message"] == "spec.x: bad"


def test_ttl_expiry_only_after_the_delay() -> None:
    done = datetime(2026, 1, 1, tzinfo=UTC)
    body = {
        "metadata": {"name": "x", "namespace": "n"},
        "spec": {"runPolicy": {"ttlSecondsAfterFinished": 60}},
        "status": {"phase": "Succeeded", "completionTime": "2026-01-01T00:00:00Z"},
    }
    assert expire(body, now=done + timedelta(seconds=30)) == 30
    running = {**body, "status": {"phase": "Running"}}
    assert expire(running, now=done + timedelta(days=1)) is None


def test_merge_phases() -> None:
    from finetune_operator.status import observe_merge

    target = "s3://runs/x/merged/"
    assert observe_merge(None, [], target).phase == "Merging"
    assert observe_merge(child("Job"), [pod("m")], target).reason == "Merging"
    done = observe_merge(child("Job", conds=[("Complete", "True")]), [], target)
    assert (done.phase, done.reason) == ("Succeeded", "Merged")
    assert target in done.message
    failed_pod = pod("x-merge-abc", "Failed", containerStatuses=[terminated("Error", 3, "MergeError: shapes differ")])
    failed = observe_merge(child("Job", conds=[("Failed", "True")]), [failed_pod], target)
    assert (failed.phase, failed.reason) == ("Failed", "MergeError")
    assert "adapter is kept" in failed.message


def test_the_operators_conditions_leave_other_writers_out() -> None:
    theirs = {"type": "TrainerFailed", "status": "True", "reason": "DataError", "message": "line 7"}
    conds = conditions([theirs], Observation("Failed", "DataError", "x"), 1, "t")
    assert "TrainerFailed" not in {c["type"] for c in conds}


def test_replicas_finishing_before_the_workload_completes_stay_running() -> None:
    # Pods end one after the other, and the Job or PyTorchJob says Complete only after that: no step back.
    assert observe(child(), [pod("m", "Succeeded"), pod("w")], 2, False).phase == "Running"
    assert observe(child(), [pod("m", "Succeeded"), pod("w", "Succeeded")], 2, False).phase == "Running"


def _failed_replica(
    uid: str, owner: str, kind: str = "PyTorchJob", labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"demo-worker-{uid}",
            "namespace": "ns1",
            "uid": uid,
            "labels": {"app.kubernetes.io/component": "trainer", "finetune.dev/job": "demo", **(labels or {})},
            "ownerReferences": [{"controller": True, "uid": owner, "kind": kind}],
        },
        "status": {"phase": "Failed", "containerStatuses": [terminated("Error", 200)]},
    }


def test_failures_remembered_from_pod_events_are_forgotten_once_status_holds_them_or_the_run_ends() -> None:
    from finetune_operator import reconcile

    owner = "workload-uid-1"
    reconcile.note_pod(_failed_replica("pod-a", owner))
    reconcile.note_pod(_failed_replica("pod-b", owner))
    # Only a PyTorchJob's replicas: the Job and JobSet controllers count their own Pods' failures.
    reconcile.note_pod(_failed_replica("pod-c", "job-uid", kind="Job"))
    assert "job-uid" not in reconcile._transient
    assert reconcile._transient[owner] == {"pod-a", "pod-b"}
    reconcile.forget_transient(owner, ["pod-a"], finished=False)  # pod-b not recorded yet: kept
    assert reconcile._transient[owner] == {"pod-b"}
    reconcile.forget_transient(owner, ["pod-a", "pod-b"], finished=False)
    assert owner not in reconcile._transient
    reconcile.note_pod(_failed_replica("pod-c", owner))
    reconcile.forget_transient(owner, [], finished=True)  # a finished run needs none of them
    assert owner not in reconcile._transient


def test_failures_remembered_from_pod_events_go_with_a_job_deleted_mid_run() -> None:
    from finetune_operator import backends, reconcile

    reconcile.note_pod(_failed_replica("pod-a", "pytorchjob-uid"))
    jobset = {backends.JOBSET_UID_LABEL: "jobset-uid"}
    reconcile.note_pod(_failed_replica("pod-b", "job-uid", kind="Job", labels=jobset))
    other = _failed_replica("pod-c", "other-uid")
    other["metadata"]["labels"]["finetune.dev/job"] = "other"
    reconcile.note_pod(other)
    assert reconcile._transient["pytorchjob-uid"] == {"pod-a"}
    assert "jobset-uid" in reconcile._jobset_failures
    reconcile.forget_job("ns1", "demo")
    assert "pytorchjob-uid" not in reconcile._transient
    assert "jobset-uid" not in reconcile._jobset_failures
    assert reconcile._transient["other-uid"] == {"pod-c"}, "another job's failures stay"
    reconcile.forget_job("ns1", "other")
    assert "other-uid" not in reconcile._transient
