"""Rendering: golden files for every example on every backend, plus the rules each child must follow."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api import FineTuneJobSpec, validate_document
from finetune_operator.cli import render_file
from finetune_operator.render import JobRef, children, merge_job, resources
from finetune_operator.settings import DEFAULT_ACCELERATOR_RESOURCE as GPU
from finetune_operator.settings import Settings
from finetune_operator.yamlio import dump_all

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = sorted(
    p
    for p in (ROOT / "examples").rglob("*.yaml")
    if any(isinstance(d, dict) and d.get("kind") == "FineTuneJob" for d in yaml.safe_load_all(p.read_text()))
)
BACKENDS = ("pytorchjob", "job", "trainjob")


def _fits_trainjob(path: Path) -> bool:
    return not render_file(path, "ml-team", "trainjob")[1]


# Every example on every backend, except on trainjob those using a field a TrainJob cannot carry (refused instead,
# test_examples_a_trainjob_cannot_carry_are_refused_with_the_field).
CASES = [(p, b) for p in EXAMPLES for b in BACKENDS if b != "trainjob" or _fits_trainjob(p)]


def _render(path: Path, backend: str) -> list[dict[str, Any]]:
    objects, errors = render_file(path, "ml-team", backend)
    assert errors == []
    return objects


def _job(spec_patch: dict[str, Any] | None = None) -> JobRef:
    doc = yaml.safe_load((ROOT / "examples" / "lora-7b.yaml").read_text())
    doc["spec"].update(spec_patch or {})
    job, errors = validate_document(doc)
    assert job is not None, errors
    return JobRef("demo", "ns1", job.spec)


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def _pod_templates(work: dict[str, Any]) -> list[dict[str, Any]]:
    if work["kind"] == "PyTorchJob":
        return [r["template"] for r in work["spec"]["pytorchReplicaSpecs"].values()]
    if work["kind"] == "TrainJob":
        return [_trainjob_pod(work)]
    return [work["spec"]["template"]]


def _trainjob_pod(work: dict[str, Any]) -> dict[str, Any]:
    """The pod template a TrainJob asks for: its runtime patch with spec.trainer's fields in the container (what
    the Trainer controller merges into the runtime's template; test_trainjob_backend.py sees the real Pods)."""
    (patch,) = work["spec"]["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    template = replicated["template"]["spec"]["template"]
    trainer = work["spec"]["trainer"]
    (container,) = template["spec"]["containers"]
    fields = {k: trainer[k] for k in ("image", "command", "args", "env") if k in trainer}
    if "resourcesPerNode" in trainer:
        fields["resources"] = trainer["resourcesPerNode"]
    return {**template, "spec": {**template["spec"], "containers": [{**container, **fields}]}}


@pytest.mark.parametrize(("path", "backend"), CASES, ids=[f"{p.stem}-{b}" for p, b in CASES])
def test_rendered_children_match_golden(path: Path, backend: str) -> None:
    golden = GOLDEN / f"{path.stem}.{backend}.yaml"
    text = dump_all(_render(path, backend))
    if os.environ.get("FTJ_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing: run `make golden`"
    assert text == golden.read_text(), f"{golden} differs: review the change, then `make golden`"


@pytest.mark.parametrize(("path", "backend"), CASES, ids=[f"{p.stem}-{b}" for p, b in CASES])
def test_every_pod_meets_the_restricted_standard(path: Path, backend: str) -> None:
    work = _render(path, backend)[-1]
    for template in _pod_templates(work):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert all("hostPath" not in v for v in pod["volumes"])
        assert pod["containers"][0]["name"] == ("node" if backend == "trainjob" else "pytorch")


@pytest.mark.parametrize(("path", "backend"), CASES, ids=[f"{p.stem}-{b}" for p, b in CASES])
def test_credentials_never_reach_the_configmap(path: Path, backend: str) -> None:
    objects = _by_kind(_render(path, backend))
    storage = json.loads(objects["ConfigMap"]["data"]["trainer.json"])["storage"]
    # Only where the keys are (a Secret's name and key names), never a key itself.
    assert set(storage) <= {"endpoint", "region", "addressingStyle", "secretRef"}
    assert set(storage.get("secretRef", {})) <= {"name", "accessKeyIdKey", "secretAccessKeyKey"}
    work = objects[next(k for k in ("PyTorchJob", "Job", "TrainJob") if k in objects)]
    env = _pod_templates(work)[0]["spec"]["containers"][0]["env"]
    secret_env = [e for e in env if e["name"].startswith("AWS_")]
    assert all("valueFrom" in e and "secretKeyRef" in e["valueFrom"] for e in secret_env)


def test_pytorchjob_master_and_workers_with_torchrun_from_controller_env() -> None:
    job = _job({"distribution": {"nodes": 3, "procsPerNode": 4}})
    work = children(job, Settings())[-1]
    replicas = work["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == 2
    assert work["spec"]["nprocPerNode"] == "4"
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "finetune_trainer.launch", "--torchrun"]
    assert container["args"][:5] == [
        "--nnodes=$(PET_NNODES)",
        "--nproc_per_node=$(PET_NPROC_PER_NODE)",
        "--node_rank=$(PET_NODE_RANK)",
        "--master_addr=$(PET_MASTER_ADDR)",
        "--master_port=$(PET_MASTER_PORT)",
    ]
    assert container["resources"]["limits"][GPU] == "4"
    assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 29500, "protocol": "TCP"}]
    # torchrun waits for a preemption checkpoint, and the kubelet waits longer than torchrun.
    assert "--shutdown_timeout=300" in container["args"]
    assert replicas["Worker"]["template"]["spec"]["terminationGracePeriodSeconds"] > 300


def test_single_node_pytorchjob_has_no_workers() -> None:
    work = children(_job(), Settings())[-1]
    assert list(work["spec"]["pytorchReplicaSpecs"]) == ["Master"]


def test_job_backend_sets_rank_and_master_itself() -> None:
    job = _job({"distribution": {"backend": "job", "nodes": 2, "procsPerNode": 8, "masterPort": 23456}})
    objects = children(job, Settings())
    kinds = [o["kind"] for o in objects]
    assert kinds == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Service", "Job"]
    svc, work = objects[-2], objects[-1]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    spec = work["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"] == "demo"
    assert pod["restartPolicy"] == "Never"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["PET_MASTER_ADDR"] == "demo-0.demo"
    assert env["PET_MASTER_PORT"] == "23456"
    assert env["PET_NNODES"] == "2"
    assert "--node_rank=$(JOB_COMPLETION_INDEX)" in pod["containers"][0]["args"]
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["onExitCodes"]["values"] == [3]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}


def test_kueue_queue_label_and_created_suspended() -> None:
    for backend in BACKENDS:
        job = _job({"scheduling": {"queueName": "team-a"}, "distribution": {"backend": backend}})
        work = children(job, Settings())[-1]
        assert work["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        suspended = work["spec"]["runPolicy"]["suspend"] if backend == "pytorchjob" else work["spec"]["suspend"]
        assert suspended is True


def test_run_policy_and_gang_scheduling_reach_the_pytorchjob() -> None:
    job = _job(
        {
            "runPolicy": {"backoffLimit": 7, "activeDeadlineSeconds": 3600, "cleanPodPolicy": "All"},
            "scheduling": {"gangScheduling": True, "schedulerName": "volcano", "priorityClassName": "high"},
            "distribution": {"nodes": 4},
        }
    )
    work = children(job, Settings())[-1]
    policy = work["spec"]["runPolicy"]
    assert policy["backoffLimit"] == 7
    assert policy["activeDeadlineSeconds"] == 3600
    assert policy["cleanPodPolicy"] == "All"
    assert policy["schedulingPolicy"] == {"minAvailable": 4, "priorityClass": "high"}
    pod = work["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["schedulerName"] == "volcano"
    assert pod["priorityClassName"] == "high"


def test_trainer_role_reaches_only_its_own_status() -> None:
    objects = _by_kind(children(_job(), Settings()))
    assert objects["Role"]["rules"] == [
        {
            "apiGroups": ["finetune.dev"],
            "resources": ["finetunejobs/status"],
            "resourceNames": ["demo"],
            "verbs": ["get", "patch"],
        }
    ]
    assert objects["RoleBinding"]["subjects"][0]["name"] == "demo-trainer"
    pod = objects["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["serviceAccountName"] == "demo-trainer"


def test_gpu_count_follows_procs_unless_resources_say_otherwise() -> None:
    def spec(patch: dict[str, Any]) -> FineTuneJobSpec:
        return _job(patch).spec

    assert resources(spec({"distribution": {"procsPerNode": 2}})) == {"limits": {GPU: "2"}}
    explicit = spec({"resources": {"limits": {GPU: 1, "memory": "64Gi"}}, "distribution": {"procsPerNode": 2}})
    assert resources(explicit) == {"limits": {"memory": "64Gi", GPU: "1"}}
    assert resources(spec({"resources": {"limits": {GPU: 0}}})) == {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("accelerator", ["amd.com/gpu", "huawei.com/Ascend910", "habana.ai/gaudi"])
def test_the_accelerator_resource_is_requested_per_process_on_every_backend(backend: str, accelerator: str) -> None:
    distribution = {"backend": backend, "nodes": 2, "procsPerNode": 4}
    # From the job's own field, and from the operator's setting when the job names none.
    for job, settings in (
        (_job({"distribution": {**distribution, "acceleratorResource": accelerator}}), Settings()),
        (_job({"distribution": distribution}), Settings(accelerator_resource=accelerator)),
    ):
        templates = _pod_templates(children(job, settings)[-1])
        assert len(templates) == (2 if backend == "pytorchjob" else 1)
        for container in (t["spec"]["containers"][0] for t in templates):
            assert container["resources"]["limits"] == {accelerator: "4"}, container["resources"]
            assert GPU not in json.dumps(container)


def test_an_accelerator_resource_must_be_a_qualified_extended_resource_name() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "lora-7b.yaml").read_text())
    doc["spec"]["distribution"] = {"acceleratorResource": "gpu"}
    job, errors = validate_document(doc)
    assert job is None
    assert any(e.startswith("spec.distribution.acceleratorResource") and "'gpu'" in e for e in errors), errors


@pytest.mark.parametrize("backend", ["pytorchjob", "job"])
def test_tracking_credentials_reach_the_trainer_only_as_env_from_the_secret(backend: str) -> None:
    tracking = {"reportTo": ["wandb", "mlflow"], "project": "p", "secretRef": {"name": "tracking-keys"}}
    job = _job({"tracking": tracking, "distribution": {"backend": backend, "nodes": 2}})
    objects = children(job, Settings())
    for template in _pod_templates(objects[-1]):
        (container,) = template["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "tracking-keys"}}]
    config = json.loads(_by_kind(objects)["ConfigMap"]["data"]["trainer.json"])
    assert config["tracking"] == {"reportTo": ["wandb", "mlflow"], "project": "p"}
    assert "tracking-keys" not in json.dumps(_by_kind(objects)["ConfigMap"])
    merge = merge_job(job, Settings())
    assert "envFrom" not in merge["spec"]["template"]["spec"]["containers"][0], "the merge reports to no service"


def test_volumes_shm_scratch_and_readonly_config() -> None:
    job = _job({"scratch": {"sizeLimit": "100Gi", "shmSize": "8Gi"}, "model": {"uri": "pvc://models/qwen"}})
    pod = children(job, Settings())[-1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert volumes["scratch"]["emptyDir"] == {"sizeLimit": "100Gi"}
    assert volumes["pvc-models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["config"] == {"name": "config", "mountPath": "/etc/finetune", "readOnly": True}
    assert mounts["pvc-models"]["mountPath"] == "/mnt/pvc/models"


@pytest.mark.parametrize(("scratch", "durable"), [({"sizeLimit": "100Gi"}, False), ({"claimName": "cache"}, True)])
def test_downloads_are_fsynced_only_into_a_scratch_that_outlives_its_node(
    scratch: dict[str, str], durable: bool
) -> None:
    objects = _by_kind(children(_job({"scratch": scratch}), Settings()))
    config = json.loads(objects["ConfigMap"]["data"]["trainer.json"])
    assert config["cacheDurable"] is durable


def test_user_env_passes_through_and_trainer_config_is_mounted() -> None:
    job = _job({"env": [{"name": "NCCL_DEBUG", "value": "INFO"}]})
    objects = _by_kind(children(job, Settings()))
    env = objects["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "NCCL_DEBUG", "value": "INFO"} in env
    config = json.loads(objects["ConfigMap"]["data"]["trainer.json"])
    assert config["jobName"] == "demo"
    assert config["namespace"] == "ns1"
    assert config["model"]["uri"] == "s3://models/Qwen2-7B-Instruct/"
    assert "distribution" not in config  # cluster-only fields stay out of the trainer's contract


def test_deepspeed_json_rendered_or_taken_from_the_users_configmap() -> None:
    rendered = _by_kind(children(_job({"deepspeed": {"zeroStage": 3, "offload": "all"}}), Settings()))
    ds = json.loads(rendered["ConfigMap"]["data"]["ds_config.json"])
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    custom = _by_kind(children(_job({"deepspeed": {"configMapRef": {"name": "my-ds"}}}), Settings()))
    assert "ds_config.json" not in custom["ConfigMap"]["data"]
    config = json.loads(custom["ConfigMap"]["data"]["trainer.json"])
    assert config["deepspeedConfigPath"] == "/etc/finetune/deepspeed/ds_config.json"


def test_operator_storage_defaults_fill_only_what_the_job_leaves_empty() -> None:
    settings = Settings(default_s3_endpoint="http://minio:9000", default_s3_secret="s3-default")
    plain = _job({"storage": {}})
    config = json.loads(_by_kind(children(plain, settings))["ConfigMap"]["data"]["trainer.json"])
    assert config["storage"]["endpoint"] == "http://minio:9000"
    assert config["storage"]["secretRef"]["name"] == "s3-default"
    own = _by_kind(children(_job(), settings))
    assert json.loads(own["ConfigMap"]["data"]["trainer.json"])["storage"]["secretRef"]["name"] == "s3-credentials"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_rendered_pytorchjob_loads_into_the_kubeflow_sdk(path: Path) -> None:
    from kubeflow.training import models
    from kubeflow.training.api_client import ApiClient

    work = _render(path, "pytorchjob")[-1]

    class _Response:
        data = json.dumps(work)

    job = ApiClient().deserialize(_Response(), models.KubeflowOrgV1PyTorchJob)
    assert job.spec.pytorch_replica_specs["Master"].template.spec.containers[0].name == "pytorch"
    assert job.spec.run_policy.backoff_limit == work["spec"]["runPolicy"]["backoffLimit"]
    # Nothing was dropped on the way through the SDK's models.
    roundtrip = ApiClient().sanitize_for_serialization(job)
    assert (
        roundtrip["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
        == work["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    )


def test_merge_job_runs_on_cpu_with_the_runs_storage() -> None:
    from finetune_operator.render import merge_job

    job = _job({"output": {"uri": "s3://runs/demo/", "merge": {"dtype": "fp16", "maxShardSize": "2GB"}}})
    obj = merge_job(job, Settings(trainer_image="img:1"))
    assert obj["metadata"]["name"] == "demo-merge"
    assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "merge"
    pod = obj["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[args.index("--base") + 1] == "s3://models/Qwen2-7B-Instruct/"
    assert args[args.index("--adapter") + 1] == "s3://runs/demo/"
    assert args[args.index("--output") + 1] == "s3://runs/demo/merged/"
    assert (args[args.index("--dtype") + 1], args[args.index("--max-shard-size") + 1]) == ("fp16", "2GB")
    assert GPU not in container["resources"].get("limits", {})
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {e["name"] for e in container["env"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_pvc_outputs_are_mounted_read_write_and_inputs_read_only(backend: str) -> None:
    from finetune_operator.render import merge_job

    job = _job(
        {
            "model": {"uri": "pvc://models/qwen"},
            "datasets": [{"uri": "pvc://shared/data/train.json"}],
            "output": {"uri": "pvc://runs/demo/", "merge": {"uri": "pvc://shared/merged/demo/"}},
            "distribution": {"backend": backend, "nodes": 2, "procsPerNode": 1},
        }
    )
    want = {"models": True, "runs": False, "shared": False}  # shared holds an input and an output: read-write
    for pod in [
        *(t["spec"] for t in _pod_templates(children(job, Settings())[-1])),
        merge_job(job, Settings())["spec"]["template"]["spec"],
    ]:
        volumes = {v["persistentVolumeClaim"]["claimName"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert {c: v["persistentVolumeClaim"]["readOnly"] for c, v in volumes.items()} == want
        for claim, read_only in want.items():
            mount = mounts[volumes[claim]["name"]]
            assert (mount["mountPath"], mount["readOnly"]) == (f"/mnt/pvc/{claim}", read_only)


def test_pytorchjob_replicas_restart_only_on_retryable_exit_codes() -> None:
    job = _job({"distribution": {"backend": "pytorchjob", "nodes": 3, "procsPerNode": 1}})
    replicas = children(job, Settings())[-1]["spec"]["pytorchReplicaSpecs"]
    assert {r["restartPolicy"] for r in replicas.values()} == {"ExitCode"}


def test_children_are_controlled_by_the_finetunejob_uid() -> None:
    job = _job()
    owned = JobRef(job.name, job.namespace, job.spec, uid="1234")
    for obj in children(owned, Settings()):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["uid"], ref["controller"], ref["kind"]) == ("1234", True, "FineTuneJob")
    assert all("ownerReferences" not in o["metadata"] for o in children(job, Settings()))
    (template,) = _pod_templates(children(owned, Settings())[-1])
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
    assert env["FTJ_JOB_UID"] == "1234"


def test_the_merge_job_follows_the_jobs_scheduling() -> None:
    from finetune_operator.render import merge_job

    scheduling = {
        "nodeSelector": {"pool": "ml"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "priorityClassName": "batch-low",
    }
    pod = merge_job(_job({"scheduling": scheduling}), Settings())["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "ml"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert pod["priorityClassName"] == "batch-low"


def test_the_operators_accelerator_setting_must_be_an_extended_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTJ_ACCELERATOR_RESOURCE", "huawei.com/Ascend910")
    assert Settings.from_env().accelerator_resource == "huawei.com/Ascend910"
    monkeypatch.setenv("FTJ_ACCELERATOR_RESOURCE", "gpu")
    with pytest.raises(ValueError, match=r"FTJ_ACCELERATOR_RESOURCE must be an extended resource name .* got 'gpu'"):
        Settings.from_env()


def test_trainjob_runs_on_the_configured_runtime_with_the_launcher_and_the_torch_plugins_env() -> None:
    job = _job(
        {
            "distribution": {"backend": "trainjob", "nodes": 3, "procsPerNode": 4},
            "runPolicy": {"activeDeadlineSeconds": 7200, "suspend": True},
            "scheduling": {"nodeSelector": {"pool": "h200"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]},
            "imagePullSecrets": ["registry"],
        }
    )
    objects = children(job, Settings(trainjob_runtime="team-torch"))
    assert [o["kind"] for o in objects] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "TrainJob"]
    work = objects[-1]
    assert work["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    spec = work["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "team-torch",
    }
    assert (spec["trainer"]["numNodes"], spec["trainer"]["numProcPerNode"]) == (3, 4)
    assert spec["trainer"]["resourcesPerNode"] == {"limits": {GPU: "4"}}
    assert (spec["activeDeadlineSeconds"], spec["suspend"]) == (7200, True)
    # The torch plugin owns PET_*: a TrainJob that sets one is refused by its webhook.
    assert not [e for e in spec["trainer"]["env"] if e["name"].startswith("PET_")]
    assert "--node_rank=$(PET_NODE_RANK)" in spec["trainer"]["args"]
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == "finetune.dev/finetune-operator"
    pod = _trainjob_pod(work)
    assert pod["metadata"]["labels"]["finetune.dev/job"] == "demo"
    assert pod["spec"]["serviceAccountName"] == "demo-trainer"
    assert pod["spec"]["nodeSelector"] == {"pool": "h200"}
    assert pod["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["spec"]["terminationGracePeriodSeconds"] > 300


def test_trainjob_tracking_keys_come_from_the_mounted_secret() -> None:
    tracking = {"reportTo": ["wandb"], "secretRef": {"name": "tracking-keys"}}
    work = children(_job({"tracking": tracking, "distribution": {"backend": "trainjob"}}), Settings())[-1]
    pod = _trainjob_pod(work)["spec"]
    (container,) = pod["containers"]
    assert "envFrom" not in container  # a TrainJob cannot say envFrom: the launcher reads the mounted keys
    volume = next(v for v in pod["volumes"] if v.get("secret"))
    assert volume["secret"] == {"secretName": "tracking-keys"}
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert mount["readOnly"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FTJ_SECRET_ENV_DIR"] == mount["mountPath"]


def test_examples_a_trainjob_cannot_carry_are_refused_with_the_field() -> None:
    refused = {p.stem: render_file(p, "ml-team", "trainjob")[1] for p in EXAMPLES if not _fits_trainjob(p)}
    assert list(refused) == ["full-zero3-multinode"]  # priorityClassName and gangScheduling
    (error,) = refused["full-zero3-multinode"]
    assert "scheduling.priorityClassName cannot be used with distribution.backend trainjob" in error
    assert "scheduling.gangScheduling cannot be used" in error


def test_backend_auto_is_the_operators_choice_and_is_not_rendered_offline(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "lora-7b.yaml").read_text())
    doc["spec"]["distribution"] = {"backend": "auto"}
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(doc))
    objects, errors = render_file(path, "ml-team")
    assert objects == []
    assert "distribution.backend auto is chosen by the operator" in errors[0]
    assert [o["kind"] for o in render_file(path, "ml-team", "trainjob")[0]][-1] == "TrainJob"
