"""FineTuneJobs that train and merge for real: the rendered Pods run the trainer, rank 0 reports progress with the
Pod's own ServiceAccount, the merge Job writes a merged model to MinIO, and status ends Succeeded.

Scenario numbers refer to issue 11.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from e2etest import AGENT_NODES, E2E, assert_merged_matches_adapter, progress_steps


def age_seconds(age: str) -> int:
    """kubectl's Age column (``45s``, ``2m3s``, ``1h``) in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(number) * units[unit] for number, unit in re.findall(r"(\d+)([smhd])", age))


def _subsequence(wanted: list[str], seen: list[str]) -> bool:
    it = iter(seen)
    return all(phase in it for phase in wanted)


def run_to_success(
    e2e: E2E, manifest: dict[str, Any], *, loss_moves: bool = False, timeout: float = 300
) -> dict[str, Any]:
    """Apply with kubectl, watch it with ``kubectl get -w``, and wait for Succeeded; return the final status.

    ``loss_moves``: the watch must see the loss change while the job runs. Rank 0 patches status at most every
    5 s, so this needs a run that trains for longer than that."""
    name = manifest["metadata"]["name"]
    watch = e2e.watch(name)
    assert "created" in e2e.apply(manifest)
    # While it trains, the table a user looks at shows the step moving.
    e2e.wait(
        lambda: re.search(rf"^{name}\s+Running\s+[1-9]\d*/\d+", e2e.kubectl.run("get", "ftj", name), re.MULTILINE),
        f"`kubectl get ftj {name}` to show Running with a step",
    )
    status = e2e.wait_phase(name, "Succeeded", timeout=timeout)
    watch.stop(after_phase="Succeeded")
    phases = watch.phases()
    assert _subsequence(["Running", "Merging", "Succeeded"], phases), phases
    steps = progress_steps(watch.statuses())
    assert len(steps) >= 2, f"progress was seen at one step only: {steps}"
    assert steps == sorted(steps), f"progress went backwards: {steps}"
    if loss_moves:
        losses = [(s.get("progress") or {}).get("loss") for s in watch.statuses()]
        assert len(set(losses) - {None}) >= 2, f"the loss in status never changed: {losses}"
    return {**status, "phasesSeen": phases}


def assert_forward_only(phases: list[str]) -> None:
    """Once training runs, the job never looks as if it were starting again (checked last in each scenario, so
    that a failure here comes after everything else was proven)."""
    after_running = phases[phases.index("Running") :]
    assert set(after_running) <= {"Running", "Merging", "Succeeded"}, f"phases went backwards: {phases}"


@pytest.mark.parametrize(
    "backend",
    [
        # Scenario 1: the Kubeflow training operator completes the Pods (PET_* env, the master Service).
        pytest.param("pytorchjob", id="pytorchjob"),
        # The built-in backend: an Indexed Job plus a headless Service, node rank = completion index.
        pytest.param("job", id="job"),
        # Kubeflow Trainer v2: a TrainJob on the chart's runtime, JobSet's Indexed Job, the torch plugin's PET_*.
        pytest.param("trainjob", id="trainjob"),
    ],
)
def test_lora_on_two_nodes_from_kubectl_apply_to_a_merged_model(
    e2e: E2E, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "trainjob":
        request.getfixturevalue("trainjob_runtime")  # Trainer v2 and JobSet, and the chart's ClusterTrainingRuntime
    name = f"lora-{backend}"
    # Enough steps (about 0.05 s each here) for several status updates while it trains.
    manifest = e2e.finetunejob(name, backend=backend, nodes=2, training={"maxSteps": 160, "saveSteps": 80})
    with e2e.operator():
        status = run_to_success(e2e, manifest, loss_moves=True)

    # Both replicas ran, one on each agent Node's capacity, with the rendered command and env.
    pods = e2e.pods(name)
    assert len({p.metadata.name for p in pods}) >= 2
    assert {p.spec.node_name for p in pods} <= set(AGENT_NODES)
    assert status["backend"] == backend
    if backend == "trainjob":  # the trainer's progress also reached the TrainJob's own status
        tj = e2e.kubectl.json("get", "trainjob", name)
        assert tj["status"]["trainerStatus"]["progressPercentage"] == 100, tj["status"]
        assert {m["name"] for m in tj["status"]["trainerStatus"]["metrics"]} >= {"loss"}
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 160
    assert status["artifacts"]["merged"] == e2e.s3.uri(f"runs/{name}/merged/")
    assert [c["step"] for c in status["checkpoints"]][:2] == [160, 80]

    # The merged model in MinIO loads with transformers and computes what base + adapter computes.
    merged = e2e.download(f"runs/{name}/merged/", tmp_path / "merged")
    adapter = e2e.download(f"runs/{name}/", tmp_path / "adapter")
    base = e2e.download("models/tiny/", tmp_path / "base")
    assert_merged_matches_adapter(base, adapter, merged)

    # `kubectl describe` lists the job's Events in the order they happened.
    # (kubectl orders them by time, to the second: events of one second may come in any order.)
    events = e2e.kubectl.run("describe", "ftj", name).split("Events:", 1)[1]
    rows = [line.split(None, 4) for line in events.strip().splitlines()[2:] if line.strip()]
    ages = [age_seconds(row[2]) for row in rows]
    assert ages == sorted(ages, reverse=True), f"Events out of order:{events}"
    first_seen = {}
    for row, age in zip(rows, ages, strict=True):
        first_seen.setdefault(row[1], age)
    milestones = [first_seen.get(reason) for reason in ("ChildrenCreated", "Training", "Merged")]
    assert None not in milestones, f"Events:{events}"
    assert milestones == sorted(milestones, reverse=True), f"Events:{events}"
    assert_forward_only(status["phasesSeen"])


SYSTEM = "You are a terse assistant."
TOOLS = [{"name": "get_weather", "description": "Weather of a city", "parameters": {"city": {"type": "string"}}}]


def sharegpt_rows(n: int) -> list[dict[str, Any]]:
    """Conversations with a system prompt, and every other one with a tool call and its result."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        if i % 2:
            call = {"name": "get_weather", "arguments": {"city": "Berlin"}}
            turns = [
                {"from": "human", "value": "Weather in Berlin?"},
                {"from": "function_call", "value": json.dumps(call)},
                {"from": "observation", "value": "sunny, 21 degrees"},
                {"from": "gpt", "value": "It is sunny."},
            ]
            rows.append({"conversations": turns, "system": SYSTEM, "tools": json.dumps(TOOLS)})
        else:
            turns = [{"from": "human", "value": "Add 2 and 3."}, {"from": "gpt", "value": "The answer is 5."}]
            rows.append({"conversations": turns, "system": SYSTEM})
    return rows


def test_qlora_on_sharegpt_with_system_prompts_and_tool_calls(e2e: E2E, tmp_path: Path) -> None:
    """Scenario 2: the Job backend, 2 nodes, a sharegpt dataset with system prompts and tool calls, QLoRA
    (bitsandbytes 4-bit on CPU); the adapter merges into the full-precision base."""
    body = "".join(json.dumps(row) + "\n" for row in sharegpt_rows(32))
    e2e.s3.client().put_object(Bucket=e2e.s3.bucket, Key="data/tools.jsonl", Body=body)
    name = "qlora-tools"
    manifest = e2e.finetunejob(
        name,
        backend="job",
        datasets=[{"uri": e2e.s3.uri("data/tools.jsonl"), "format": "sharegpt"}],
        template="auto",
        method={
            "type": "qlora",
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target": ["all"]},
            "quantization": {"bits": 4, "type": "nf4", "doubleQuant": True},
        },
        training={"cutoffLen": 128},
    )
    with e2e.operator():
        status = run_to_success(e2e, manifest)
    assert status["progress"]["step"] == 6
    merged = e2e.download(f"runs/{name}/merged/", tmp_path / "merged")
    adapter = e2e.download(f"runs/{name}/", tmp_path / "adapter")
    base = e2e.download("models/tiny/", tmp_path / "base")
    assert_merged_matches_adapter(base, adapter, merged)
    assert_forward_only(status["phasesSeen"])


def test_pvc_output_receives_checkpoints_adapter_and_merged_model(e2e: E2E) -> None:
    """Scenario 8: output on a PersistentVolumeClaim (pvc://) with the Job backend: the claim is mounted
    read-write in the trainer and merge Pods, and everything lands in it."""
    claim = "outputs"
    directory = e2e.agent.claim_dir(e2e.ns, claim)
    directory.mkdir(parents=True, exist_ok=True)
    pv = f"{e2e.ns}-{claim}"
    e2e.plane.create(
        "/api/v1/persistentvolumes",
        {
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                # The node agent keeps every claim's data in this directory; the PV says so.
                "hostPath": {"path": str(directory), "type": "Directory"},
                "claimRef": {"namespace": e2e.ns, "name": claim},
            },
        },
    )
    e2e.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": e2e.ns},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
    )
    e2e.wait(
        lambda: e2e.core.read_namespaced_persistent_volume_claim(claim, e2e.ns).status.phase == "Bound",
        f"PersistentVolumeClaim {claim} Bound",
        timeout=60,
    )
    name = "lora-pvc"
    manifest = e2e.finetunejob(
        name,
        backend="job",
        output={"uri": f"pvc://{claim}/runs/{name}/", "checkpoints": {"keep": 2}, "merge": {"dtype": "fp32"}},
    )
    with e2e.operator():
        status = run_to_success(e2e, manifest)
    run = directory / "runs" / name
    assert status["artifacts"]["merged"] == f"pvc://{claim}/runs/{name}/merged/"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-6"]
    assert (run / "adapter_config.json").is_file()
    base = e2e.download("models/tiny/", e2e.tmp / "base")
    assert_merged_matches_adapter(base, run, run / "merged")
    assert_forward_only(status["phasesSeen"])
