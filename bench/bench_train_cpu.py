"""Trainer framework overhead on the CPU beside LLaMA-Factory (not a test): the same small model, data and settings
(packing on for both, LoRA and full) trained by LLaMA-Factory (use_cpu) and by ours in the same run, alternating;
seconds per step and tokens/s after the warm-up, peak RSS. The side-by-side machinery is bench/gpu's
(bench_vs_llamafactory.py --mode cpu). Last line: `cpu train: ours/lf tokens/s R (lora), R (full); ...`.

    ~/.cache/finetune-operator/venv/bin/python bench/bench_train_cpu.py [--repeat 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))

from bench_vs_llamafactory import main

if __name__ == "__main__":
    sys.exit(main(["--mode", "cpu", *sys.argv[1:]]))
