"""Tiny model directories, learnable datasets and TrainerConfigs for the training tests (no hub, no network).

Models are built from configs with random weights (Llama or Qwen2 shape, hidden 32, 2 layers) and saved with the
tiny byte-level BPE tokenizer from trainer.tiny, as a Hugging Face model directory the trainer loads like any other.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.tiny import build_tokenizer

from finetune_trainer.config import TrainerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# A handful of question/answer pairs repeated: a 2-layer model with random weights learns them within a few steps,
# so "the loss falls" is a real signal and not noise.
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Add 2 and 3.", "The answer is 5."),
    ("Translate to German: good morning.", "Guten Morgen."),
    ("Multiply 4 by 7.", "Multiply 4 by 7 to get 28."),
]


def alpaca_rows(n: int = 32) -> list[dict[str, str]]:
    return [
        {"instruction": PAIRS[i % len(PAIRS)][0], "input": "", "output": PAIRS[i % len(PAIRS)][1]} for i in range(n)
    ]


def write_dataset(path: Path, n: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in alpaca_rows(n)))
    return path


def write_model(directory: Path, *, arch: str = "llama", seed: int = 0, hidden: int = 32) -> Path:
    """A random-weight causal LM (`arch` llama or qwen2) plus the tiny tokenizer, saved as a model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    shape: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(seed)
    if arch == "qwen2":
        model: Any = Qwen2ForCausalLM(Qwen2Config(**shape))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# spec.training for a tiny model on the CPU: fp32, no gradient checkpointing, no packing, a few steps.
CPU_TRAINING: dict[str, Any] = {
    "maxSteps": 6,
    "learningRate": 5e-3,
    "lrScheduler": "constant",
    "perDeviceBatchSize": 4,
    "gradientAccumulationSteps": 1,
    "cutoffLen": 64,
    "packing": False,
    "precision": "fp32",
    "gradientCheckpointing": False,
    "loggingSteps": 1,
    "saveSteps": 2,
    "seed": 7,
}


def config_dict(
    tmp: Path,
    *,
    model_uri: str,
    data_uri: str,
    output_uri: str | None = None,
    method: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A TrainerConfig as JSON-ready dict: fp32 on CPU, no gradient checkpointing, no packing, small steps."""
    return {
        "jobName": "tiny",
        "model": {"uri": model_uri},
        "datasets": [{"uri": data_uri, "format": "alpaca"}],
        "method": method or {"type": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target": "all"}},
        "training": {**CPU_TRAINING, "saveSteps": 1000, **(training or {})},
        "output": {"uri": output_uri or (tmp / "out").as_uri(), "checkpoints": {"keep": 2}},
        "cacheDir": str(cache_dir or tmp / "cache"),
        **extra,
    }


def make_config(tmp: Path, **kwargs: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(config_dict(tmp, **kwargs))


def progress_lines(text: str, event: str = "progress") -> list[dict[str, Any]]:
    """The trainer's structured JSON log lines of one kind, in order."""
    out = []
    for line in text.splitlines():
        if line.startswith("{") and f'"event":"{event}"' in line:
            out.append(json.loads(line))
    return out


def losses_by_step(records: list[dict[str, Any]]) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in records if "loss" in r}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def trainer_env(**extra: str) -> dict[str, str]:
    """Environment for trainer subprocesses: the repository's packages importable, no GPU, quiet tokenizers."""
    # Nothing of the test process's own tracking settings either (WANDB_*, MLFLOW_*, ...).
    tracking = ("WANDB_", "MLFLOW_", "SWANLAB_", "TENSORBOARD_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "FTJ_", "KUBERNETES_", *tracking))}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        {
            "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "DS_ACCELERATOR": "cpu",
            "HF_HUB_OFFLINE": "1",
            "FTJ_TERMINATION_LOG": os.devnull,
        }
    )
    env.update(extra)
    return env


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = open(log, "wb")  # noqa: SIM115 - closed by the caller through wait_all
    return subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> Iterator[int]:
    for proc in procs:
        try:
            yield proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
