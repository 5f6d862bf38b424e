"""Runs that are interrupted and must still finish right: scenarios 3, 4, 5 and 7 of issue 11.

Each run checkpoints every ``saveSteps`` to MinIO; an interruption after the first checkpoint must cost at most
``saveSteps`` steps, and the status must say where the run resumed from.
"""

from __future__ import annotations

from typing import Any

from e2etest import E2E, progress_steps

# Long enough that an interruption lands between the first checkpoint and the end (a step of the tiny model takes
# about 0.05 s here: 120 steps give several seconds), short enough for the tier.
STEPS = 120
SAVE_STEPS = 20
TRAINING = {"maxSteps": STEPS, "saveSteps": SAVE_STEPS}


def output(e2e: E2E, name: str) -> dict[str, Any]:
    """The run's output without the merge step: merging is proven in test_training.py, and costs a process start."""
    return {"uri": e2e.s3.uri(f"runs/{name}/"), "checkpoints": {"keep": 2}, "merge": {"enabled": False}}


def first_checkpoint(e2e: E2E, name: str) -> int:
    """Wait until the first complete checkpoint is in status (the trainer writes it after the upload)."""

    def probe() -> int | None:
        checkpoints = e2e.status(name).get("checkpoints") or []
        return min(c["step"] for c in checkpoints) if checkpoints else None

    step: int = e2e.wait(probe, f"a first checkpoint of {name}")
    return step


def children(e2e: E2E, name: str) -> dict[str, list[str]]:
    """The objects the operator created for ``name``, by kind (to count duplicates)."""
    from kubernetes import client

    batch = client.BatchV1Api(e2e.api)
    core = e2e.core
    selector = f"finetune.dev/job={name}"
    return {
        "ConfigMap": [o.metadata.name for o in core.list_namespaced_config_map(e2e.ns, label_selector=selector).items],
        "ServiceAccount": [
            o.metadata.name for o in core.list_namespaced_service_account(e2e.ns, label_selector=selector).items
        ],
        "Job": [o.metadata.name for o in batch.list_namespaced_job(e2e.ns, label_selector=selector).items],
    }


def assert_resumed(status: dict[str, Any], checkpoint: int) -> None:
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == STEPS, status["progress"]
    resumed = status.get("resumedFromStep")
    assert resumed is not None, f"the run did not resume from a checkpoint: {status}"
    assert resumed >= checkpoint, status


def test_a_deleted_worker_pod_resumes_from_the_last_checkpoint(e2e: E2E) -> None:
    """Scenario 3 (preemption): the worker's Pod is deleted after the first checkpoint; the Job controller
    replaces it, the run resumes from a checkpoint at or after that one, and finishes."""
    name = "preempted"
    with e2e.operator():
        e2e.apply(e2e.finetunejob(name, backend="job", training=TRAINING, output=output(e2e, name)))
        checkpoint = first_checkpoint(e2e, name)
        at_deletion = e2e.status(name)["progress"]["step"]
        (worker,) = [
            p
            for p in e2e.pods(name)
            if p.metadata.annotations.get("batch.kubernetes.io/job-completion-index") == "1"
            and not p.metadata.deletion_timestamp
        ]
        e2e.kubectl.run("delete", "pod", worker.metadata.name, "--wait=false")
        status = e2e.wait_phase(name, "Succeeded", timeout=400)
    assert_resumed(status, checkpoint)
    # At most saveSteps steps are trained twice: it resumed from the newest checkpoint before the deletion.
    assert status["resumedFromStep"] >= at_deletion - SAVE_STEPS, (at_deletion, status)
    assert worker.metadata.uid not in {p.metadata.uid for p in e2e.pods(name) if not p.metadata.deletion_timestamp}


def test_an_operator_restarted_mid_training_makes_no_duplicates_and_finishes(e2e: E2E) -> None:
    """Scenario 4: the operator is stopped while the job trains and a new one takes over."""
    name = "restarted"
    watch = e2e.watch(name)
    with e2e.operator():
        e2e.apply(e2e.finetunejob(name, backend="job", training=TRAINING, output=output(e2e, name)))
        e2e.wait(lambda: (e2e.status(name).get("progress") or {}).get("step"), "training to report a step")
    before = children(e2e, name)
    step_while_down = e2e.status(name)["progress"]["step"]
    with e2e.operator():
        status = e2e.wait_phase(name, "Succeeded", timeout=400)
    watch.stop(after_phase="Succeeded")
    assert status["progress"]["step"] == STEPS
    after = children(e2e, name)
    assert before["Job"] == [name]
    assert after["ConfigMap"] == before["ConfigMap"]
    assert after["ServiceAccount"] == before["ServiceAccount"]
    assert after["Job"] == [name]
    assert len({p.metadata.name for p in e2e.pods(name)}) == 2, "a replica was started twice"
    steps = progress_steps(watch.statuses())
    assert steps[-1] == STEPS
    assert steps[-1] > step_while_down


def test_suspend_and_resume_continue_from_the_checkpoint(e2e: E2E) -> None:
    """Scenario 5: suspending after a checkpoint removes the Pods; resuming brings them back and training
    continues from the checkpoint."""
    name = "pausable"
    with e2e.operator():
        e2e.apply(e2e.finetunejob(name, backend="job", training=TRAINING, output=output(e2e, name)))
        checkpoint = first_checkpoint(e2e, name)
        e2e.kubectl.run("patch", "ftj", name, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
        suspended = "--for=jsonpath={.status.phase}=Suspended"
        e2e.kubectl.run("wait", f"ftj/{name}", suspended, "--timeout=120s", timeout=150)
        e2e.wait(lambda: not e2e.pods(name), "the suspended job's Pods to go", timeout=120)
        e2e.kubectl.run("patch", "ftj", name, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
        status = e2e.wait_phase(name, "Succeeded", timeout=400)
    assert_resumed(status, checkpoint)


def test_a_job_deleted_and_reapplied_under_its_name_uses_only_its_own_config(e2e: E2E) -> None:
    """Scenario 7: the FineTuneJob is deleted and applied again with another spec while its old children are
    still terminating: the new run trains with its own config into its own output, and resumes from nothing."""
    name = "reused"
    first = e2e.finetunejob(name, backend="job", training=TRAINING, output=output(e2e, name))
    second = e2e.finetunejob(
        name, backend="job", training={"maxSteps": 6, "saveSteps": 2}, output=output(e2e, f"{name}-second")
    )
    with e2e.operator():
        e2e.apply(first)
        first_checkpoint(e2e, name)
        old_pods = {p.metadata.uid for p in e2e.pods(name)}
        e2e.kubectl.run("delete", "ftj", name, "--wait=false")
        e2e.wait(lambda: not e2e.kubectl.run("get", "ftj", "--ignore-not-found", "-o", "name"), "the old job to go")
        e2e.apply(second)
        status = e2e.wait_phase(name, "Succeeded", timeout=400)
    assert status["progress"]["totalSteps"] == 6, status
    assert status.get("resumedFromStep") in (None, 0), status
    assert status["artifacts"]["adapter"] == e2e.s3.uri(f"runs/{name}-second/")
    new_pods = {p.metadata.uid for p in e2e.pods(name)}
    assert not (old_pods & new_pods)
    second_outputs = e2e.objects(f"runs/{name}-second/checkpoints/")
    assert any("/step-6/" in key for key in second_outputs), sorted(second_outputs)
    assert not any(f"/step-{SAVE_STEPS}/" in key for key in second_outputs), "the old run's checkpoints leaked in"
