"""The container entry point turns each workload backend's environment into the same torchrun command, and the
rendered DeepSpeed JSON is one the Hugging Face integration completes (no "auto" left)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from finetune_trainer.config import DeepSpeedSpec
from finetune_trainer.deepspeed import deepspeed_config
from finetune_trainer.launch import LaunchError, LaunchPlan, plan_from_env, torchrun_argv

CONFIG = "/etc/finetune/trainer.json"
TAIL = ["--max-restarts", "0", "--shutdown-timeout", "300", "-m", "finetune_trainer", "train", "--config", CONFIG]


def _argv(env: dict[str, str]) -> list[str]:
    return torchrun_argv(plan_from_env(env), CONFIG, python="python")


def _multi(rank: int) -> list[str]:
    return [
        "python", "-m", "torch.distributed.run", "--nnodes", "3", "--nproc-per-node", "4", "--node-rank", str(rank),
        "--master-addr", "ft-0.ft", "--master-port", "23456", *TAIL,
    ]  # fmt: skip


@pytest.mark.parametrize("rank", [0, 2])
def test_pytorchjob_and_indexed_job_environments_give_the_same_torchrun_command(rank: int) -> None:
    # What the Kubeflow training operator v1 sets in replica `rank` (MASTER_*, WORLD_SIZE, RANK and the PET_ set).
    pytorchjob = {
        "PET_NNODES": "3",
        "PET_NODE_RANK": str(rank),
        "PET_NPROC_PER_NODE": "4",
        "PET_MASTER_ADDR": "ft-0.ft",
        "PET_MASTER_PORT": "23456",
        "MASTER_ADDR": "ft-0.ft",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "12",
        "RANK": str(rank),
    }
    # What an Indexed Job Pod gets: JOB_COMPLETION_INDEX from Kubernetes, the PET_ values from the operator.
    indexed = {
        "JOB_COMPLETION_INDEX": str(rank),
        "PET_NNODES": "3",
        "PET_NPROC_PER_NODE": "4",
        "PET_MASTER_ADDR": "ft-0.ft",
        "PET_MASTER_PORT": "23456",
    }
    indexed_ftj = {
        "JOB_COMPLETION_INDEX": str(rank),
        "FTJ_NNODES": "3",
        "FTJ_NPROC_PER_NODE": "4",
        "FTJ_MASTER_ADDR": "ft-0.ft",
        "FTJ_MASTER_PORT": "23456",
    }
    assert plan_from_env(pytorchjob).backend == "pytorchjob"
    assert plan_from_env(indexed).backend == "job"
    assert _argv(pytorchjob) == _argv(indexed) == _argv(indexed_ftj) == _multi(rank)


def test_one_node_runs_a_standalone_rendezvous() -> None:
    assert plan_from_env({}) == LaunchPlan("local", 1, "1", 0, None, 29500)
    argv = _argv({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "8", "PET_MASTER_ADDR": "x", "PET_NODE_RANK": "0"})
    assert argv[:7] == ["python", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node"]
    assert argv[7] == "8"
    assert argv[8:] == TAIL


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"PET_NNODES": "2", "PET_NODE_RANK": "1"},
            "PET_MASTER_ADDR or MASTER_ADDR must be set when there are 2 nodes",
        ),
        ({"JOB_COMPLETION_INDEX": "0", "PET_MASTER_ADDR": "m"}, "PET_NNODES or FTJ_NNODES must be set"),
        ({"JOB_COMPLETION_INDEX": "2", "PET_NNODES": "2", "PET_MASTER_ADDR": "m"}, "node rank 2 is out of range"),
        ({"PET_NNODES": "two", "PET_NODE_RANK": "0"}, "PET_NNODES must be an integer, got 'two'"),
        ({"FTJ_NPROC_PER_NODE": "0"}, "FTJ_NPROC_PER_NODE must be a positive integer, got '0'"),
        ({"PET_NNODES": "2", "PET_NODE_RANK": "0", "MASTER_ADDR": "m", "MASTER_PORT": "70000"}, "<= 65535"),
    ],
)
def test_a_bad_environment_is_refused_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        plan_from_env(env)


def test_launch_module_prints_the_command_without_importing_torch() -> None:
    env = {"PATH": "/usr/bin:/bin", "JOB_COMPLETION_INDEX": "1", "PET_NNODES": "2", "PET_MASTER_ADDR": "m-0.m"}
    code = (
        "import sys, runpy; sys.argv = ['launch', '--dry-run', '--config', 'c.json'];"
        "runpy.run_module('finetune_trainer.launch', run_name='__main__');"
        "assert 'torch' not in sys.modules, 'launch imported torch'"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    argv = json.loads(out.stdout)
    assert argv[argv.index("--node-rank") + 1] == "1"
    assert argv[argv.index("--master-addr") + 1] == "m-0.m"
    assert argv[-2:] == ["--config", "c.json"]


def _autos(value: Any, path: str = "") -> list[str]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _autos(v, f"{path}.{k}")]
    return [path] if value == "auto" else []


@pytest.mark.parametrize(
    ("stage", "offload"), [(0, "none"), (2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"), (3, "all")]
)
def test_the_rendered_deepspeed_json_is_completed_by_the_hugging_face_integration(stage: int, offload: str) -> None:
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    spec = DeepSpeedSpec.model_validate({"zeroStage": stage, "offload": offload})
    rendered = deepspeed_config(spec)
    assert rendered["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in rendered["zero_optimization"]) == (offload != "none" and stage > 0)
    assert ("offload_param" in rendered["zero_optimization"]) == (offload == "all")
    assert ("optimizer" in rendered) == (offload != "none" and stage > 0)
    json.dumps(rendered)  # goes into a ConfigMap as JSON

    args = TrainingArguments(
        output_dir="/tmp/unused", per_device_train_batch_size=4, gradient_accumulation_steps=2, bf16=True,
        learning_rate=2e-4, weight_decay=0.01, use_cpu=True, report_to="none",
    )  # fmt: skip
    hf = HfTrainerDeepSpeedConfig(json.loads(json.dumps(rendered)))
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, model=_Sized(hidden_size=1024), num_training_steps=100)
    assert _autos(hf.config) == []
    assert hf.config["train_micro_batch_size_per_gpu"] == 4
    assert hf.config["bf16"]["enabled"] is True
    if "optimizer" in hf.config:
        assert hf.config["optimizer"]["params"]["lr"] == 2e-4


class _Sized:
    """Just enough of a model for the integration to size ZeRO-3 buckets from the hidden size."""

    def __init__(self, hidden_size: int) -> None:
        self.config = type("Config", (), {"hidden_size": hidden_size, "to_dict": lambda self: {}})()


def _supervised(tmp_path: Any, script: str, report: dict[str, str] | None) -> int:
    log = tmp_path / "termination.json"
    if report is not None:
        log.write_text(json.dumps(report))
    code = (
        "import os, sys\n"
        "from finetune_trainer.launch import supervise\n"
        f"sys.exit(supervise([sys.executable, '-c', {script!r}]))\n"
    )
    env = {**__import__("os").environ, "FTJ_TERMINATION_LOG": str(log)}
    return subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode


@pytest.mark.parametrize(
    ("script", "report", "expected"),
    [
        ("raise SystemExit(0)", None, 0),
        ("raise SystemExit(1)", {"reason": "DataError", "message": "train.jsonl line 7"}, 3),
        ("raise SystemExit(1)", {"reason": "InvalidConfig", "message": "template"}, 3),
        ("raise SystemExit(1)", {"reason": "StorageError", "message": "s3 timeout"}, 1),
        ("raise SystemExit(1)", None, 1),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", None, 137),
    ],
    ids=["success", "data-error", "invalid-config", "transient", "no-report", "killed"],
)
def test_launcher_turns_permanent_failures_into_exit_3(
    tmp_path: Any, script: str, report: dict[str, str] | None, expected: int
) -> None:
    # torchrun itself always exits 1 on a worker failure; the worker's termination report decides.
    assert _supervised(tmp_path, script, report) == expected


def test_launcher_runs_the_rendered_torchrun_arguments(tmp_path: Any) -> None:
    from finetune_operator.render import LAUNCH, torchrun_args

    script = tmp_path / "worker.py"
    script.write_text("import os\nprint('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'])\n")
    args = torchrun_args("0", "127.0.0.1", "29561", "1", "2")
    args = [*args[: args.index("-m")], str(script)]
    result = subprocess.run([sys.executable, *LAUNCH[1:], *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(line for line in result.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 of 2",
        "rank 1 of 2",
    ]
