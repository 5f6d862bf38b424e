"""What the e2e scenarios share: the :class:`E2E` handle of one scenario (namespace, bucket, kubectl, the operator
as the Helm chart runs it, waits), the chart's RBAC install, and checks on what a run produced."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from support.kwok import FAKE_NODE_LABEL

if TYPE_CHECKING:
    from kubernetes import client

    from support.controlplane import ControlPlane
    from support.kubectl import Kubectl
    from support.nodeagent import NodeAgentProcess
    from support.operator_runner import OperatorRunner
    from support.s3 import S3Bucket

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "finetune-operator"
AGENT_NODES = ("ftj-agent-0", "ftj-agent-1")
E2E_NODE_LABEL = "ftj.test/e2e-node"
FAKE_NODE_SELECTOR = f"{FAKE_NODE_LABEL}=true"  # kwok's fake nodes (support.kwok.fake_node)
S3_SECRET = "s3-credentials"
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
JOB_LABEL = "finetune.dev/job"
# The image is never pulled: the node agent runs the command from the project's virtualenv (docs/testing.md).
IMAGE = "ghcr.io/finetune-operator/trainer:e2e-not-pulled"
MODEL_KEY = "models/tiny/"
DATA_KEY = "data/train.jsonl"


def image_env() -> dict[str, str]:
    """What the trainer image provides to its processes (trainer-image/Dockerfile's ENV, with this checkout's
    packages and virtualenv in place of /opt/venv), plus settings for this CPU-only, 2-core machine."""
    venv_bin = str(Path(sys.executable).parent)
    # Last on PATH: stand-ins for what other images carry and this machine lacks (nslookup, for the training
    # operator's init container).
    image_bin = str(REPO_ROOT / "tests" / "support" / "imagebin")
    return {
        "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{image_bin}",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "operator"), str(REPO_ROOT / "trainer-image")]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        # The machine, not the image: no GPU, no hub, one thread per process on two cores.
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


@dataclass
class ChartInstall:
    """The chart's RBAC for one watched namespace, and how the chart's Deployment would run the operator."""

    release_namespace: str
    kubeconfig: Path
    env: dict[str, str]


def install_chart_rbac(helm: Any, plane: ControlPlane, namespace: str, tmp: Path) -> ChartInstall:
    """Render the chart for ``namespace``, create its ServiceAccount, Roles and bindings, and mint the token the
    kubelet would mount into the operator's Pod (as tests/helm/test_helm_rbac.py does for the lifecycle tests)."""
    from support.helm import collection_path, only

    suffix = secrets.token_hex(3)
    release_ns = f"ftj-system-{suffix}"
    plane.create("/api/v1/namespaces", {"metadata": {"name": release_ns}})
    objects = helm.template(
        CHART, release=f"ftj-{suffix}", namespace=release_ns, values={"watchNamespaces": [namespace]}
    )
    for obj in objects:
        if obj["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
            plane.request("post", collection_path(obj), obj)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    token = plane.service_account_token(release_ns, pod["serviceAccountName"])
    env = {e["name"]: e["value"] for e in main["env"] if "value" in e}
    return ChartInstall(release_ns, plane.token_kubeconfig(token, tmp / "operator.kubeconfig"), env)


@dataclass
class E2E:
    """One scenario's world: namespace, bucket, kubectl, the operator as the chart runs it, and waits."""

    ns: str
    s3: S3Bucket
    plane: ControlPlane
    kubectl: Kubectl
    agent: NodeAgentProcess
    tmp: Path
    api: client.ApiClient
    chart: ChartInstall
    start_operator_runner: Callable[..., OperatorRunner]
    operators: int = 0
    watches: list[Any] = field(default_factory=list)

    @property
    def core(self) -> client.CoreV1Api:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    # the operator
    def operator(self) -> OperatorRunner:
        """An operator as the chart's Deployment runs it (a context manager): its ServiceAccount, its env."""
        self.operators += 1
        env = {
            **self.chart.env,
            # The scenarios' timing; namespaces, Lease and everything else stay the chart's.
            "FTJ_RESYNC_SECONDS": "2",
            "FTJ_API_RECHECK_SECONDS": "2",
            "FTJ_METRICS_PORT": "0",
            "FTJ_LEASE_SECONDS": "6",
            "POD_NAMESPACE": self.chart.release_namespace,
            "POD_NAME": f"operator-{self.operators}",
        }
        return self.start_operator_runner(kubeconfig=self.chart.kubeconfig, namespaces=[self.ns], env=env)

    # FineTuneJobs
    def finetunejob(self, name: str, *, backend: str = "job", nodes: int = 2, **spec: Any) -> dict[str, Any]:
        """A FineTuneJob over the tiny model and data in this test's bucket: LoRA, fp32 on CPU, a few steps,
        pinned to the agent Nodes; ``spec`` entries replace the defaults (``training`` is merged)."""
        from trainer.tinymodels import CPU_TRAINING

        from support.processes import free_port

        training = {**CPU_TRAINING, **spec.pop("training", {})}
        body: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "model": {"uri": self.s3.uri(MODEL_KEY)},
                "datasets": [{"uri": self.s3.uri(DATA_KEY), "format": "alpaca"}],
                "method": {"type": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target": ["all"]}},
                "training": training,
                "output": {
                    "uri": self.s3.uri(f"runs/{name}/"),
                    "checkpoints": {"keep": 2},
                    "merge": {"dtype": "fp32"},
                },
                "storage": {
                    "endpoint": self.s3.endpoint_url,
                    "region": self.s3.region,
                    "secretRef": {"name": S3_SECRET},
                },
                # Every Pod shares the machine's network (one loopback address each): no two rendezvous may
                # listen on one port, so each job gets a free one.
                "distribution": {"backend": backend, "nodes": nodes, "procsPerNode": 1, "masterPort": free_port()},
                "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"nvidia.com/gpu": 0}},
                "scheduling": {"nodeSelector": {E2E_NODE_LABEL: "true"}},
                "image": IMAGE,
                # Room for the failures an interruption causes (the deleted Pod, and its peer whose collective broke).
                "runPolicy": {"backoffLimit": 4},
            },
        }
        body["spec"].update(spec)
        return body

    def apply(self, manifest: dict[str, Any]) -> str:
        """``kubectl apply -f <file>``, as a user does; returns kubectl's output."""
        path = self.tmp / f"{manifest['metadata']['name']}-{secrets.token_hex(2)}.yaml"
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        return self.kubectl.run("apply", "-f", str(path))

    def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.kubectl.json("get", "finetunejob", name)
        return result

    def status(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        return obj.get("status") or {}

    def wait_phase(self, name: str, phase: str, timeout: float = 300) -> dict[str, Any]:
        """Wait for ``status.phase``; a terminal phase that is not the one wanted fails at once, with the status."""
        from support.processes import wait_until

        def probe() -> str | None:
            current = self.status(name).get("phase")
            return current if current == phase or current in ("Succeeded", "Failed") else None

        reached = wait_until(
            probe, timeout=timeout, what=f"FineTuneJob {name} phase {phase}", watch=[self.agent.process]
        )
        status = self.status(name)
        assert reached == phase, f"FineTuneJob {name} ended {reached}, not {phase}: {status}"
        return status

    def wait(self, probe: Callable[[], Any], what: str, timeout: float = 300) -> Any:
        """Wait for ``probe`` to return something truthy, failing at once if the node agent dies."""
        from support.processes import wait_until

        return wait_until(probe, timeout=timeout, what=what, watch=[self.agent.process])

    def pods(self, name: str, component: str = "trainer") -> list[Any]:
        selector = f"{JOB_LABEL}={name},app.kubernetes.io/component={component}"
        return list(self.core.list_namespaced_pod(self.ns, label_selector=selector).items)

    def watch(self, name: str) -> FtjWatch:
        """``kubectl get finetunejob NAME -w -o json`` in the background: every status the job passes through."""
        log = self.tmp / f"watch-{name}-{len(self.watches)}.jsonl"
        # A field selector rather than the name: the watch starts before the job exists, and sees it created.
        args = ("get", "finetunejob", f"--field-selector=metadata.name={name}", "--watch", "-o", "json")
        watch = FtjWatch(self.kubectl.watch(*args, log=log), log)
        self.watches.append(watch)
        return watch

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix`` in the test bucket, by key."""
        s3 = self.s3.client()
        out = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.s3.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = s3.get_object(Bucket=self.s3.bucket, Key=obj["Key"])["Body"].read()
        return out

    def download(self, prefix: str, target: Path) -> Path:
        for key, data in self.objects(prefix).items():
            path = target / key[len(prefix) :]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return target


@dataclass
class FtjWatch:
    """A running ``kubectl get -w``; :meth:`statuses` parses what it printed so far."""

    process: Any
    log: Path

    def objects(self) -> list[dict[str, Any]]:
        from support.kubectl import json_stream

        return list(json_stream(self.log.read_text(errors="replace")))

    def statuses(self) -> list[dict[str, Any]]:
        return [o.get("status") or {} for o in self.objects()]

    def phases(self) -> list[str]:
        """The phases in the order they were seen, without repeats."""
        out: list[str] = []
        for status in self.statuses():
            phase = status.get("phase")
            if phase and (not out or out[-1] != phase):
                out.append(phase)
        return out

    def stop(self, *, after_phase: str | None = None, timeout: float = 30) -> None:
        """Stop the watch; with ``after_phase``, first wait until it has printed that phase (the API server sends
        the event to the watch a moment after a GET already shows it, and kubectl writes it a moment later)."""
        if after_phase is not None:
            from support.processes import wait_until

            wait_until(
                lambda: after_phase in self.phases(), timeout=timeout, what=f"`kubectl get -w` to print {after_phase}"
            )
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except Exception:
                self.process.kill()
                self.process.wait(5)


def delete_and_wait(world: E2E, timeout: float = 60) -> None:
    """Delete the scenario's FineTuneJobs and wait until no Pod of the namespace runs any more, so that the next
    scenario has the machine to itself (and no process is left behind)."""
    from kubernetes.client import ApiException

    from support.processes import wait_until

    with contextlib.suppress(ApiException):
        world.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, world.ns, PLURAL)
    with contextlib.suppress(ApiException):
        world.core.delete_collection_namespaced_pod(world.ns)

    def quiet() -> bool:
        return not [
            p
            for p in world.core.list_namespaced_pod(world.ns).items
            if p.spec.node_name in AGENT_NODES and (p.status.phase or "") not in ("Succeeded", "Failed")
        ]

    wait_until(quiet, timeout=timeout, what=f"every Pod of {world.ns} stopped")


def progress_steps(statuses: list[dict[str, Any]]) -> list[int]:
    """The distinct ``status.progress.step`` values in the order they were seen."""
    steps: list[int] = []
    for status in statuses:
        step = (status.get("progress") or {}).get("step")
        if isinstance(step, int) and (not steps or steps[-1] != step):
            steps.append(step)
    return steps


def assert_merged_matches_adapter(base: Path, adapter: Path, merged: Path) -> None:
    """The merged model loads with transformers (and its tokenizer with it) and its logits equal base + adapter's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    inputs = tokenizer(["What is the capital of France?", "Add 2 and 3."], return_tensors="pt", padding=True)
    merged_model = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32).eval()
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32), adapter
    ).eval()
    with torch.no_grad():
        got = merged_model(**inputs).logits
        want = reference(**inputs).logits
        untrained = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()(**inputs).logits
    assert torch.allclose(got, want, atol=1e-4), f"max difference {(got - want).abs().max().item()}"
    assert not torch.allclose(got, untrained, atol=1e-4), "the merged model is the base model: nothing was trained"
