"""Training throughput per GPU through the trainer's own stack (not a test): tokens/s and peak memory.

A model with random weights in a given shape (default: Qwen2.5-1.5B: hidden 1536, 28 layers, 12/2 heads, vocab
151936) is set up by finetune_trainer.methods for each method (LoRA rank 16 on all linear layers, full), trained by
the Hugging Face Trainer with the data collator the trainer uses, on synthetic SFT samples (lengths log-normal around
--median-len tokens, capped at --cutoff), packed into rows of --cutoff tokens or padded per batch. Tokens/s counts
real (non-padding) tokens over the steps after --warmup; peak memory is torch.cuda.max_memory_allocated.

    ~/.cache/finetune-operator/venv/bin/python bench/bench_gpu_throughput.py            # on a CUDA machine
    ... --shape tiny --steps 4 --warmup 1 --precision fp32                              # a CPU smoke run

Prints one line per (method, packing) and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
}


def synthetic_rows(n: int, vocab: int, median: int, cutoff: int, packing: bool, seed: int) -> list[dict[str, Any]]:
    """SFT-like samples; packed greedily (first fit) into rows of `cutoff` tokens with restarting positions."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(median), 0.6, n).astype(int), 16, cutoff)
    samples = [rng.integers(10, vocab, size=int(length)).tolist() for length in lengths]
    if not packing:
        return [{"input_ids": s, "labels": s} for s in samples]
    rows: list[dict[str, Any]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for sample in samples:
        if len(current["input_ids"]) + len(sample) > cutoff:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += sample
        current["labels"] += sample
        current["position_ids"] += list(range(len(sample)))
    rows.append(current)
    return rows


class CountingCollator:
    """The trainer's SFT collator, counting the real tokens of every batch it builds (in order)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.tokens: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        self.tokens.append(sum(len(f["input_ids"]) for f in features))
        batch: dict[str, Any] = self.inner(features)
        return batch


def run_one(args: argparse.Namespace, method: str, packing: bool, workdir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import PrinterCallback, Qwen2Config, Qwen2ForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.data.collate import SFTCollator
    from finetune_trainer.methods import apply_method, attention_implementation, load_dtype

    method_spec: dict[str, Any] = {"type": method}
    if method == "lora":
        method_spec["lora"] = {"rank": 16, "alpha": 32, "dropout": 0.0, "target": "all"}
    config = TrainerConfig.model_validate(
        {
            "model": {"uri": "file:///random"},
            "datasets": [{"uri": "file:///synthetic"}],
            "output": {"uri": "file:///unused"},
            "method": method_spec,
            "training": {
                "precision": args.precision,
                "gradientCheckpointing": args.gradient_checkpointing,
                "cutoffLen": args.cutoff,
                "packing": packing,
            },
        }
    )
    cuda = torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=str(workdir),
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=1e-5,
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        save_strategy="no",
        logging_steps=10_000,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=not cuda,
        dataloader_num_workers=2 if cuda else 0,
    )
    attn = attention_implementation(config)
    model_config = Qwen2Config(**SHAPES[args.shape])
    model_config._attn_implementation = attn
    torch.manual_seed(0)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen2ForCausalLM(model_config).to(load_dtype(config))
    model.config.use_cache = False
    model, summary = apply_method(model, config)

    rows = synthetic_rows(args.samples, model_config.vocab_size, args.median_len, args.cutoff, packing, seed=1)
    collator = CountingCollator(
        SFTCollator(pad_token_id=0, padding_free=attn.startswith("flash")),
    )
    times: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *a: Any, **k: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(rows),
        data_collator=collator,
        callbacks=[Clock()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    measured = times[args.warmup - 1 :] if args.warmup > 0 else times
    seconds = measured[-1] - measured[0]
    steps = len(measured) - 1
    tokens = sum(collator.tokens[args.warmup : args.warmup + steps])
    slots = steps * args.batch * args.cutoff if packing else None
    result = {
        "method": method,
        "packing": packing,
        "attention": attn,
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / steps,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "trainable": summary.trainable_params,
        "fill": tokens / slots if slots else None,
    }
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--packing", default="on,off")
    parser.add_argument("--cutoff", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="rows per step and GPU")
    parser.add_argument("--median-len", type=int, default=350)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA)"
    print(f"device: {device}; torch {torch.__version__}; shape {args.shape}; cutoff {args.cutoff}; batch {args.batch}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for packing in (p == "on" for p in args.packing.split(",")):
                result = run_one(args, method, packing, Path(tmp))
                print(json.dumps(result), flush=True)
                results.append(result)
    print("\n| method | packing | attention | tokens/s per GPU | s/step | peak memory (GiB) | trainable params |")
    print("| --- | --- | --- | --: | --: | --: | --: |")
    for r in results:
        print(
            f"| {r['method']} | {'on' if r['packing'] else 'off'} | {r['attention']} | {r['tokens_per_s']:,.0f} | "
            f"{r['step_s']:.3f} | {r['peak_gib']:.1f} | {r['trainable']:,} |"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    main()
