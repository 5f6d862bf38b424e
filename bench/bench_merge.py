"""Peak host memory of the streaming adapter merge against peft's whole-model merge, on a Qwen2.5-1.5B-shaped model
(not a test).

It writes, once, a base with Qwen2.5-1.5B's shape (28 layers, hidden 1536, MLP 8960, vocabulary 151936, tied
embeddings; 1.54B parameters) and random bf16 weights as one 3.1 GB model.safetensors, and a random LoRA (or DoRA)
adapter on all seven linear layers of every block. Then, each in a fresh process so that peaks do not mix:

* streaming: finetune_trainer.merge.merge_model (bf16 output, one 5GB shard by default: shard size does not bound
  its memory);
* whole-model: AutoModelForCausalLM.from_pretrained(bf16) + PeftModel.from_pretrained + merge_and_unload +
  save_pretrained, the usual way to merge.

Each child reports VmHWM (peak resident set, file-backed pages included, from /proc/self/status), the peak of
RssAnon (anonymous memory, sampled every 20 ms) and the resident set right after its imports (torch alone is a few
hundred MB). Finally both outputs are compared tensor by tensor.

    ~/.cache/finetune-operator/venv/bin/python bench/bench_merge.py [--work /tmp/ftj-bench-merge] [--method lora]
        [--rank 16] [--max-shard-size 5GB] [--skip-whole]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

QWEN25_15B = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- measurement (children) -------------------------------------------------------------------------------------


def status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class AnonSampler(threading.Thread):
    """Samples RssAnon: VmHWM also counts file pages that a memory-mapped load touches, this does not."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, status_kib("RssAnon"))
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, status_kib("RssAnon"))


def child(mode: str, work: Path, shard: str) -> None:
    import torch

    if mode == "streaming":
        from finetune_trainer.merge import merge_model
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    baseline = status_kib("VmRSS")
    sampler = AnonSampler()
    sampler.start()
    started = time.monotonic()
    out = work / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    if mode == "streaming":
        merge_model(work / "base", work / "adapter", out, dtype="bf16", max_shard_size=shard)
    else:
        model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, work / "adapter").merge_and_unload()
        model.save_pretrained(out, max_shard_size=shard)
    seconds = time.monotonic() - started
    peak_anon = sampler.stop()
    result = {"mode": mode, "seconds": seconds, "vmhwm_kib": status_kib("VmHWM"), "peak_anon_kib": peak_anon}
    print(json.dumps({**result, "baseline_kib": baseline}), flush=True)


# --- inputs -----------------------------------------------------------------------------------------------------


def write_inputs(work: Path, method: str, rank: int) -> None:
    """The base (streamed to disk tensor by tensor) and the adapter; reused when already there."""
    import torch
    from peft import LoraConfig
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from finetune_trainer.merge.shards import CODES, ShardWriter, TensorEntry

    base, adapter = work / "base", work / "adapter"
    marker = work / f"inputs-{method}-r{rank}.done"
    if marker.exists():
        return
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    config = Qwen2Config(**QWEN25_15B)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen2ForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight")  # tied: stored once, as transformers saves it
    names = sorted(shapes)
    print(f"writing the base: {sum(math.prod(s) for s in shapes.values()) / 1e9:.2f}B parameters", flush=True)
    writer = ShardWriter(base / "model.safetensors", [TensorEntry(n, CODES[torch.bfloat16], shapes[n]) for n in names])
    generator = torch.Generator().manual_seed(0)
    lora_tensors: dict[str, torch.Tensor] = {}
    scaling = 2.0  # alpha / r, with alpha = 2r as in the adapter config below
    for name in names:
        shape = shapes[name]
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        writer.write(name, tensor)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in TARGETS:
            out_features, in_features = shape
            a = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
            b = torch.randn(out_features, rank, generator=generator) * 0.01
            key = f"base_model.model.{module}"
            lora_tensors[f"{key}.lora_A.weight"], lora_tensors[f"{key}.lora_B.weight"] = a, b
            if method == "dora":
                norm = torch.linalg.vector_norm(tensor.float() + scaling * (b @ a), dim=1)
                lora_tensors[f"{key}.lora_magnitude_vector"] = norm * (0.9 + 0.2 * torch.rand(out_features))
        del tensor
    writer.close()
    config.save_pretrained(base)
    from safetensors.torch import save_file

    save_file(lora_tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=TARGETS, use_dora=method == "dora", task_type="CAUSAL_LM"
    ).save_pretrained(str(adapter))
    from trainer.tiny import build_tokenizer

    build_tokenizer().save_pretrained(adapter)
    marker.touch()


def compare(work: Path) -> dict[str, Any]:
    """Tensor-by-tensor comparison of the two merged outputs (both bf16)."""
    from safetensors import safe_open

    def index(directory: Path) -> dict[str, Path]:
        index_file = directory / "model.safetensors.index.json"
        if index_file.exists():
            return {k: directory / v for k, v in json.loads(index_file.read_text())["weight_map"].items()}
        with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), directory / "model.safetensors")

    ours, theirs = index(work / "out-streaming"), index(work / "out-whole")
    equal = 0
    worst = 0.0
    worst_name = ""
    for name in sorted(set(ours) & set(theirs)):
        with safe_open(str(ours[name]), framework="pt") as a, safe_open(str(theirs[name]), framework="pt") as b:
            x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
        diff = (x - y).abs().max().item() if x.numel() else 0.0
        equal += int(diff == 0.0)
        if diff > worst:
            worst, worst_name = diff, name
    return {
        "tensors": len(ours),
        "only_in_streaming": sorted(set(ours) - set(theirs)),
        "only_in_whole": sorted(set(theirs) - set(ours)),
        "bit_equal": equal,
        "max_abs_diff": worst,
        "max_abs_diff_tensor": worst_name,
    }


def run_child(mode: str, work: Path, shard: str) -> dict[str, Any]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--work", str(work), "--max-shard-size", shard],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"mode"')]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftj-bench-merge"))
    parser.add_argument("--method", choices=["lora", "dora"], default="lora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--skip-whole", action="store_true", help="measure the streaming merge only")
    parser.add_argument("--child", choices=["streaming", "whole"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args.max_shard_size)
        return

    started = time.monotonic()
    write_inputs(args.work, args.method, args.rank)
    base_bytes = (args.work / "base" / "model.safetensors").stat().st_size
    print(f"inputs ready in {time.monotonic() - started:.0f}s: base {base_bytes / 1e9:.2f} GB bf16", flush=True)
    modes = ["streaming"] if args.skip_whole else ["streaming", "whole"]
    results = [run_child(mode, args.work, args.max_shard_size) for mode in modes]

    gib = 2**20
    print(
        f"\nQwen2.5-1.5B shape, {args.method} r={args.rank} on {', '.join(TARGETS)}; "
        f"model file {base_bytes / 2**30:.2f} GiB"
    )
    print(f"{'merge':<12}{'seconds':>9}{'peak RSS GiB':>14}{'peak anon GiB':>15}{'after imports GiB':>19}")
    for r in results:
        print(
            f"{r['mode']:<12}{r['seconds']:>9.1f}{r['vmhwm_kib'] / gib:>14.2f}{r['peak_anon_kib'] / gib:>15.2f}"
            f"{r['baseline_kib'] / gib:>19.2f}"
        )
    if len(results) == 2:
        ratio = results[0]["vmhwm_kib"] / results[1]["vmhwm_kib"]
        print(f"streaming peak RSS is {ratio:.0%} of the whole-model merge's")
        print("outputs compared:", json.dumps(compare(args.work)))


if __name__ == "__main__":
    main()
