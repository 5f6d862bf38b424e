"""Training throughput and peak memory beside LLaMA-Factory, same workload, same run (not a test).

Both sides train the same model (random weights in a given shape), tokenizer, alpaca data and settings: template
qwen, LoRA r16 (alpha 32) on all linear layers and a full fine-tune, packing without cross-sample attention
(LLaMA-Factory's neat_packing; ours always keeps packed samples apart), the same per-device batch and gradient
accumulation, a constant learning rate, a fixed number of optimizer steps, no saves. LLaMA-Factory 0.9.5 runs in its
own venv (tests/parity/lf_venv.sh --train, torch borrowed from the project venv so both use the same build) through its
own `run_exp`; ours through the recipe `python -m finetune_trainer train` runs. The same Trainer callback
(steptimer.py) measures both: tokens/s = input tokens other than padding, counted at the model's forward, per
second over the optimizer steps after the warm-up, seconds per step over the same steps, and the process's peak
memory (torch.cuda.max_memory_allocated on a GPU, peak RSS on the CPU). Each side defaults to its own attention
choice (LLaMA-Factory's flash_attn auto, ours training.attention auto); on a GPU ours also runs with Liger kernels.
Sides alternate (the order reversed every other round), best of --repeat.

    python bench/gpu/bench_vs_llamafactory.py                 # a CUDA machine: Qwen2.5-1.5B shape, cutoff 4096, bf16
    python bench/gpu/bench_vs_llamafactory.py --mode smoke    # CPU, tiny shape, a few steps (CI runs this)
    python bench/bench_train_cpu.py                           # CPU framework overhead (--mode cpu)

Writes its table to --out (default bench-results/<mode>-vs-llamafactory.md) and prints it; the last line is
`<mode> train: ours/lf tokens/s R (lora), R (full); peak memory ours/lf M (lora), M (full)`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from bench_gpu_throughput import SHAPES as THROUGHPUT_SHAPES  # noqa: E402

# The throughput bench's shapes (qwen2.5-1.5b, tiny), and one for the CPU overhead bench: large enough that a step
# is real work, small enough for 2 cores.
SHAPES: dict[str, dict[str, Any]] = {
    **THROUGHPUT_SHAPES,
    "small": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    },
}


@dataclass(frozen=True)
class Mode:
    shape: str
    cutoff: int
    samples: int
    words: tuple[int, int]  # output length range, in words
    steps: int
    warmup: int
    batch: int
    accumulation: int
    precision: str  # bf16 | fp32
    checkpointing: bool
    gpu: bool


MODES = {
    "gpu": Mode("qwen2.5-1.5b", 4096, 6000, (60, 900), 20, 4, 1, 8, "bf16", True, True),
    "cpu": Mode("small", 512, 1500, (20, 200), 24, 4, 2, 2, "fp32", False, False),
    "smoke": Mode("tiny", 128, 120, (5, 40), 4, 1, 2, 1, "fp32", False, False),
}
METHODS = {
    "lora": {"type": "lora", "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target": ["all"]}},
    "full": {"type": "full"},
}
_TEXT = (
    "the of and to in is that for it as was with be by on not this are or from at which have an they you were "
    "model data train answer question explain write list compute value function result number city weather time "
    "Paris Berlin Tokyo 0 1 2 3 4 5 6 7 8 9 , . ; : ? !"
)
WORDS = _TEXT.split()


def shape_config(mode: Mode, vocab: int) -> dict[str, Any]:
    shape = dict(SHAPES[mode.shape])
    shape["vocab_size"] = max(int(shape.get("vocab_size", 0)), vocab)
    shape.setdefault("max_position_embeddings", max(4096, mode.cutoff))
    shape.setdefault("tie_word_embeddings", False)
    return shape


def make_sources(root: Path, mode: Mode, seed: int = 0) -> tuple[Path, Path]:
    """The model directory (random weights, the tests' byte-level BPE tokenizer with chatml specials) and the data
    directory (train.json and a dataset_info.json naming it `bench`)."""
    import torch
    from trainer.tiny import build_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    rows = [
        {"instruction": text(5, 40), "input": text(0, 20) if rng.random() < 0.3 else "", "output": text(*mode.words)}
        for _ in range(mode.samples)
    ]
    data = root / "data"
    data.mkdir(parents=True)
    (data / "train.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "train.json"}}))
    tokenizer = build_tokenizer([r["instruction"] + " " + r["output"] for r in rows[:500]], vocab_size=2000)
    config = Qwen2Config(
        **shape_config(mode, len(tokenizer)),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if mode.precision == "bf16" else torch.float32
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config).to(dtype)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, data


def lf_config(mode: Mode, method: str, model: Path, data: Path, out: Path) -> dict[str, Any]:
    lora = METHODS[method].get("lora", {})
    config: dict[str, Any] = {
        "model_name_or_path": str(model),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": method,
        "dataset": "bench",
        "dataset_dir": str(data),
        "template": "qwen",
        "cutoff_len": mode.cutoff,
        "packing": True,
        "neat_packing": True,
        "overwrite_cache": True,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "plot_loss": False,
        "per_device_train_batch_size": mode.batch,
        "gradient_accumulation_steps": mode.accumulation,
        "learning_rate": 1.0e-4,
        "lr_scheduler_type": "constant",
        "max_steps": mode.steps,
        "bf16": mode.precision == "bf16",
        "disable_gradient_checkpointing": not mode.checkpointing,
        "seed": 42,
        "flash_attn": "auto",
    }
    if not mode.gpu:
        config["use_cpu"] = True
    if lora:
        config.update(lora_rank=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], lora_target="all")
    return config


def ours_config(mode: Mode, method: str, model: Path, data: Path, out: Path, liger: bool) -> dict[str, Any]:
    return {
        "jobName": "bench",
        "model": {"uri": model.as_uri()},
        "datasets": [{"uri": (data / "train.json").as_uri(), "format": "alpaca"}],
        "template": "qwen",
        "method": METHODS[method],
        "training": {
            "maxSteps": mode.steps,
            "learningRate": 1.0e-4,
            "lrScheduler": "constant",
            "perDeviceBatchSize": mode.batch,
            "gradientAccumulationSteps": mode.accumulation,
            "cutoffLen": mode.cutoff,
            "packing": True,
            "precision": mode.precision,
            "gradientCheckpointing": mode.checkpointing,
            "loggingSteps": 1,
            "saveSteps": 100000,
            "seed": 42,
            "attention": "auto",
            "liger": liger,
        },
        "output": {"uri": out.as_uri(), "plotLoss": False},
        "cacheDir": str(out.parent / (out.name + "-cache")),
    }


@dataclass
class Result:
    side: str
    method: str
    tokens_per_second: float
    seconds_per_step: float
    peak_bytes: int
    seconds: float  # the whole process, start-up and data preparation included


def measure(timing: Path, warmup: int, side: str, method: str, seconds: float) -> Result:
    data = json.loads(timing.read_text())
    steps = data["steps"]
    first = max(warmup, 1)  # timed from the end of the last warm-up step (at least the first: it starts the clock)
    if len(steps) <= first:
        raise RuntimeError(f"{side}: only {len(steps)} steps recorded, the warm-up is {warmup}")
    _, t0, k0 = steps[first - 1]
    _, t1, k1 = steps[-1]
    span = t1 - t0
    done = len(steps) - first
    peak = data["peak_gpu_bytes"] if data["peak_gpu_bytes"] is not None else data["peak_rss_bytes"]
    return Result(side, method, (k1 - k0) / span, span / done, int(peak), seconds)


def env_for_runs() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "FTJ_", "PET_"))}
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1"})
    env.update({"LLAMAFACTORY_VERBOSITY": "WARN", "FTJ_TERMINATION_LOG": os.devnull})
    return env


def run_side(
    side: str, mode: Mode, method: str, model: Path, data: Path, work: Path, lf_python: str | None, log: Path
) -> Result:
    out = work / f"{side}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / (out.name + "-cache"), ignore_errors=True)
    out.mkdir(parents=True)
    timing = out / "timing.json"
    if side == "llamafactory":
        assert lf_python is not None
        config = out / "lf.yaml"
        import yaml

        config.write_text(yaml.safe_dump(lf_config(mode, method, model, data, out / "lf-output")))
        argv = [lf_python, str(HERE / "lf_driver.py"), str(config), str(timing)]
    else:
        config = out / "ours.json"
        final = out / "ours-output"
        config.write_text(json.dumps(ours_config(mode, method, model, data, final, side == "ours+liger")))
        argv = [sys.executable, str(HERE / "ours_driver.py"), str(config), str(timing)]
    started = time.monotonic()
    with log.open("a") as handle:
        handle.write(f"\n=== {side} {method}: {' '.join(argv)}\n")
        handle.flush()
        code = subprocess.run(argv, env=env_for_runs(), stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0 or not timing.is_file():
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{side} {method} failed (exit {code}); log {log}:\n{tail}")
    return measure(timing, mode.warmup, side, method, time.monotonic() - started)


def table(results: dict[tuple[str, str], Result], mode_name: str, mode: Mode) -> list[str]:
    unit = "peak GPU memory (GiB)" if mode.gpu else "peak RSS (GiB)"
    lines = [
        f"Mode {mode_name}: shape {mode.shape}, cutoff {mode.cutoff}, packing, {mode.precision}, batch {mode.batch} x "
        f"{mode.accumulation} accumulation, {mode.steps} steps ({mode.warmup} warm-up), {mode.samples} samples",
        "",
        f"| method | side | tokens/s | s/step | {unit} | process s | tokens/s vs LLaMA-Factory | memory vs "
        "LLaMA-Factory |",
        "| --- | --- | --: | --: | --: | --: | --: | --: |",
    ]
    for (method, side), result in results.items():
        lf = results.get((method, "llamafactory"))
        speed = f"{result.tokens_per_second / lf.tokens_per_second:.2f}x" if lf else ""
        memory = f"{result.peak_bytes / lf.peak_bytes:.2f}x" if lf else ""
        lines.append(
            f"| {method} | {side} | {result.tokens_per_second:,.0f} | {result.seconds_per_step:.3f} | "
            f"{result.peak_bytes / 2**30:.2f} | {result.seconds:.0f} | {speed} | {memory} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="gpu")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary one)")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if mode.gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("--mode gpu needs CUDA; use --mode cpu or --mode smoke here")
    lf_python = (
        subprocess.run(
            ["bash", str(REPO / "tests" / "parity" / "lf_venv.sh"), "--train"],
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    sides = ["llamafactory", "ours"] + (["ours+liger"] if mode.gpu else [])
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ftj-bench-lf-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "runs.log"
    sources = work / "sources"  # a kept --workdir reuses the model and data it made
    model, data = (sources / "model", sources / "data") if sources.exists() else make_sources(sources, mode)
    results: dict[tuple[str, str], Result] = {}
    for attempt in range(args.repeat):
        for method in methods:
            for side in sides if attempt % 2 == 0 else sides[::-1]:  # neither side always goes first
                result = run_side(side, mode, method, model, data, work, lf_python, log)
                print(
                    f"{method:5} {side:13} {result.tokens_per_second:10,.0f} tokens/s {result.seconds_per_step:7.3f} "
                    f"s/step peak {result.peak_bytes / 2**30:6.2f} GiB ({result.seconds:.0f} s)",
                    flush=True,
                )
                best = results.get((method, side))
                if best is None or result.tokens_per_second > best.tokens_per_second:
                    results[(method, side)] = result
    lines = table(results, args.mode, mode)
    out = args.out or REPO / "bench-results" / f"{args.mode}-vs-llamafactory.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"table written to {out}; runs and logs in {work}")
    speed = ", ".join(
        f"{results[(m, 'ours')].tokens_per_second / results[(m, 'llamafactory')].tokens_per_second:.2f} ({m})"
        for m in methods
    )
    memory = ", ".join(
        f"{results[(m, 'ours')].peak_bytes / results[(m, 'llamafactory')].peak_bytes:.2f} ({m})" for m in methods
    )
    print(f"{args.mode} train: ours/lf tokens/s {speed}; peak memory ours/lf {memory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
