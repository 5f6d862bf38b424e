"""Render a FineTuneJob into the Kubernetes objects that run it: pure functions, spec in, dicts out, no I/O.

Children, in creation order: the trainer ConfigMap (TrainerConfig JSON and DeepSpeed JSON), a ServiceAccount with a
Role that reaches only this job's status, and the workload: a Kubeflow PyTorchJob, or an Indexed Job plus a headless
Service for clusters without the training operator. Owner references are added when the handler adopts them.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from finetune_operator.api import API_VERSION_FULL, KIND, FineTuneJobSpec
from finetune_operator.settings import DEFAULT_ACCELERATOR_RESOURCE, Settings
from finetune_trainer import schemes
from finetune_trainer.config import RunSpec, SecretRef, TrainerConfig
from finetune_trainer.constants import (
    CONFIG_DIR,
    SECRET_ENV_DIR,
    SECRET_ENV_DIR_VAR,
    SHUTDOWN_TIMEOUT,
    TRAINER_CONFIG,
)
from finetune_trainer.deepspeed import deepspeed_config

# The trainer exits with PERMANENT_EXIT_CODE for errors no restart can fix (bad data, bad config, another run's output).
from finetune_trainer.errors import PERMANENT_EXIT_CODE

CONTAINER = "pytorch"  # the Kubeflow training operator requires this container name
DEEPSPEED_FILE = "ds_config.json"
CUSTOM_DEEPSPEED_DIR = f"{CONFIG_DIR}/deepspeed"
SCRATCH = "/scratch"
JOB_LABEL = "finetune.dev/job"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
RUN_AS = 1000


def pod_security() -> dict[str, Any]:
    """The restricted Pod Security Standard at pod level, for every pod the operator creates (a fresh copy)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> dict[str, Any]:
    """The restricted Pod Security Standard at container level (a fresh copy)."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


@dataclass(frozen=True)
class JobRef:
    """The FineTuneJob being rendered: its identity and its validated spec."""

    name: str
    namespace: str
    spec: FineTuneJobSpec
    # The FineTuneJob's uid: the controller ownerReference of every child, and the run's identity in its outputs.
    uid: str = ""

    @property
    def trainer_sa(self) -> str:
        return f"{self.name}-trainer"

    @property
    def config_map(self) -> str:
        return f"{self.name}-config"


def labels(job: JobRef, component: str = "trainer") -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "finetune-trainer",
        "app.kubernetes.io/instance": job.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "finetune-operator",
        "app.kubernetes.io/managed-by": "finetune-operator",
        JOB_LABEL: job.name,
    }


def _meta(job: JobRef, name: str, component: str = "trainer", **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": job.namespace, "labels": labels(job, component), **extra}


def effective_spec(spec: FineTuneJobSpec, settings: Settings) -> FineTuneJobSpec:
    """The spec with the operator's defaults (storage, accelerator resource) filled in where the job leaves them
    empty."""
    storage = spec.storage
    update: dict[str, Any] = {}
    if storage.endpoint is None and settings.default_s3_endpoint:
        update["endpoint"] = settings.default_s3_endpoint
    if "region" not in storage.model_fields_set and settings.default_s3_region:
        update["region"] = settings.default_s3_region
    if storage.secret_ref is None and settings.default_s3_secret:
        update["secret_ref"] = SecretRef(name=settings.default_s3_secret)
    if update:
        spec = spec.model_copy(update={"storage": storage.model_copy(update=update)})
    if spec.distribution.accelerator_resource is None:
        distribution = spec.distribution.model_copy(update={"accelerator_resource": settings.accelerator_resource})
        spec = spec.model_copy(update={"distribution": distribution})
    return spec


def trainer_config(job: JobRef) -> TrainerConfig:
    """The TrainerConfig every replica reads: the run-defining part of the spec plus where things are mounted."""
    run = job.spec.model_dump(include=set(RunSpec.model_fields), by_alias=False, exclude_none=True)
    if "tracking" in run:
        run["tracking"].pop("secret_ref", None)  # the pods get its keys as env (envFrom); the trainer needs no name
    ds = job.spec.deepspeed
    ds_path = None
    if ds is not None:
        ds_path = (
            f"{CUSTOM_DEEPSPEED_DIR}/{ds.config_map_ref.key}" if ds.config_map_ref else f"{CONFIG_DIR}/{DEEPSPEED_FILE}"
        )
    return TrainerConfig.model_validate(
        {
            **run,
            "job_name": job.name,
            "namespace": job.namespace,
            "deepspeed_config_path": ds_path,
            "cache_dir": f"{SCRATCH}/cache",
            # An emptyDir scratch dies with its node, so its downloads need no fsync; a claim outlives it.
            "cache_durable": bool(job.spec.scratch and job.spec.scratch.claim_name),
        }
    )


def config_map(job: JobRef) -> dict[str, Any]:
    data = {"trainer.json": json.dumps(trainer_config(job).to_wire(), indent=2, sort_keys=True) + "\n"}
    ds = job.spec.deepspeed
    if ds is not None and ds.config_map_ref is None:
        data[DEEPSPEED_FILE] = json.dumps(deepspeed_config(ds), indent=2, sort_keys=True) + "\n"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(job, job.config_map), "data": data}


def config_hash(cm: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cm["data"], sort_keys=True).encode()).hexdigest()[:16]


def rbac(job: JobRef) -> list[dict[str, Any]]:
    """A ServiceAccount whose Role lets rank 0 read and patch this FineTuneJob's status, and nothing else."""
    sa = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(job, job.trainer_sa),
        "automountServiceAccountToken": False,
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(job, job.trainer_sa),
        "rules": [
            {
                "apiGroups": [API_VERSION_FULL.split("/")[0]],
                "resources": ["finetunejobs/status"],
                "resourceNames": [job.name],
                "verbs": ["get", "patch"],
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(job, job.trainer_sa),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": job.trainer_sa},
        "subjects": [{"kind": "ServiceAccount", "name": job.trainer_sa, "namespace": job.namespace}],
    }
    return [sa, role, binding]


def resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    """Container resources: one accelerator (distribution.acceleratorResource, nvidia.com/gpu when the spec was not
    completed by effective_spec) per process unless the spec says otherwise (0 means none)."""
    requests = dict(spec.resources.requests or {}) if spec.resources else {}
    limits = dict(spec.resources.limits or {}) if spec.resources else {}
    accelerator = spec.distribution.accelerator_resource or DEFAULT_ACCELERATOR_RESOURCE
    count = limits.get(accelerator, requests.get(accelerator, spec.distribution.procs_per_node))
    limits.pop(accelerator, None)
    requests.pop(accelerator, None)
    if str(count) not in ("0", ""):
        limits[accelerator] = count  # extended resources: the request defaults to the limit
    # Quantities go out as strings, the form the API server returns them in.
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = {k: str(v) for k, v in requests.items()}
    if limits:
        out["limits"] = {k: str(v) for k, v in limits.items()}
    return out


def _storage_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    ref = spec.storage.secret_ref
    if ref is None:
        return []
    return [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.access_key_id_key}}},
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.secret_access_key_key}},
        },
    ]


# The pod's grace period is longer than torchrun's wait for its workers, so the kubelet does not cut a preemption
# checkpoint short.
TERMINATION_GRACE = SHUTDOWN_TIMEOUT + 60
# The trainer's launcher runs torchrun with these arguments and turns its exit into one the workload can act on.
LAUNCH = ["python", "-m", "finetune_trainer.launch", "--torchrun"]


def torchrun_args(node_rank: str, master_addr: str, master_port: str, nnodes: str, nproc: str) -> list[str]:
    """torchrun's arguments; values may be $(VAR) references that the kubelet expands from the container env."""
    return [
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
        f"--node_rank={node_rank}",
        f"--master_addr={master_addr}",
        f"--master_port={master_port}",
        "--max_restarts=0",
        f"--shutdown_timeout={SHUTDOWN_TIMEOUT}",
        "-m",
        "finetune_trainer",
        "train",
        "--config",
        TRAINER_CONFIG,
    ]


def mounted_roots(spec: FineTuneJobSpec) -> dict[tuple[str, str], bool]:
    """Every (scheme, root) that a URI of the spec names and whose scheme the operator mounts (pvc:// claims, see
    finetune_trainer.schemes), with whether its mount is read-only: inputs (model, datasets) are, outputs
    (output.uri, output.merge.uri) are not; a claim used both ways is mounted once, read-write."""
    roots: dict[tuple[str, str], bool] = {}
    inputs = [spec.model.uri, *(d.uri for d in spec.datasets), *(d.uri for d in spec.eval_datasets or [])]
    outputs = [spec.output.uri, merge_uri(spec)]
    for uris, is_input in ((inputs, True), (outputs, False)):
        for uri in uris:
            scheme = schemes.scheme_of(uri)
            if scheme is not None and scheme.volume is not None:
                key = (scheme.name, schemes.split(uri)[0])
                read_only = is_input and scheme.volume.inputs_read_only
                roots[key] = roots.get(key, True) and read_only
    return roots


def _volumes(job: JobRef) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]
    spec = job.spec
    scratch = spec.scratch
    shm: dict[str, Any] = {"medium": "Memory"}
    if scratch and scratch.shm_size:
        shm["sizeLimit"] = scratch.shm_size
    if scratch and scratch.claim_name:
        scratch_volume: dict[str, Any] = {"persistentVolumeClaim": {"claimName": scratch.claim_name}}
    else:
        scratch_volume = {"emptyDir": {"sizeLimit": scratch.size_limit} if scratch and scratch.size_limit else {}}
    volumes = [
        {"name": "config", "configMap": {"name": job.config_map}},
        {"name": "dshm", "emptyDir": shm},
        {"name": "scratch", **scratch_volume},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": SCRATCH},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    ds = spec.deepspeed
    if ds is not None and ds.config_map_ref is not None:
        volumes.append({"name": "deepspeed", "configMap": {"name": ds.config_map_ref.name}})
        mounts.append({"name": "deepspeed", "mountPath": CUSTOM_DEEPSPEED_DIR, "readOnly": True})
    roots = mounted_roots(job.spec)
    for name, root in sorted(roots):
        volume, mount = schemes.mount(schemes.BY_NAME[name], root, roots[name, root])
        volumes.append(volume)
        mounts.append(mount)
    return volumes, mounts


def pod_template(
    job: JobRef, settings: Settings, args: list[str], env: list[dict[str, Any]], annotations: dict[str, str]
) -> dict[str, Any]:
    """The replica Pod: restricted security, GPUs, scratch and shm, S3 keys from the Secret, user env."""
    spec = job.spec
    volumes, mounts = _volumes(job)
    base_env = [
        {"name": "FTJ_CONFIG", "value": TRAINER_CONFIG},
        {"name": "FTJ_JOB_NAME", "value": job.name},
        {"name": "FTJ_NAMESPACE", "value": job.namespace},
        # The run's identity, recorded in its checkpoints and final manifest (absent when rendered offline).
        *([{"name": "FTJ_JOB_UID", "value": job.uid}] if job.uid else []),
        {"name": "FTJ_BACKEND", "value": spec.distribution.backend},
        {"name": "HOME", "value": f"{SCRATCH}/home"},
        {"name": "HF_HOME", "value": f"{SCRATCH}/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": spec.image_pull_policy or settings.image_pull_policy,
        "command": LAUNCH,
        "args": args,
        "env": base_env + env + _storage_env(spec) + [e.to_wire() for e in spec.env or []],
        "ports": [{"name": "pytorchjob-port", "containerPort": spec.distribution.master_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        # The trainer writes "<Reason>: <message>" to the termination log; the log tail when it could not.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security(),
    }
    if spec.tracking is not None and spec.tracking.secret_ref is not None:
        # The tracking services' keys, straight from the Secret: never in the ConfigMap, status or logs.
        container["envFrom"] = [{"secretRef": {"name": spec.tracking.secret_ref.name}}]
    res = resources(spec)
    if res:
        container["resources"] = res
    pod: dict[str, Any] = {
        "serviceAccountName": job.trainer_sa,
        "terminationGracePeriodSeconds": TERMINATION_GRACE,
        "automountServiceAccountToken": True,
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": volumes,
    }
    _schedule(pod, spec)
    return {"metadata": {"labels": labels(job), "annotations": annotations}, "spec": pod}


def _schedule(pod: dict[str, Any], spec: FineTuneJobSpec) -> None:
    """The job's scheduling constraints and pull secrets, on a training or a merge Pod (tainted or dedicated nodes
    apply to both)."""
    sched = spec.scheduling
    if sched is not None:
        if sched.node_selector:
            pod["nodeSelector"] = dict(sched.node_selector)
        if sched.tolerations:
            pod["tolerations"] = [t.to_wire() for t in sched.tolerations]
        if sched.affinity:
            pod["affinity"] = sched.affinity
        if sched.priority_class_name:
            pod["priorityClassName"] = sched.priority_class_name
        if sched.scheduler_name:
            pod["schedulerName"] = sched.scheduler_name
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]


def _queued(job: JobRef) -> bool:
    return bool(job.spec.scheduling and job.spec.scheduling.queue_name)


def _child_labels(job: JobRef) -> dict[str, str]:
    out = labels(job)
    if job.spec.scheduling and job.spec.scheduling.queue_name:
        out[QUEUE_LABEL] = job.spec.scheduling.queue_name
    return out


def pytorchjob(job: JobRef, settings: Settings, annotations: dict[str, str]) -> dict[str, Any]:
    """Kubeflow PyTorchJob: Master x1 + Worker x(nodes-1); the controller injects PET_* and MASTER_* env."""
    spec = job.spec
    dist = spec.distribution
    args = torchrun_args(
        "$(PET_NODE_RANK)", "$(PET_MASTER_ADDR)", "$(PET_MASTER_PORT)", "$(PET_NNODES)", "$(PET_NPROC_PER_NODE)"
    )
    template = pod_template(job, settings, args, [], annotations)
    # ExitCode: the training operator restarts a replica on exit codes 128-255 (the launcher's transient failures)
    # and fails the job on 1-127 (the trainer's permanent ones), as the Job backend's podFailurePolicy does.
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": template}}
    if dist.nodes > 1:
        worker = copy.deepcopy(template)
        replicas["Worker"] = {"replicas": dist.nodes - 1, "restartPolicy": "ExitCode", "template": worker}
    policy = spec.run_policy
    run_policy: dict[str, Any] = {
        "cleanPodPolicy": policy.clean_pod_policy,
        "backoffLimit": policy.backoff_limit,
        "suspend": policy.suspend or _queued(job),
    }
    if policy.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = policy.active_deadline_seconds
    sched = spec.scheduling
    if sched is not None and sched.gang_scheduling:
        gang: dict[str, Any] = {"minAvailable": dist.nodes}
        if sched.queue_name:
            gang["queue"] = sched.queue_name
        if sched.priority_class_name:
            gang["priorityClass"] = sched.priority_class_name
        run_policy["schedulingPolicy"] = gang
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": job.name, "namespace": job.namespace, "labels": _child_labels(job)},
        "spec": {"runPolicy": run_policy, "nprocPerNode": str(dist.procs_per_node), "pytorchReplicaSpecs": replicas},
    }


# Kubeflow Trainer v2: the torch plugin injects PET_* into the container named "node" of the replicated job "node".
TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"
TRAINJOB_CONTAINER = "node"
TRAINJOB_REPLICATED_JOB = "node"
# The manager of the operator's entry in a TrainJob's runtimePatches (a domain-prefixed path).
RUNTIME_PATCH_MANAGER = "finetune.dev/finetune-operator"
TRACKING_SECRET_VOLUME = "tracking-credentials"


def trainjob(job: JobRef, settings: Settings, annotations: dict[str, str]) -> dict[str, Any]:
    """Kubeflow Trainer v2: a TrainJob on the chart's ClusterTrainingRuntime (settings.trainjob_runtime), which the
    Trainer controller turns into a JobSet of one Indexed Job; its torch plugin injects PET_* as on a PyTorchJob.

    Image, command, env, node count, processes and resources go through `spec.trainer`; what the runtime template
    must carry per job (volumes and mounts, security contexts, service account, placement, labels) through one
    `runtimePatches` entry. What neither reaches is the runtime's (restart and failure policy, pull policy) or is
    refused at admission (FineTuneJobSpec.RULES).
    """
    spec = job.spec
    dist = spec.distribution
    args = torchrun_args(
        "$(PET_NODE_RANK)", "$(PET_MASTER_ADDR)", "$(PET_MASTER_PORT)", "$(PET_NNODES)", "$(PET_NPROC_PER_NODE)"
    )
    template = pod_template(job, settings, args, [], annotations)
    pod = template["spec"]
    (container,) = pod["containers"]
    env = container["env"]
    volumes, mounts = pod["volumes"], container["volumeMounts"]
    if container.pop("envFrom", None) is not None and spec.tracking is not None and spec.tracking.secret_ref:
        # A TrainJob has no envFrom: the Secret is mounted and the launcher turns its keys into variables.
        volumes.append({"name": TRACKING_SECRET_VOLUME, "secret": {"secretName": spec.tracking.secret_ref.name}})
        mounts.append({"name": TRACKING_SECRET_VOLUME, "mountPath": SECRET_ENV_DIR, "readOnly": True})
        env.append({"name": SECRET_ENV_DIR_VAR, "value": SECRET_ENV_DIR})
    trainer: dict[str, Any] = {
        "image": container["image"],
        "command": container["command"],
        "args": container["args"],
        "env": env,
        "numNodes": dist.nodes,
        "numProcPerNode": dist.procs_per_node,
    }
    if "resources" in container:
        trainer["resourcesPerNode"] = container["resources"]
    pod_patch: dict[str, Any] = {
        "serviceAccountName": pod["serviceAccountName"],
        "securityContext": pod["securityContext"],
        "terminationGracePeriodSeconds": pod["terminationGracePeriodSeconds"],
        "volumes": volumes,
        "containers": [
            {"name": TRAINJOB_CONTAINER, "volumeMounts": mounts, "securityContext": container["securityContext"]}
        ],
        **{k: pod[k] for k in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets") if k in pod},
    }
    replicated_job = {
        "name": TRAINJOB_REPLICATED_JOB,
        "template": {"spec": {"template": {"metadata": template["metadata"], "spec": pod_patch}}},
    }
    body: dict[str, Any] = {
        "runtimeRef": {
            "apiGroup": TRAINJOB_API.split("/")[0],
            "kind": "ClusterTrainingRuntime",
            "name": settings.trainjob_runtime,
        },
        "trainer": trainer,
        "runtimePatches": [
            {
                "manager": RUNTIME_PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated_job]}}},
            }
        ],
        "suspend": spec.run_policy.suspend or _queued(job),
    }
    if spec.run_policy.active_deadline_seconds:
        body["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    return {
        "apiVersion": TRAINJOB_API,
        "kind": "TrainJob",
        "metadata": {"name": job.name, "namespace": job.namespace, "labels": _child_labels(job)},
        "spec": body,
    }


def headless_service(job: JobRef) -> dict[str, Any]:
    """Stable DNS names <name>-<index>.<name> for the Indexed Job's pods, ready or not (rendezvous comes first)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, job.name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: job.name, "app.kubernetes.io/component": "trainer"},
            "ports": [{"name": "rendezvous", "port": job.spec.distribution.master_port, "protocol": "TCP"}],
        },
    }


def indexed_job(job: JobRef, settings: Settings, annotations: dict[str, str]) -> dict[str, Any]:
    """Built-in backend: an Indexed Job, node rank = completion index, master = <name>-0.<service>."""
    spec = job.spec
    dist = spec.distribution
    env = [
        {"name": "PET_NNODES", "value": str(dist.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(dist.procs_per_node)},
        {"name": "PET_MASTER_ADDR", "value": f"{job.name}-0.{job.name}"},
        {"name": "PET_MASTER_PORT", "value": str(dist.master_port)},
    ]
    args = torchrun_args(
        "$(JOB_COMPLETION_INDEX)", "$(PET_MASTER_ADDR)", "$(PET_MASTER_PORT)", "$(PET_NNODES)", "$(PET_NPROC_PER_NODE)"
    )
    template = pod_template(job, settings, args, env, annotations)
    template["spec"]["subdomain"] = job.name
    template["spec"]["restartPolicy"] = "Never"  # podFailurePolicy needs it; the Job controller replaces pods
    policy = spec.run_policy
    body: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": dist.nodes,
        "parallelism": dist.nodes,
        "backoffLimit": policy.backoff_limit,
        "suspend": policy.suspend or _queued(job),
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [PERMANENT_EXIT_CODE]},
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": template,
    }
    if policy.active_deadline_seconds:
        body["activeDeadlineSeconds"] = policy.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job.name, "namespace": job.namespace, "labels": _child_labels(job)},
        "spec": body,
    }


def workload(job: JobRef, settings: Settings, annotations: dict[str, str]) -> dict[str, Any]:
    """The object that carries the replicas (PyTorchJob, TrainJob or Job), whose status the operator follows. The
    backend is resolved by now (`auto` is the reconcile's choice, see finetune_operator.backends)."""
    backend = job.spec.distribution.backend
    if backend == "pytorchjob":
        return pytorchjob(job, settings, annotations)
    if backend == "trainjob":
        return trainjob(job, settings, annotations)
    if backend == "job":
        return indexed_job(job, settings, annotations)
    raise ValueError(f"distribution.backend {backend!r} must be resolved before rendering")


def children(job: JobRef, settings: Settings) -> list[dict[str, Any]]:
    """Every child object, in the order they must be created, each with this job's controller ownerReference."""
    job = JobRef(job.name, job.namespace, effective_spec(job.spec, settings), job.uid)
    cm = config_map(job)
    # The hash shows which configuration a running pod was started with.
    work = workload(job, settings, {"finetune.dev/config-hash": config_hash(cm)})
    out = [cm, *rbac(job)]
    if work["kind"] == "Job":
        out.append(headless_service(job))
    out.append(work)
    return [_owned(job, obj) for obj in out]


def _owned(job: JobRef, obj: dict[str, Any]) -> dict[str, Any]:
    # Owner references by hand rather than kopf.adopt: adopt also copies the owner's labels, and an Argo CD
    # tracking label copied onto children would make Argo CD prune them as strays. Rendered without a uid
    # (`ftj render`), there is no owner to name.
    if job.uid:
        obj["metadata"]["ownerReferences"] = [owner_reference(job.name, job.uid)]
    return obj


# The merge streams tensor by tensor (peak RSS ~0.7 GiB for a 1.5B model, docs/benchmarks.md): a few GiB suffice.
DEFAULT_MERGE_RESOURCES = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "16Gi"}}


def merge_uri(spec: FineTuneJobSpec) -> str:
    return spec.output.merge.uri or spec.output.uri.rstrip("/") + "/merged/"


def merge_job(job: JobRef, settings: Settings) -> dict[str, Any]:
    """The Job that merges the trained adapter into the full-precision base: same image and storage, on CPU."""
    job = JobRef(job.name, job.namespace, effective_spec(job.spec, settings), job.uid)
    spec = job.spec
    merge = spec.output.merge
    volumes, mounts = _volumes(job)
    volumes = [v for v in volumes if v["name"] != "dshm"]
    mounts = [m for m in mounts if m["name"] != "dshm"]
    res = merge.resources.to_wire() if merge.resources else DEFAULT_MERGE_RESOURCES
    container: dict[str, Any] = {
        "name": "merge",
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": spec.image_pull_policy or settings.image_pull_policy,
        "command": ["python", "-m", "finetune_trainer", "merge"],
        "args": [
            *("--config", TRAINER_CONFIG),
            *("--base", spec.model.uri),
            *("--adapter", spec.output.uri),
            *("--output", merge_uri(spec)),
            *("--dtype", merge.dtype),
            *("--max-shard-size", merge.max_shard_size),
        ],
        "env": [
            {"name": "HOME", "value": f"{SCRATCH}/home"},
            {"name": "HF_HOME", "value": f"{SCRATCH}/hf"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *_storage_env(spec),
        ],
        "resources": {k: {n: str(q) for n, q in v.items()} for k, v in res.items()},
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security(),
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the merge never talks to the API
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": volumes,
    }
    _schedule(pod, spec)
    return _owned(
        job,
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": _meta(job, f"{job.name}-merge", component="merge"),
            "spec": {
                "backoffLimit": 1,
                "podFailurePolicy": {
                    "rules": [
                        {
                            "action": "FailJob",
                            "onExitCodes": {
                                "containerName": "merge",
                                "operator": "In",
                                "values": [PERMANENT_EXIT_CODE],
                            },
                        }
                    ]
                },
                "template": {"metadata": {"labels": labels(job, "merge")}, "spec": pod},
            },
        },
    )


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION_FULL,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
