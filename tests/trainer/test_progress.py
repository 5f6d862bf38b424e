"""Progress reporting: rank 0 server-side applies its part of its own FineTuneJob's status on a real kube-apiserver
with a service-account token limited to that object's status, exactly as in a Pod, beside the operator's applies of
its own part; outside a cluster it only logs JSON lines."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.config import API_GROUP, API_VERSION, KIND, PLURAL
from finetune_trainer.progress import FAILURE_CONDITION, FIELD_MANAGER, ProgressReporter, StatusClient

SPEC = {
    "model": {"uri": "s3://models/tiny/"},
    "datasets": [{"uri": "s3://data/train.jsonl"}],
    "output": {"uri": "s3://runs/tiny/"},
}


def _pod_credentials(control_plane: Any, k8s_api: Any, namespace: str, job: str, tmp_path: Path) -> dict[str, str]:
    """A ServiceAccount with the Role the operator renders (get/patch finetunejobs/status of `job` only), and the
    files and env a Pod running as it would see."""
    from kubernetes import client

    core, rbac = client.CoreV1Api(k8s_api), client.RbacAuthorizationV1Api(k8s_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "trainer"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "trainer"},
            "rules": [
                {
                    "apiGroups": [API_GROUP],
                    "resources": ["finetunejobs/status"],
                    "resourceNames": [job],
                    "verbs": ["get", "patch"],
                }
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "trainer"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "trainer"},
            "subjects": [{"kind": "ServiceAccount", "name": "trainer", "namespace": namespace}],
        },
    )
    secrets = tmp_path / "serviceaccount"
    secrets.mkdir()
    (secrets / "token").write_text(control_plane.service_account_token(namespace, "trainer"))
    shutil.copyfile(control_plane.ca_cert, secrets / "ca.crt")
    (secrets / "namespace").write_text(namespace)
    host, port = control_plane.server.removeprefix("https://").rsplit(":", 1)
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "FTJ_SERVICEACCOUNT_DIR": str(secrets),
        "FTJ_JOB_NAME": job,
    }


def _create_jobs(k8s_api: Any, namespace: str, *names: str) -> None:
    from kubernetes import client

    api = client.CustomObjectsApi(k8s_api)
    for name in names:
        body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": {"name": name}, "spec": SPEC}
        api.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, body)


def _operator_apply(k8s_api: Any, namespace: str, name: str, status: dict[str, Any]) -> None:
    """What the operator does: apply its whole part of the status as field manager finetune-operator."""
    body = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "status": status,
    }
    k8s_api.call_api(
        f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status",
        "PATCH",
        query_params=[("fieldManager", "finetune-operator"), ("force", "true")],
        header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
        response_type="object",
    )


def _status(k8s_api: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client

    obj = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
    status: dict[str, Any] = obj.get("status") or {}
    return status


def _reporter(env: dict[str, str]) -> tuple[ProgressReporter, io.StringIO]:
    status = StatusClient.in_cluster("tiny", None, env)
    assert status is not None
    stream = io.StringIO()
    return ProgressReporter("tiny", status, min_interval=0.1, stream=stream), stream


RUNNING = {"type": "Running", "status": "True", "reason": "PodsRunning", "message": "2/2 replicas"}


def test_rank0_applies_progress_checkpoints_and_a_failure_into_its_own_finetunejob(
    control_plane: Any, k8s_api: Any, namespace: str, tmp_path: Path
) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    _create_jobs(k8s_api, namespace, "tiny", "neighbour")
    _operator_apply(k8s_api, namespace, "tiny", {"phase": "Running", "conditions": [RUNNING]})
    env = _pod_credentials(control_plane, k8s_api, namespace, "tiny", tmp_path)

    status = StatusClient.in_cluster("config-name-is-overridden", None, env)
    assert status is not None
    assert (status.name, status.namespace) == ("tiny", namespace)  # namespace from the token directory
    stream = io.StringIO()
    reporter = ProgressReporter("tiny", status, min_interval=0.1, stream=stream)
    reporter.resumed(3)
    for step in (4, 5):
        reporter.report(step=step, total_steps=20, epoch=step / 20, loss=2.0 / step, learning_rate=1e-4)
    reporter.report(step=5, eval_loss=0.9, tokens_per_second=1234.5, eta_seconds=60.0)
    reporter.checkpoint(5, "s3://runs/tiny/checkpoints/step-5/", 0.4)
    reporter.checkpoint(10, "s3://runs/tiny/checkpoints/step-10/", 0.2, deleted=[5])
    reporter.artifacts(adapter="s3://runs/tiny/", loss_plot="s3://runs/tiny/loss.png")
    reporter.artifacts(tensorboard="s3://runs/tiny/tensorboard/", samples="s3://runs/tiny/samples.jsonl")
    reporter.samples(4)
    reporter.tracking({"mlflow": "http://mlflow:5000/#/experiments/1/runs/abc"})
    reporter.flush()

    got = _status(k8s_api, namespace, "tiny")
    progress = got["progress"]
    assert {k: progress[k] for k in ("step", "totalSteps", "loss", "learningRate", "evalLoss", "summary")} == {
        "step": 5,
        "totalSteps": 20,
        "loss": 0.4,
        "learningRate": 1e-4,
        "evalLoss": 0.9,
        "summary": "5/20",
    }
    assert progress["tokensPerSecond"] == 1234.5
    assert progress["etaSeconds"] == 60.0
    assert progress["updatedAt"].endswith("Z")
    assert [c["step"] for c in got["checkpoints"]] == [10], "retention's deletions leave the list"
    assert got["checkpoints"][0]["uri"] == "s3://runs/tiny/checkpoints/step-10/"
    assert got["resumedFromStep"] == 3
    assert got["artifacts"] == {
        "lossPlot": "s3://runs/tiny/loss.png",
        "tensorboard": "s3://runs/tiny/tensorboard/",
        "samples": "s3://runs/tiny/samples.jsonl",
    }, "the adapter is the operator's to report"
    assert got["sampleCount"] == 4
    assert got["tracking"] == {"mlflow": "http://mlflow:5000/#/experiments/1/runs/abc"}
    assert got["phase"] == "Running", "the trainer must not touch the operator's fields"

    reporter.failure("DataError", "s3://data/train.jsonl line 7: not valid JSON")
    got = _status(k8s_api, namespace, "tiny")
    by_type = {c["type"]: c for c in got["conditions"]}
    assert by_type["Running"]["reason"] == "PodsRunning", "the operator's condition survives"
    assert by_type[FAILURE_CONDITION]["reason"] == "DataError"
    assert by_type[FAILURE_CONDITION]["message"] == "s3://data/train.jsonl line 7: not valid JSON"
    assert got["resumedFromStep"] == 3
    reporter.close()

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines][:3] == ["resumed", "progress", "progress"]
    assert lines[-1]["event"] == "failed"
    assert {"event": "artifacts", "adapter": "s3://runs/tiny/"}.items() <= lines[-5].items(), "the log has it all"
    assert [line["event"] for line in lines[-4:-1]] == ["artifacts", "samples", "tracking"]
    assert lines[-2]["mlflow"] == "http://mlflow:5000/#/experiments/1/runs/abc"

    # Each writer owns its own fields, by server-side apply.
    obj = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, PLURAL, "tiny"
    )
    status_fields = [m for m in obj["metadata"]["managedFields"] if m.get("subresource") == "status"]
    managers = {(m["manager"], m["operation"]) for m in status_fields}
    assert managers == {(FIELD_MANAGER, "Apply"), ("finetune-operator", "Apply")}

    # The token reaches this one object's status and nothing else.
    neighbour = StatusClient("neighbour", namespace, status.api_client)
    with pytest.raises(ApiException) as denied:
        neighbour.apply({"progress": {"step": 1}})
    assert denied.value.status == 403


def test_a_trainer_condition_and_the_checkpoint_list_survive_the_operators_applies(
    control_plane: Any, k8s_api: Any, namespace: str, tmp_path: Path
) -> None:
    _create_jobs(k8s_api, namespace, "tiny")
    reporter, _ = _reporter(_pod_credentials(control_plane, k8s_api, namespace, "tiny", tmp_path))
    reporter.checkpoint(4, "s3://runs/tiny/checkpoints/step-4/", 0.5)
    reporter.failure("StorageError", "s3://runs/tiny/: connection reset")

    # The operator applies its part again and again, knowing nothing of the trainer's fields.
    for phase, condition in (("Running", RUNNING), ("Failed", {"type": "Failed", "status": "True", "reason": "X"})):
        _operator_apply(k8s_api, namespace, "tiny", {"phase": phase, "conditions": [condition]})
        got = _status(k8s_api, namespace, "tiny")
        assert got["phase"] == phase
        assert {c["type"] for c in got["conditions"]} == {condition["type"], FAILURE_CONDITION}
        assert [c["step"] for c in got["checkpoints"]] == [4]

    # ...and the trainer's next apply keeps the operator's condition.
    reporter.report(step=5, total_steps=10, loss=0.4)
    reporter.flush()
    got = _status(k8s_api, namespace, "tiny")
    assert {c["type"] for c in got["conditions"]} == {"Failed", FAILURE_CONDITION}
    assert got["progress"]["step"] == 5
    reporter.close()


def test_a_restarted_trainer_keeps_the_checkpoints_and_progress_of_the_pod_before_it(
    control_plane: Any, k8s_api: Any, namespace: str, tmp_path: Path
) -> None:
    _create_jobs(k8s_api, namespace, "tiny")
    env = _pod_credentials(control_plane, k8s_api, namespace, "tiny", tmp_path)
    first, _ = _reporter(env)
    first.report(step=8, total_steps=20, loss=0.7)
    first.checkpoint(8, "s3://runs/tiny/checkpoints/step-8/", 0.7)
    first.failure("TrainerError", "NCCL watchdog timeout")
    first.close()

    # The next Pod fails before it has looked at storage: its apply must not wipe what the first one reported.
    second, _ = _reporter(env)
    second.failure("DataError", "s3://data/train.jsonl line 7: not valid JSON")
    second.close()
    got = _status(k8s_api, namespace, "tiny")
    assert [c["step"] for c in got["checkpoints"]] == [8]
    assert got["progress"]["step"] == 8
    (failed,) = [c for c in got["conditions"] if c["type"] == FAILURE_CONDITION]
    assert failed["reason"] == "DataError"

    # A Pod that resumes and trains replaces the earlier attempt's failure: the trainer is no longer failed.
    third, _ = _reporter(env)
    third.resumed(8)
    third.flush()
    third.close()
    got = _status(k8s_api, namespace, "tiny")
    assert FAILURE_CONDITION not in {c["type"] for c in got.get("conditions") or []}
    assert [c["step"] for c in got["checkpoints"]] == [8]
    assert got["resumedFromStep"] == 8


@pytest.mark.parametrize("uid_from", ["env", "first-read"])
def test_an_old_runs_trainer_never_writes_into_the_finetunejob_recreated_under_its_name(
    control_plane: Any, k8s_api: Any, namespace: str, tmp_path: Path, uid_from: str
) -> None:
    from kubernetes import client

    api = client.CustomObjectsApi(k8s_api)
    _create_jobs(k8s_api, namespace, "tiny")
    env = _pod_credentials(control_plane, k8s_api, namespace, "tiny", tmp_path)
    if uid_from == "env":  # what the operator renders
        env["FTJ_JOB_UID"] = api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, "tiny")[
            "metadata"
        ]["uid"]
    reporter, stream = _reporter(env)
    reporter.report(step=3, total_steps=20, loss=0.9)
    reporter.flush()
    assert _status(k8s_api, namespace, "tiny")["progress"]["step"] == 3

    # GitOps deletes and re-creates the job while the old Pod still runs; the operator writes the new one's status.
    api.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, "tiny")
    _create_jobs(k8s_api, namespace, "tiny")
    _operator_apply(k8s_api, namespace, "tiny", {"phase": "Pending"})
    reporter.checkpoint(5, "s3://runs/tiny/checkpoints/step-5/", 0.5)
    reporter.failure("TrainerError", "killed")
    reporter.close()

    got = _status(k8s_api, namespace, "tiny")
    assert got == {"phase": "Pending"}, "nothing of the old run lands on the new object"
    assert "failed" in [json.loads(line)["event"] for line in stream.getvalue().splitlines()], "the log still has it"


def test_outside_a_cluster_progress_is_only_logged() -> None:
    assert StatusClient.in_cluster("tiny", "default", env={}) is None
    stream = io.StringIO()
    reporter = ProgressReporter("tiny", None, stream=stream)
    reporter.report(step=1, total_steps=4, loss=3.5)
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert line["event"] == "progress"
    assert line["summary"] == "1/4"
    assert line["loss"] == 3.5


def test_in_a_cluster_without_a_mounted_token_training_goes_on_without_status(tmp_path: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443", "FTJ_JOB_NAME": "tiny"}
    env["FTJ_SERVICEACCOUNT_DIR"] = str(tmp_path / "not-mounted")
    assert StatusClient.in_cluster("tiny", "default", env) is None
