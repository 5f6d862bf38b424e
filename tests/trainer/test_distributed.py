"""Multi-process training through the container's command (`python -m finetune_trainer.launch --torchrun ...`, with
the operator's rendered torchrun arguments expanded from the environment each workload backend provides, as the
kubelet does): two nodes over gloo on loopback, and DeepSpeed ZeRO-2 on CPU with a SIGTERM in the middle, every
rank's shards uploaded and restored."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from trainer.tinymodels import (
    PYTHON,
    config_dict,
    free_port,
    losses_by_step,
    progress_lines,
    spawn,
    trainer_env,
    wait_all,
    write_dataset,
    write_model,
)

from finetune_operator.render import LAUNCH, torchrun_args
from finetune_trainer.checkpoints import list_checkpoints
from finetune_trainer.errors import RETRYABLE_EXIT_CODE
from finetune_trainer.storage import LocalStorage

METHOD = {"type": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target": "all"}}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sources")
    return write_model(root / "model"), write_dataset(root / "train.jsonl", n=32)


# The rendered args of each backend (finetune_operator.render.pytorchjob / indexed_job): $(VAR) references.
RENDERED = {
    "pytorchjob": torchrun_args(
        "$(PET_NODE_RANK)", "$(PET_MASTER_ADDR)", "$(PET_MASTER_PORT)", "$(PET_NNODES)", "$(PET_NPROC_PER_NODE)"
    ),
    "job": torchrun_args(
        "$(JOB_COMPLETION_INDEX)", "$(PET_MASTER_ADDR)", "$(PET_MASTER_PORT)", "$(PET_NNODES)", "$(PET_NPROC_PER_NODE)"
    ),
}


def _node_env(backend: str, node: int, port: int) -> dict[str, str]:
    if backend == "pytorchjob":
        # What the Kubeflow training operator v1 puts into replica `node` of a PyTorchJob (nprocPerNode: 1).
        return {
            "PET_NNODES": "2",
            "PET_NODE_RANK": str(node),
            "PET_NPROC_PER_NODE": "1",
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "RANK": str(node),
        }
    # Indexed Job: Kubernetes sets JOB_COMPLETION_INDEX; the operator renders the rest (finetune_operator.render).
    return {
        "JOB_COMPLETION_INDEX": str(node),
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(port),
    }


def _command(args: list[str], env: dict[str, str], config: Path) -> list[str]:
    """The container's command with its args expanded from `env` as the kubelet does, reading `config`."""
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in args]
    expanded[expanded.index("--config") + 1] = str(config)
    return [PYTHON, *LAUNCH[1:], *expanded]


def _write_node_configs(tmp_path: Path, sources: tuple[Path, Path], **fields: object) -> list[Path]:
    model, data = sources
    paths = []
    for node in (0, 1):
        # Same config in every replica; only the node-local scratch differs, as on two machines.
        config = config_dict(
            tmp_path,
            model_uri=model.as_uri(),
            data_uri=data.as_uri(),
            output_uri=(tmp_path / "out").as_uri(),
            cache_dir=tmp_path / f"node{node}-scratch",
            **fields,  # type: ignore[arg-type]
        )
        paths.append(tmp_path / f"node{node}.json")
        paths[-1].write_text(json.dumps(config))
    return paths


def _launch_nodes(
    tmp_path: Path, configs: list[Path], backend: str, port: int, tag: str
) -> tuple[list[Any], list[Path]]:
    procs, logs = [], []
    for node in (0, 1):
        logs.append(tmp_path / f"{tag}-node{node}.log")
        env = trainer_env(**_node_env(backend, node, port))
        procs.append(spawn(_command(RENDERED[backend], env, configs[node]), env, logs[-1]))
    return procs, logs


def _tails(logs: list[Path]) -> str:
    return "".join(f"\n--- {log.name}\n{log.read_text(errors='replace')[-4000:]}" for log in logs)


def test_two_nodes_train_over_gloo_with_the_indexed_job_environment(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    configs = _write_node_configs(
        tmp_path,
        sources,
        method=METHOD,
        training={"maxSteps": 4, "saveSteps": 2, "perDeviceBatchSize": 2, "learningRate": 2e-2},
    )
    procs, logs = _launch_nodes(tmp_path, configs, "job", free_port(), "job")
    codes = list(wait_all(procs, timeout=420))
    texts = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], f"exit codes {codes}{_tails(logs)}"
    assert "--node_rank=1 --master_addr=127.0.0.1" in texts[1]
    records = progress_lines(texts[0])
    assert sorted(losses_by_step(records)) == [1, 2, 3, 4]
    assert records[-1]["totalSteps"] == 4
    assert not progress_lines(texts[1]), "only global rank 0 reports progress"

    output = tmp_path / "out"
    assert list_checkpoints(LocalStorage(), output.as_uri()).complete == [2, 4]
    manifest = json.loads((output / "checkpoints" / "step-4" / "manifest.json").read_text())
    assert manifest["nodes"] == 2
    assert manifest["world_size"] == 2
    names = {f["path"] for f in manifest["files"]}
    # rng_state_1.pth exists only on node 1's scratch disk: its presence proves both nodes uploaded.
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors", "optimizer.pt"} <= names
    assert (output / "manifest.json").is_file()
    assert (output / "adapter_model.safetensors").is_file()


def test_deepspeed_zero2_on_two_nodes_saves_on_sigterm_to_one_node_and_resumes_every_ranks_shards(
    tmp_path: Path, sources: tuple[Path, Path]
) -> None:
    configs = _write_node_configs(
        tmp_path,
        sources,
        method={"type": "full"},
        training={"maxSteps": 40, "saveSteps": 100, "perDeviceBatchSize": 2, "learningRate": 2e-3},
        deepspeed={"zeroStage": 2},
    )
    output = tmp_path / "out"
    procs, logs = _launch_nodes(tmp_path, configs, "pytorchjob", free_port(), "first")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        steps = [r["step"] for r in progress_lines(logs[0].read_text(errors="replace"))]
        if steps and max(steps) >= 3:
            break
        time.sleep(0.5)
    assert all(p.poll() is None for p in procs), _tails(logs)
    # Only node 1's Pod is evicted: the kubelet signals its main process, torchrun, which forwards it.
    procs[1].send_signal(signal.SIGTERM)
    codes = list(wait_all(procs, timeout=240))
    assert codes == [RETRYABLE_EXIT_CODE] * 2, f"a preempted run is restarted, not done: {codes}{_tails(logs)}"
    assert "SIGTERM: saving a checkpoint" in logs[1].read_text(errors="replace")
    listing = list_checkpoints(LocalStorage(), output.as_uri())
    assert len(listing.complete) == 1, _tails(logs)
    stopped = listing.complete[0]
    assert 3 <= stopped < 40
    manifest = json.loads((output / "checkpoints" / f"step-{stopped}" / "manifest.json").read_text())
    names = {f["path"] for f in manifest["files"]}
    shards = {n for n in names if "optim_states" in n}
    assert len(shards) == 2, f"ZeRO-2 keeps one optimizer shard per rank, one on each node: {sorted(names)}"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= names

    procs, logs = _launch_nodes(tmp_path, configs, "pytorchjob", free_port(), "second")
    codes = list(wait_all(procs, timeout=420))
    assert codes == [0, 0], _tails(logs)
    text = logs[0].read_text(errors="replace")
    resumed = [json.loads(line) for line in text.splitlines() if '"event":"resumed"' in line]
    assert resumed
    assert resumed[0]["resumedFromStep"] == stopped
    losses = losses_by_step(progress_lines(text))
    assert min(losses) == stopped + 1
    assert max(losses) == 40
    first_losses = losses_by_step(progress_lines((tmp_path / "first-node0.log").read_text(errors="replace")))
    assert losses[40] < first_losses[1] - 0.3, "training continued from the restored state and kept learning"


def test_deepspeed_zero3_loads_partitioned_and_exports_the_gathered_full_model(
    tmp_path: Path, sources: tuple[Path, Path]
) -> None:
    from safetensors.torch import load_file

    model, data = sources
    config = config_dict(
        tmp_path,
        model_uri=model.as_uri(),
        data_uri=data.as_uri(),
        output_uri=(tmp_path / "out").as_uri(),
        method={"type": "full"},
        training={"maxSteps": 2, "saveSteps": 100, "perDeviceBatchSize": 2, "learningRate": 2e-3},
        deepspeed={"zeroStage": 3},
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    log = tmp_path / "zero3.log"
    env = trainer_env()
    args = torchrun_args("0", "127.0.0.1", str(free_port()), "1", "2")  # one node, two processes, as `ftj run`
    (code,) = wait_all([spawn(_command(args, env, path), env, log)], timeout=420)
    assert code == 0, _tails([log])
    base = load_file(str(model / "model.safetensors"))
    trained = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(trained) == set(base)
    # Gathered from both ranks' partitions at full shape, and trained.
    for name, tensor in base.items():
        assert trained[name].shape == tensor.shape, name
        assert not trained[name].equal(tensor), name


def _sigterm_node1_after(procs: list[Any], logs: list[Path], step: int) -> None:
    """Evict node 1 once rank 0 reported `step`: the kubelet signals its main process, torchrun, which forwards it."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        steps = [r["step"] for r in progress_lines(logs[0].read_text(errors="replace"))]
        if steps and max(steps) >= step:
            break
        time.sleep(0.2)
    assert all(p.poll() is None for p in procs), _tails(logs)
    procs[1].send_signal(signal.SIGTERM)


@pytest.mark.parametrize("method", [{"type": "full"}, METHOD], ids=["full", "lora"])
def test_fsdp_on_two_nodes_resumes_its_sharded_checkpoint_with_the_losses_of_an_uninterrupted_run(
    tmp_path: Path, sources: tuple[Path, Path], method: dict[str, Any]
) -> None:
    from safetensors.torch import load_file

    fields: dict[str, Any] = {
        "method": method,
        "training": {"maxSteps": 30, "saveSteps": 100, "perDeviceBatchSize": 2, "learningRate": 2e-3},
        "fsdp": {},
    }
    # The uninterrupted run.
    ref = tmp_path / "reference"
    ref.mkdir()
    procs, logs = _launch_nodes(ref, _write_node_configs(ref, sources, **fields), "pytorchjob", free_port(), "ref")
    assert list(wait_all(procs, timeout=420)) == [0, 0], _tails(logs)
    reference = losses_by_step(progress_lines(logs[0].read_text(errors="replace")))
    assert sorted(reference) == list(range(1, 31))

    # The same run, node 1 evicted part-way: every rank saves its shards, the next attempt restores them.
    run = tmp_path / "preempted"
    run.mkdir()
    configs = _write_node_configs(run, sources, **fields)
    procs, logs = _launch_nodes(run, configs, "pytorchjob", free_port(), "first")
    _sigterm_node1_after(procs, logs, 3)
    codes = list(wait_all(procs, timeout=240))
    assert codes == [RETRYABLE_EXIT_CODE] * 2, f"a preempted run is restarted, not done: {codes}{_tails(logs)}"
    listing = list_checkpoints(LocalStorage(), (run / "out").as_uri())
    assert len(listing.complete) == 1, _tails(logs)
    stopped = listing.complete[0]
    assert 3 <= stopped < 30
    manifest = json.loads((run / "out" / "checkpoints" / f"step-{stopped}" / "manifest.json").read_text())
    names = {f["path"] for f in manifest["files"]}
    # Sharded state: one distributed-checkpoint file per rank for the model and for the optimizer, each written
    # on its own node's scratch disk.
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        shards = {n for n in names if n.startswith(part + "/") and n.endswith(".distcp")}
        assert len(shards) == 2, (part, sorted(names))

    procs, logs = _launch_nodes(run, configs, "pytorchjob", free_port(), "second")
    assert list(wait_all(procs, timeout=420)) == [0, 0], _tails(logs)
    text = logs[0].read_text(errors="replace")
    resumed = [json.loads(line) for line in text.splitlines() if '"event":"resumed"' in line]
    assert resumed[0]["resumedFromStep"] == stopped
    losses = losses_by_step(progress_lines(text))
    assert sorted(losses) == list(range(stopped + 1, 31))
    for step, value in losses.items():
        assert value == pytest.approx(reference[step], rel=1e-4, abs=1e-5), (step, value, reference[step])

    # The final outputs are gathered whole, as DDP saves them.
    name = "adapter_model.safetensors" if method["type"] == "lora" else "model.safetensors"
    trained = load_file(str(run / "out" / name))
    expected = load_file(str(ref / "out" / name))
    assert set(trained) == set(expected)
    if method["type"] == "full":
        base = load_file(str(sources[0] / "model.safetensors"))
        assert {n: t.shape for n, t in trained.items()} == {n: t.shape for n, t in base.items()}
