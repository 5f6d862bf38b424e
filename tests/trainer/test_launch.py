"""The container entry point runs the operator's rendered torchrun arguments and exits 3 for permanent failures and
one retryable code for every other one; the rendered DeepSpeed JSON is one the Hugging Face integration completes
(no "auto" left)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from finetune_trainer.config import DeepSpeedSpec
from finetune_trainer.constants import SHUTDOWN_TIMEOUT, TRAINER_CONFIG
from finetune_trainer.deepspeed import deepspeed_config
from finetune_trainer.errors import PERMANENT_EXIT_CODE, RETRYABLE_EXIT_CODE
from support.processes import wait_until


def test_the_launcher_does_not_import_torch() -> None:
    # It only waits for torchrun; torch in the launcher process would cost every replica memory for nothing.
    code = "import sys, finetune_trainer.launch; assert 'torch' not in sys.modules, 'launch imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


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


@pytest.mark.parametrize(
    ("script", "report", "expected"),
    [
        ("raise SystemExit(0)", None, 0),
        ("raise SystemExit(1)", {"reason": "DataError", "message": "train.jsonl line 7"}, PERMANENT_EXIT_CODE),
        ("raise SystemExit(1)", {"reason": "InvalidConfig", "message": "template"}, PERMANENT_EXIT_CODE),
        ("raise SystemExit(1)", {"reason": "OutputInUse", "message": "s3://runs/x/"}, PERMANENT_EXIT_CODE),
        ("raise SystemExit(1)", {"reason": "StorageError", "message": "s3 timeout"}, RETRYABLE_EXIT_CODE),
        ("raise SystemExit(1)", None, RETRYABLE_EXIT_CODE),
        ("raise SystemExit(143)", None, RETRYABLE_EXIT_CODE),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", None, RETRYABLE_EXIT_CODE),
    ],
    ids=["success", "data-error", "invalid-config", "output-in-use", "transient", "no-report", "preempted", "killed"],
)
def test_launcher_exits_3_for_permanent_failures_and_one_retryable_code_for_the_rest(
    tmp_path: Any, script: str, report: dict[str, str] | None, expected: int
) -> None:
    # Through real torchrun, which exits 1 whatever its worker did; the worker's termination report decides.
    worker = tmp_path / "worker.py"
    write = f"import os\nopen(os.environ['FTJ_TERMINATION_LOG'], 'w').write({json.dumps(report)!r})\n"
    worker.write_text((write if report is not None else "") + script + "\n")
    proc = _launch_rendered(tmp_path, [str(worker)])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == expected, out


def test_the_exit_codes_mean_the_same_to_both_backends() -> None:
    # PyTorchJob restartPolicy ExitCode: 1-127 fail the job, 128-255 restart the replica; 129-192 also read as
    # "killed by signal N", which the launcher's own code must never be taken for.
    assert 1 <= PERMANENT_EXIT_CODE <= 127
    assert 128 + 64 < RETRYABLE_EXIT_CODE <= 255


def _launch_rendered(tmp_path: Any, program: list[str], **env: str) -> subprocess.Popen[str]:
    """The launcher with the operator's rendered torchrun arguments (one node, one process) running `program`."""
    from finetune_operator.render import LAUNCH, torchrun_args

    args = torchrun_args("0", "127.0.0.1", str(_free_port()), "1", "1")
    args = [*args[: args.index("-m")], *program]
    return subprocess.Popen(
        [sys.executable, *LAUNCH[1:], *args],
        env={**os.environ, "FTJ_TERMINATION_LOG": str(tmp_path / "termination.json"), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_through_torchrun_a_crash_is_retryable_and_an_invalid_config_permanent(tmp_path: Any) -> None:
    crash = tmp_path / "crash.py"
    crash.write_text("raise RuntimeError('NCCL error: unhandled system error')\n")
    proc = _launch_rendered(tmp_path, [str(crash)])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == RETRYABLE_EXIT_CODE, out
    assert f"torchrun exited 1, reason unreported: exit {RETRYABLE_EXIT_CODE} (retryable)" in out

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"uri": "ftp://x"}}))
    proc = _launch_rendered(tmp_path, ["-m", "finetune_trainer", "train", "--config", str(config)])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PERMANENT_EXIT_CODE, out
    assert json.loads((tmp_path / "termination.json").read_text())["reason"] == "InvalidConfig"


def test_a_sigterm_to_the_launcher_ends_the_workers_and_exits_retryable(tmp_path: Any) -> None:
    started = tmp_path / "started"
    worker = tmp_path / "worker.py"
    worker.write_text(f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(120)\n")
    proc = _launch_rendered(tmp_path, [str(worker)])
    wait_until(lambda: started.exists() or proc.poll() is not None, timeout=60, what="the worker to start")
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)  # what the kubelet sends a preempted Pod
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == RETRYABLE_EXIT_CODE, out


def test_launcher_runs_the_rendered_torchrun_arguments(tmp_path: Any) -> None:
    from finetune_operator.render import LAUNCH, torchrun_args

    script = tmp_path / "worker.py"
    # One write per line: the workers share the pipe, and print's separate writes (unbuffered) once interleaved in CI.
    script.write_text(
        "import os\nos.write(1, f\"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}\\n\".encode())\n"
    )
    args = torchrun_args("0", "127.0.0.1", str(_free_port()), "1", "2")
    args = [*args[: args.index("-m")], str(script)]
    result = subprocess.run([sys.executable, *LAUNCH[1:], *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(line for line in result.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 of 2",
        "rank 1 of 2",
    ]


def test_the_operator_renders_the_trainers_config_path_and_shutdown_timeout() -> None:
    from finetune_operator.render import torchrun_args

    args = torchrun_args("0", "127.0.0.1", "29500", "1", "1")
    assert f"--shutdown_timeout={SHUTDOWN_TIMEOUT}" in args
    assert args[args.index("--config") + 1] == TRAINER_CONFIG


def test_the_keys_of_a_mounted_secret_reach_the_workers_as_environment(tmp_path: Any) -> None:
    # What the TrainJob backend does instead of envFrom: the Secret mounted as the kubelet lays one out (each key a
    # link into a timestamped directory), its directory named in FTJ_SECRET_ENV_DIR.
    secret = tmp_path / "secret"
    data = secret / "..2026_12_01_00_00_00.000000001"
    data.mkdir(parents=True)
    (secret / "..data").symlink_to(data.name)
    for key, value in {"WANDB_API_KEY": "wandb-key", "MLFLOW_TRACKING_TOKEN": "token", "SET_BY_POD": "secret"}.items():
        (data / key).write_text(value)
        (secret / key).symlink_to(f"..data/{key}")
    worker = tmp_path / "worker.py"
    names = ["WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "SET_BY_POD", "..data"]
    worker.write_text(f"import os\nprint('env', [os.environ.get(n) for n in {names!r}])\n")
    proc = _launch_rendered(tmp_path, [str(worker)], FTJ_SECRET_ENV_DIR=str(secret), SET_BY_POD="pod")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    # An explicit env entry wins over the Secret's key, as over envFrom; the kubelet's own entries are no variables.
    assert "env ['wandb-key', 'token', 'pod', None]" in out
