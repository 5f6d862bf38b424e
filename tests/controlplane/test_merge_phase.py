"""After training, the Merging phase end to end: the merge Job is created with the right spec and its outcome
is reflected in status; a failed merge fails the run with the reason and leaves the adapter where it is."""

from __future__ import annotations

from typing import Any

import pytest
from ftjtest import Cluster, ftj
from kubernetes import client

from support.kwok import drive_pod
from support.processes import wait_until

pytestmark = pytest.mark.usefixtures("workloads")


def _merge_spec(name: str) -> dict[str, Any]:
    return {
        "uri": f"s3://runs/{name}/",
        "merge": {"enabled": True, "dtype": "fp16", "maxShardSize": "2GB", "resources": {"requests": {"cpu": "4"}}},
    }


def _train_to_completion(cluster: Cluster, name: str) -> None:
    for pod in cluster.wait_pods(name, 1):
        drive_pod(cluster.core, cluster.ns, pod.metadata.name, "Succeeded")


def _merge_pod(cluster: Cluster, name: str) -> client.V1Pod:
    def probe() -> client.V1Pod | None:
        pods = cluster.core.list_namespaced_pod(
            cluster.ns, label_selector=f"finetune.dev/job={name},app.kubernetes.io/component=merge"
        ).items
        running = [p for p in pods if p.status.phase == "Running"]
        return running[0] if running else None

    pod: client.V1Pod = wait_until(probe, timeout=60, what=f"the merge pod of {name}")
    return pod


def test_merge_job_runs_after_training_and_succeeds(cluster: Cluster, operator: Any) -> None:
    created = cluster.apply(ftj("merged", "job", nodes=1, output=_merge_spec("merged")))
    _train_to_completion(cluster, "merged")
    merging = cluster.wait_phase("merged", "Merging")
    assert merging["status"]["artifacts"]["adapter"] == "s3://runs/merged/"

    job = cluster.batch.read_namespaced_job("merged-merge", cluster.ns)
    assert any(r.uid == created["metadata"]["uid"] for r in job.metadata.owner_references)
    container = job.spec.template.spec.containers[0]
    assert container.command == ["python", "-m", "finetune_trainer", "merge"]
    args = container.args
    assert args[args.index("--base") + 1] == "s3://models/base/"
    assert args[args.index("--adapter") + 1] == "s3://runs/merged/"
    assert args[args.index("--output") + 1] == "s3://runs/merged/merged/"
    assert args[args.index("--dtype") + 1] == "fp16"
    assert args[args.index("--max-shard-size") + 1] == "2GB"
    assert container.resources.requests == {"cpu": "4"}
    assert "nvidia.com/gpu" not in (container.resources.limits or {})
    env = {e.name: e for e in container.env}
    assert env["AWS_SECRET_ACCESS_KEY"].value_from.secret_key_ref.name == "s3-credentials"
    assert job.spec.template.spec.security_context.run_as_non_root is True

    drive_pod(cluster.core, cluster.ns, _merge_pod(cluster, "merged").metadata.name, "Succeeded")
    done = cluster.wait_phase("merged", "Succeeded")
    assert done["status"]["artifacts"]["merged"] == "s3://runs/merged/merged/"
    assert done["status"]["artifacts"]["adapter"] == "s3://runs/merged/"
    assert done["status"]["completionTime"]
    cluster.wait_event("merged", "Merged")
    reasons = [e.reason for e in cluster.events("merged")]
    assert "Merging" in reasons or "MergeStarting" in reasons


def test_failed_merge_fails_the_run_and_keeps_the_adapter(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("unmergeable", "job", nodes=1, output=_merge_spec("unmergeable")))
    _train_to_completion(cluster, "unmergeable")
    cluster.wait_phase("unmergeable", "Merging")
    drive_pod(
        cluster.core,
        cluster.ns,
        _merge_pod(cluster, "unmergeable").metadata.name,
        "Failed",
        exit_code=3,
        reason="Error",
        message="MergeError: adapter module model.layers.0.q_proj expects 64x64, base has 32x32",
    )
    failed = cluster.wait_phase("unmergeable", "Failed")
    cond = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "MergeError"
    assert "adapter is kept" in cond["message"]
    assert "32x32" in cond["message"]
    assert failed["status"]["artifacts"]["adapter"] == "s3://runs/unmergeable/"
    assert "merged" not in failed["status"]["artifacts"]


def test_full_fine_tune_does_not_merge(cluster: Cluster, operator: Any) -> None:
    cluster.apply(ftj("full", "job", nodes=1, method={"type": "full"}, output={"uri": "s3://runs/full/"}))
    _train_to_completion(cluster, "full")
    done = cluster.wait_phase("full", "Succeeded")
    # lossPlot is the trainer's to report, once it has written the plot; these pods run no trainer.
    assert done["status"]["artifacts"] == {"model": "s3://runs/full/"}
    with pytest.raises(client.exceptions.ApiException):
        cluster.batch.read_namespaced_job("full-merge", cluster.ns)
