"""Operator settings, read once from environment variables (each documented with its default below)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from finetune_operator.api import EXTENDED_RESOURCE_PATTERN

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0"
DEFAULT_ACCELERATOR_RESOURCE = "nvidia.com/gpu"
DEFAULT_TRAINJOB_RUNTIME = "finetune-torch"


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"environment variable {name} must be true or false, got {raw!r}")
    return raw in ("1", "true", "yes")


def _accelerator_resource() -> str:
    raw = os.environ.get("FTJ_ACCELERATOR_RESOURCE", "").strip() or DEFAULT_ACCELERATOR_RESOURCE
    if not re.match(EXTENDED_RESOURCE_PATTERN, raw):
        raise ValueError(
            f"environment variable FTJ_ACCELERATOR_RESOURCE must be an extended resource name such as amd.com/gpu, "
            f"got {raw!r}"
        )
    return raw


@dataclass(frozen=True)
class Settings:
    """Everything the operator takes from its environment; render functions receive it explicitly."""

    # FTJ_TRAINER_IMAGE: image for training replicas and merge Jobs when a FineTuneJob names none.
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    # FTJ_IMAGE_PULL_POLICY: pull policy when a FineTuneJob names none (IfNotPresent).
    image_pull_policy: str = "IfNotPresent"
    # FTJ_WATCH_NAMESPACES: comma-separated namespaces to watch; empty means the whole cluster.
    watch_namespaces: tuple[str, ...] = ()
    # FTJ_RESYNC_SECONDS: how often every FineTuneJob's status is recomputed even without events (30).
    resync_seconds: int = 30
    # FTJ_API_RECHECK_SECONDS: how often a job waiting for its backend's API (or runtime) re-checks it (60).
    api_recheck_seconds: int = 60
    # FTJ_DEFAULT_S3_ENDPOINT / FTJ_DEFAULT_S3_SECRET / FTJ_DEFAULT_S3_REGION: storage defaults for jobs without them.
    default_s3_endpoint: str | None = None
    default_s3_secret: str | None = None
    default_s3_region: str | None = None
    # FTJ_ACCELERATOR_RESOURCE: the extended resource a FineTuneJob's replicas request per process when its
    # distribution.acceleratorResource is empty (nvidia.com/gpu; amd.com/gpu, huawei.com/Ascend910, ...).
    accelerator_resource: str = DEFAULT_ACCELERATOR_RESOURCE
    # FTJ_TRAINJOB_RUNTIME: the ClusterTrainingRuntime a TrainJob (backend trainjob) runs on; the chart installs
    # it (finetune-torch).
    trainjob_runtime: str = DEFAULT_TRAINJOB_RUNTIME
    # FTJ_JOBSET_GRACE_SECONDS: how long a TrainJob may be without its JobSet before the FineTuneJob says the Trainer
    # controller could not create it (30).
    jobset_grace_seconds: int = 30
    # FTJ_HEALTH_PORT: port of the /healthz liveness endpoint (8080).
    health_port: int = 8080
    # FTJ_METRICS_PORT: port of the Prometheus /metrics endpoint (9090; 0 disables it).
    metrics_port: int = 9090
    # FTJ_LEADER_ELECTION: only the replica holding the Lease acts (true).
    leader_election: bool = True
    # FTJ_LEASE_NAME / FTJ_LEASE_NAMESPACE: the coordination.k8s.io Lease used for leader election.
    lease_name: str = "finetune-operator-leader"
    lease_namespace: str = "default"
    # FTJ_LEASE_SECONDS: a leader that has not renewed for this long is replaced (15).
    lease_seconds: int = 15

    @classmethod
    def from_env(cls) -> Settings:
        namespaces = tuple(n.strip() for n in os.environ.get("FTJ_WATCH_NAMESPACES", "").split(",") if n.strip())
        pod_namespace = os.environ.get("POD_NAMESPACE", "").strip()
        return cls(
            trainer_image=os.environ.get("FTJ_TRAINER_IMAGE", "").strip() or DEFAULT_TRAINER_IMAGE,
            image_pull_policy=os.environ.get("FTJ_IMAGE_PULL_POLICY", "").strip() or "IfNotPresent",
            watch_namespaces=namespaces,
            resync_seconds=_int("FTJ_RESYNC_SECONDS", 30),
            api_recheck_seconds=_int("FTJ_API_RECHECK_SECONDS", 60),
            default_s3_endpoint=os.environ.get("FTJ_DEFAULT_S3_ENDPOINT") or None,
            default_s3_secret=os.environ.get("FTJ_DEFAULT_S3_SECRET") or None,
            default_s3_region=os.environ.get("FTJ_DEFAULT_S3_REGION") or None,
            accelerator_resource=_accelerator_resource(),
            trainjob_runtime=os.environ.get("FTJ_TRAINJOB_RUNTIME", "").strip() or DEFAULT_TRAINJOB_RUNTIME,
            jobset_grace_seconds=_int("FTJ_JOBSET_GRACE_SECONDS", 30),
            health_port=_int("FTJ_HEALTH_PORT", 8080),
            metrics_port=_int("FTJ_METRICS_PORT", 9090),
            leader_election=_bool("FTJ_LEADER_ELECTION", True),
            lease_name=os.environ.get("FTJ_LEASE_NAME", "").strip() or "finetune-operator-leader",
            lease_namespace=os.environ.get("FTJ_LEASE_NAMESPACE", "").strip() or pod_namespace or "default",
            lease_seconds=_int("FTJ_LEASE_SECONDS", 15),
        )
