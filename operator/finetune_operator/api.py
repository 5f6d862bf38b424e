"""The FineTuneJob API (finetune.dev/v1alpha1): spec and status models.

The run-defining fields come from the trainer's own models (`finetune_trainer.config.RunSpec`); this module adds what
only the cluster side needs (distribution, resources, scheduling, run policy) and the status. The CRD schema in
crds/ is generated from these classes by `finetune_operator.crd`.
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from finetune_trainer.config import (
    API_GROUP,
    API_VERSION,
    MAX_LIST,
    MAX_NAME,
    Model,
    Progress,
    Resources,
    RunSpec,
    format_validation_error,
)
from finetune_trainer.config import KIND as KIND  # re-exported: the API's names, defined once in the trainer
from finetune_trainer.config import PLURAL as PLURAL
from finetune_trainer.constants import ENV_NAME_PATTERN
from finetune_trainer.rules import MUTABLE, NotOn, Raw

SHORT_NAME = "ftj"
API_VERSION_FULL = f"{API_GROUP}/{API_VERSION}"
# Children are named <name>-master-0, <name>-worker-N, <name>-N (Indexed Job pods) and a Service <name>: all must
# stay within a 63-character DNS label, hence the shorter limit.
MAX_JOB_NAME = 50
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

Phase = Literal["Pending", "Initializing", "Running", "Merging", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[str, ...] = typing.get_args(Phase)


# An extended resource name: a domain prefix, a slash and a name (Kubernetes' qualified-name syntax).
EXTENDED_RESOURCE_PATTERN = (
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


class DistributionSpec(Model):
    """How many replicas torchrun spans and which workload kind carries them."""

    backend: Literal["pytorchjob", "job", "trainjob", "auto"] = Field(
        "pytorchjob",
        description=(
            "pytorchjob (Kubeflow training operator v1), trainjob (Kubeflow Trainer v2 TrainJob on the chart's "
            "ClusterTrainingRuntime), job (built-in Indexed Job), or auto: trainjob where that API and runtime are "
            "there and the spec fits it, else pytorchjob where that API is served, else job (chosen once, recorded "
            "in status.backend)."
        ),
    )
    nodes: int = Field(1, ge=1, le=1024, description="Replicas (torchrun --nnodes).")
    procs_per_node: int = Field(1, ge=1, le=64, description="Processes per replica (torchrun --nproc_per_node).")
    master_port: int = Field(
        29500,
        ge=1024,
        le=65535,
        description="Rendezvous port on the master replica (trainjob: the torch runtime's own port, 29400).",
    )
    accelerator_resource: str | None = Field(
        None,
        max_length=MAX_NAME,
        pattern=EXTENDED_RESOURCE_PATTERN,
        description=(
            "Extended resource of the accelerators, procsPerNode of them per replica: nvidia.com/gpu, amd.com/gpu, "
            "huawei.com/Ascend910, habana.ai/gaudi, ...; default the operator's acceleratorResource setting "
            "(nvidia.com/gpu)."
        ),
    )


class Toleration(Model):
    key: str | None = Field(None, max_length=MAX_NAME)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=MAX_NAME)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class SchedulingSpec(Model):
    """Where replicas may run."""

    node_selector: dict[str, str] | None = Field(None, description="Node labels every replica requires.")
    tolerations: list[Toleration] | None = Field(None, max_length=MAX_LIST, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity, as in a Pod spec.")
    priority_class_name: str | None = Field(None, max_length=MAX_NAME, description="PriorityClass of the pods.")
    scheduler_name: str | None = Field(None, max_length=MAX_NAME, description="Scheduler, e.g. volcano.")
    queue_name: str | None = Field(
        None, max_length=63, description="Kueue LocalQueue; the child is created suspended with the queue label."
    )
    gang_scheduling: bool = Field(False, description="Ask for all replicas at once (PyTorchJob schedulingPolicy).")


class EnvVar(Model):
    name: str = Field(min_length=1, max_length=MAX_NAME, pattern=f"^{ENV_NAME_PATTERN}$")
    value: str = Field("", max_length=32768)


class ScratchSpec(Model):
    """Node-local space for the model cache and tokenized data, and the size of /dev/shm."""

    size_limit: str | None = Field(None, max_length=32, description="emptyDir size limit, e.g. 200Gi.")
    claim_name: str | None = Field(
        None,
        max_length=MAX_NAME,
        description="Use this PVC instead of an emptyDir; it outlives the node, so downloads into it are fsynced.",
    )
    shm_size: str | None = Field(None, max_length=32, description="Size limit of the memory-backed /dev/shm.")


class RunPolicy(Model):
    """Retries, deadlines and lifetime; suspend and ttlSecondsAfterFinished are the only spec fields that may change
    after creation (the operator acts on a change of either)."""

    backoff_limit: int = Field(
        3,
        ge=0,
        le=1000,
        description=(
            "How often the run restarts after a transient failure (a crash, a lost node, an exit code of 128 or "
            "above) before it counts as failed; the same on every backend. Permanent failures (bad data or "
            "config, the trainer's exit code 3) fail the run at once and are never retried."
        ),
    )
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail the run after this many seconds.")
    # Mutable: the operator reads it from the FineTuneJob whenever the job finishes or is looked at again.
    ttl_seconds_after_finished: Annotated[int | None, MUTABLE] = Field(
        None, ge=0, description="Delete the FineTuneJob this long after it finished."
    )
    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        "None", description="Pods to delete when the run ends (PyTorchJob)."
    )
    # Mutable: every reconcile sets the workload's suspension to it.
    suspend: Annotated[bool, MUTABLE] = Field(
        False, description="Suspend the run; resuming continues from the newest checkpoint."
    )


class FineTuneJobSpec(RunSpec):
    """The desired fine-tuning run."""

    distribution: DistributionSpec = Field(default_factory=DistributionSpec, description="Replicas and backend.")
    resources: Resources | None = Field(
        None,
        description=(
            "Per-replica resources; the accelerator resource (distribution.acceleratorResource) defaults to "
            "procsPerNode."
        ),
    )
    scheduling: SchedulingSpec | None = Field(None, description="Placement of the replicas.")
    image: str | None = Field(None, max_length=1024, description="Trainer image; the operator's default if empty.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: list[str] | None = Field(None, max_length=MAX_LIST, description="Pull secret names.")
    env: list[EnvVar] | None = Field(None, max_length=128, description="Extra environment (e.g. NCCL_*).")
    scratch: ScratchSpec | None = Field(None, description="Model cache volume and /dev/shm size.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Retries, deadlines, TTL, suspension.")

    # What a TrainJob cannot carry: Kubeflow Trainer's runtimePatches (v2.3) reach only labels, volumes, container
    # mounts and security, the service account and node placement; the rest is the ClusterTrainingRuntime's.
    RULES = (
        *RunSpec.RULES,
        NotOn(
            "scheduling.priorityClassName cannot be used with distribution.backend trainjob (a TrainJob cannot set "
            "its Pods' priority): use a Kueue WorkloadPriorityClass, or backend pytorchjob or job",
            "scheduling.priority_class_name",
            "distribution.backend",
            "trainjob",
        ),
        NotOn(
            "scheduling.schedulerName cannot be used with distribution.backend trainjob (the ClusterTrainingRuntime "
            "chooses the scheduler): use backend pytorchjob or job",
            "scheduling.scheduler_name",
            "distribution.backend",
            "trainjob",
        ),
        NotOn(
            "scheduling.gangScheduling cannot be used with distribution.backend trainjob (the ClusterTrainingRuntime's "
            "podGroupPolicy decides it; Kueue admits a TrainJob's Pods together): use backend pytorchjob",
            "scheduling.gang_scheduling",
            "distribution.backend",
            "trainjob",
        ),
        NotOn(
            "imagePullPolicy cannot be used with distribution.backend trainjob (the ClusterTrainingRuntime sets it: "
            "the chart's trainer.imagePullPolicy): leave it out, or use backend pytorchjob or job",
            "image_pull_policy",
            "distribution.backend",
            "trainjob",
        ),
    )

    def with_backend(self, backend: str) -> FineTuneJobSpec:
        """This spec with distribution.backend set (an override, or what `auto` chose)."""
        return self.model_copy(update={"distribution": self.distribution.model_copy(update={"backend": backend})})

    def rule_errors(self) -> list[str]:
        """What the cross-field rules (RULES) say of this spec as it stands, e.g. after with_backend."""
        return self.cross_field_errors(Raw(self.to_wire()))

    @field_validator("env")
    @classmethod
    def _no_reserved_env(cls, env: list[EnvVar] | None) -> list[EnvVar] | None:
        reserved = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FTJ_CONFIG"}
        bad = [e.name for e in env or [] if e.name in reserved]
        if bad:
            raise ValueError(f"{', '.join(bad)} is set by the operator (credentials come from storage.secretRef)")
        return env


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=None)

    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field("", max_length=1024)
    message: str = Field("", max_length=32768)
    lastTransitionTime: str | None = None  # noqa: N815 - the Kubernetes spelling
    observedGeneration: int | None = None  # noqa: N815


class CheckpointRecord(Model):
    step: int
    uri: str
    loss: float | None = None
    time: str | None = None


class Artifacts(Model):
    adapter: str | None = Field(None, description="Trained adapter (PEFT methods).")
    model: str | None = Field(None, description="Trained model (full and freeze).")
    merged: str | None = Field(None, description="Merged model.")
    loss_plot: str | None = Field(None, description="Loss plot PNG.")
    tensorboard: str | None = Field(None, description="TensorBoard event files (tensorboard --logdir on a copy).")
    samples: str | None = Field(None, description="samples.jsonl: the trained model's answers (output.samples).")


class ChildRef(Model):
    api_version: str
    kind: str
    name: str


class FineTuneJobStatus(Model):
    """What the operator and the trainer report."""

    phase: Phase | None = None
    conditions: list[Condition] | None = None
    progress: Progress | None = None
    checkpoints: list[CheckpointRecord] | None = Field(None, description="Newest first, bounded.")
    resumed_from_step: int | None = None
    artifacts: Artifacts | None = None
    sample_count: int | None = Field(None, description="Rows in artifacts.samples.")
    tracking: dict[str, str] | None = Field(
        None, description="Links to the run in the tracking services (spec.tracking.reportTo) that give one."
    )
    backend: Literal["pytorchjob", "job", "trainjob"] | None = Field(
        None, description="The backend that runs the job: distribution.backend, or what auto chose for it."
    )
    children: list[ChildRef] | None = None
    failed_replicas: list[str] | None = Field(
        None,
        max_length=1001,
        description=(
            "PyTorchJob backend: uids of replica pods that failed with a retryable exit code, counted against "
            "runPolicy.backoffLimit (the training operator does not count them under restartPolicy ExitCode)."
        ),
    )
    observed_generation: int | None = None
    start_time: str | None = None
    completion_time: str | None = None
    message: str | None = None


class ObjectMeta(BaseModel):
    """The parts of metadata that validation looks at; everything else passes through."""

    model_config = ConfigDict(extra="allow")

    name: str | None = None
    generate_name: str | None = Field(None, alias="generateName")
    namespace: str | None = None

    @field_validator("name")
    @classmethod
    def _dns_label(cls, name: str | None) -> str | None:
        if name is not None:
            if len(name) > MAX_JOB_NAME:
                raise ValueError(f"must be at most {MAX_JOB_NAME} characters (children append suffixes), got {name!r}")
            if not _DNS1035.match(name):
                raise ValueError(
                    f"must be a DNS-1035 label (lower case letters, digits, '-', starting with a letter), got {name!r}"
                )
        return name


class FineTuneJob(BaseModel):
    """A whole FineTuneJob document."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["finetune.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


def validate_document(doc: Any) -> tuple[FineTuneJob | None, list[str]]:
    """Validate one parsed document; return the object or every error, each naming its field and value."""
    if not isinstance(doc, dict):
        return None, [f"<root>: expected a mapping (a FineTuneJob object), got {type(doc).__name__}"]
    try:
        return FineTuneJob.model_validate(doc), []
    except ValidationError as exc:
        return None, format_validation_error(exc)


def validate_spec(spec: dict[str, Any]) -> tuple[FineTuneJobSpec | None, list[str]]:
    """Validate a spec as the operator receives it; errors are prefixed with `spec.`."""
    try:
        return FineTuneJobSpec.model_validate(spec), []
    except ValidationError as exc:
        return None, format_validation_error(exc, prefix="spec")
