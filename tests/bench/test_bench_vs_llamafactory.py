"""The side-by-side bench against LLaMA-Factory (bench/gpu/bench_vs_llamafactory.py) in its CPU smoke mode: a tiny
model trained a few steps by LLaMA-Factory 0.9.5 (its own venv) and by ours, both measured by the same callback.
It runs here so that the GPU bench, which only a CUDA machine can run for real, cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_mode_trains_both_sides_and_prints_the_ratios(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu" / "bench_vs_llamafactory.py"),
            *("--mode", "smoke", "--out", str(out), "--workdir", str(tmp_path / "work")),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"smoke train: ours/lf tokens/s ([\d.]+) \(lora\), ([\d.]+) \(full\); "
        r"peak memory ours/lf ([\d.]+) \(lora\), ([\d.]+) \(full\)",
        last,
    )
    assert match, last
    assert all(float(value) > 0 for value in match.groups())
    table = out.read_text()
    for method in ("lora", "full"):
        for side in ("llamafactory", "ours"):
            row = next(line for line in table.splitlines() if line.startswith(f"| {method} | {side} |"))
            tokens_per_second = float(row.split("|")[3].replace(",", ""))
            assert tokens_per_second > 0, row
    # Both sides really trained: LLaMA-Factory's own log and ours each show a loss for every step.
    log = (tmp_path / "work" / "runs.log").read_text()
    assert log.count("'loss':") >= 8, "LLaMA-Factory logs a loss per step (4 steps, 2 methods)"
    assert log.count('"event":"progress"') >= 8
