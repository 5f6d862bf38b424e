"""The workload kinds that carry a run's replicas, and what the reconcile needs to know of each: which API must be
served, where suspension lives, how the run's Pods are found, and which backend `auto` picks.

- pytorchjob: a Kubeflow PyTorchJob (training operator v1), Pods controlled by the PyTorchJob.
- trainjob: a Kubeflow Trainer v2 TrainJob on a ClusterTrainingRuntime; the Trainer controller makes a JobSet of the
  same name, JobSet one Indexed Job per replicated job, each Job its Pods (labelled with the JobSet's uid).
- job: the built-in Indexed Job, Pods controlled by the Job.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from finetune_operator import k8s
from finetune_operator.api import FineTuneJobSpec
from finetune_operator.render import JOB_LABEL, TRAINJOB_API
from finetune_operator.settings import Settings
from finetune_operator.status import CREATION_FAILED, SUSPEND_PATHS, Observation

KUBEFLOW_API = "kubeflow.org/v1"
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
JOBSET_UID_LABEL = "jobset.sigs.k8s.io/jobset-uid"
RUNTIME_KIND = "ClusterTrainingRuntime"

_CHOICES = (
    "set spec.distribution.backend to trainjob (Kubeflow Trainer v2), pytorchjob (Kubeflow training operator v1) "
    "or job (built-in, needs nothing installed), or auto to take the first of these the cluster has"
)
INSTALL_HINTS = {
    "pytorchjob": (
        "install the Kubeflow training operator (kubectl apply --server-side -k "
        "'github.com/kubeflow/training-operator/manifests/overlays/standalone?ref=v1.8.1')"
    ),
    "trainjob": (
        "install Kubeflow Trainer v2 (kubectl apply --server-side -k "
        "'github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v2.3.0'), then the operator's chart again "
        "(it installs the ClusterTrainingRuntime)"
    ),
}


BACKENDS = ("pytorchjob", "trainjob", "job")


def suspension_patch(workload: dict[str, Any], value: bool) -> dict[str, Any]:
    """The merge patch that sets a workload's suspension (status.SUSPEND_PATHS)."""
    patch: dict[str, Any] = {}
    node = patch
    *parents, last = ("spec", *SUSPEND_PATHS[workload["kind"]])
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return patch


def fits_trainjob(spec: FineTuneJobSpec) -> bool:
    """Whether the spec can run as a TrainJob: none of the fields a TrainJob cannot carry (FineTuneJobSpec.RULES)."""
    return not spec.with_backend("trainjob").rule_errors()


def runtime_exists(settings: Settings) -> bool:
    return k8s.get(TRAINJOB_API, RUNTIME_KIND, None, settings.trainjob_runtime) is not None


def choose(spec: FineTuneJobSpec, recorded: str | None, settings: Settings) -> str:
    """The backend of a run: the spec's, or for `auto` the one recorded in status.backend, or else the first the
    cluster has of a TrainJob (API served, runtime installed, spec fits), a PyTorchJob, and the built-in Job."""
    wanted = spec.distribution.backend
    if wanted != "auto":
        return wanted
    if recorded in BACKENDS:
        return recorded
    if k8s.served(TRAINJOB_API, "trainjobs") and fits_trainjob(spec) and runtime_exists(settings):
        return "trainjob"
    if k8s.served(KUBEFLOW_API, "pytorchjobs"):
        return "pytorchjob"
    return "job"


def missing(backend: str, settings: Settings) -> Observation | None:
    """Why the backend's workload cannot be created in this cluster (None when it can)."""
    again = f"the operator re-checks every {settings.api_recheck_seconds}s"
    if backend == "pytorchjob" and not k8s.served(KUBEFLOW_API, "pytorchjobs"):
        message = f"the PyTorchJob API ({KUBEFLOW_API}) is not served by this cluster: {INSTALL_HINTS['pytorchjob']}"
        return Observation("Pending", "PyTorchJobAPIMissing", f"{message}; or {_CHOICES}; {again}")
    if backend == "trainjob":
        if not k8s.served(TRAINJOB_API, "trainjobs"):
            message = f"the TrainJob API ({TRAINJOB_API}) is not served by this cluster: {INSTALL_HINTS['trainjob']}"
            return Observation("Pending", "TrainJobAPIMissing", f"{message}; or {_CHOICES}; {again}")
        if not runtime_exists(settings):
            message = (
                f"ClusterTrainingRuntime {settings.trainjob_runtime} does not exist: install the operator's chart "
                "with trainJobRuntime.enabled (after Kubeflow Trainer v2), or point FTJ_TRAINJOB_RUNTIME at one"
            )
            return Observation("Pending", "TrainingRuntimeMissing", f"{message}; or {_CHOICES}; {again}")
    return None


def pods(
    namespace: str, name: str, component: str, owner: dict[str, Any] | None, jobset: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The Pods of this run's workload (an earlier run's Pods, still terminating, carry the same labels): controlled
    by the workload, or for a TrainJob labelled with the uid of its JobSet (`train_jobset`)."""
    if owner is None:
        return []
    uid = owner["metadata"].get("uid")
    selector = f"{JOB_LABEL}={name},app.kubernetes.io/component={component}"
    if owner["kind"] == "TrainJob":
        if jobset is None:
            return []
        selector += f",{JOBSET_UID_LABEL}={jobset['metadata']['uid']}"
        return k8s.list_objects("v1", "Pod", namespace, selector)
    return [p for p in k8s.list_objects("v1", "Pod", namespace, selector) if k8s.controller_uid(p) == uid]


def train_jobset(trainjob: dict[str, Any]) -> dict[str, Any] | None:
    """The JobSet the Trainer controller made for this TrainJob (None until it exists, or when another owns it)."""
    meta = trainjob["metadata"]
    jobset = k8s.get(JOBSET_API, "JobSet", meta["namespace"], meta["name"])
    if jobset is None or k8s.controller_uid(jobset) != meta.get("uid"):
        return None
    return jobset


def restarts(jobset: dict[str, Any] | None) -> int:
    """How often a TrainJob's JobSet recreated its Jobs after a failure (JobSet status.restarts)."""
    return int(((jobset or {}).get("status") or {}).get("restarts") or 0)


# FineTuneJob status.progress -> TrainJob status.trainerStatus.metrics, in this order.
_METRICS = (
    ("loss", "loss"),
    ("eval_loss", "evalLoss"),
    ("learning_rate", "learningRate"),
    ("tokens_per_second", "tokensPerSecond"),
    ("epoch", "epoch"),
)


def trainer_status(progress: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer's progress as a TrainJob's status.trainerStatus (what Kubeflow Trainer's own status server
    would write): percentage, remaining seconds, metrics as strings, and the time of the report."""
    updated = progress.get("updatedAt")
    if not updated:
        return None
    out: dict[str, Any] = {"lastUpdatedTime": updated}
    total = progress.get("totalSteps")
    if total:
        out["progressPercentage"] = max(0, min(100, int(100 * (progress.get("step") or 0) / total)))
    eta = progress.get("etaSeconds")
    if eta is not None:
        out["estimatedRemainingSeconds"] = max(0, int(eta))
    metrics = [{"name": n, "value": f"{progress[k]:.6g}"} for n, k in _METRICS if progress.get(k) is not None]
    if metrics:
        out["metrics"] = metrics
    return out


def mirror_progress(trainjob: dict[str, Any], progress: dict[str, Any] | None) -> None:
    """Show the run's progress in the TrainJob's own status.trainerStatus (Trainer v2.3's field, which its controller
    leaves to whoever reports), so Kubeflow's tools see it too; written only when it changed."""
    wanted = trainer_status(progress or {})
    if wanted is None or ((trainjob.get("status") or {}).get("trainerStatus") or {}) == wanted:
        return
    meta = trainjob["metadata"]
    k8s.apply_status(
        meta["namespace"], meta["name"], {"trainerStatus": wanted}, api_version=TRAINJOB_API, kind="TrainJob"
    )


def creation_failure(trainjob: dict[str, Any], grace_seconds: float, now: datetime | None = None) -> Observation | None:
    """Why the run is not starting when the Trainer controller has not made the TrainJob's JobSet within
    `grace_seconds` (settings.jobset_grace_seconds): it creates one within a second or two, or keeps failing to and
    says why only in Warning Events on the TrainJob, to which the job's status then points. None otherwise."""
    meta = trainjob["metadata"]
    created = meta.get("creationTimestamp")
    if not created:
        return None
    age = ((now or datetime.now(UTC)) - datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds()
    if age < grace_seconds:
        return None
    message = (
        f"the Kubeflow Trainer controller has not created JobSet {meta['name']} for TrainJob {meta['name']} in "
        f"{int(age)}s: its Warning Events say why (kubectl describe trainjob {meta['name']}, reason "
        f"{CREATION_FAILED}); a broken ClusterTrainingRuntime or a JobSet webhook that refuses it are the usual causes"
    )
    return Observation("Pending", CREATION_FAILED, message)
