"""`ftj run` end to end on this machine: the quickstart trains with LoRA, merges, plots; two local nodes train
together over torchrun; a data error stops the run with the file and line."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quickstart")
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart" / "make_quickstart.py"), str(root), "--samples", "240"],
        check=True,
        capture_output=True,
    )
    return root


def _job(root: Path, name: str, **changes: Any) -> Path:
    doc = yaml.safe_load((root / "finetunejob.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["output"]["uri"] = f"file://{root / 'runs' / name}"
    for key, value in changes.items():
        doc["spec"][key] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(path: Path, workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finetune_operator", "run", str(path), "--workdir", str(workdir), *extra],
        capture_output=True,
        text=True,
        timeout=900,
    )


def _progress(log: Path) -> list[dict[str, Any]]:
    records = []
    for line in log.read_text().splitlines():
        if line.startswith("{") and '"event":"progress"' in line:
            records.append(json.loads(line))
    return records


def test_quickstart_trains_merges_and_reports(quickstart: Path) -> None:
    path = _job(quickstart, "qs-lora")
    result = _run(path, quickstart / "work-lora")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "step" in out
    assert "loss" in out
    assert "succeeded" in out
    run = quickstart / "runs" / "qs-lora"
    assert (run / "adapter_model.safetensors").is_file()
    assert (run / "loss.png").stat().st_size > 1000
    assert f"merged:      {run}/merged/" in out
    # output.samples: the summary shows where they are and the first few; the merged model's card has them too.
    assert f"samples:     {run}/samples.jsonl (5 rows)" in out
    assert "    > Add 7 and 5." in out
    assert f"tensorboard: tensorboard --logdir {run}/tensorboard/" in out
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["prompt", "prompt", "eval", "eval", "eval"]
    assert all(r["reference"].startswith("The answer is") for r in rows[2:])
    assert "## Samples" in (run / "merged" / "README.md").read_text()
    assert (run / "merged" / "manifest.json").is_file()
    assert any(p.suffix == ".safetensors" for p in (run / "merged").iterdir())
    losses = [r["loss"] for r in _progress(quickstart / "work-lora" / "node-0.log") if "loss" in r]
    assert len(losses) >= 3
    assert losses[-1] < losses[0] * 0.7, losses

    # Running the same job again trains nothing, says so, and leaves the outputs as they were.
    adapter = (run / "adapter_model.safetensors").read_bytes()
    rerun = _run(path, quickstart / "work-lora")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"the outputs in file://{run}/ are complete from an earlier run: nothing to train" in rerun.stdout
    assert "nothing trained this time" in rerun.stdout
    assert _progress(quickstart / "work-lora" / "node-0.log") == []
    assert (run / "adapter_model.safetensors").read_bytes() == adapter

    # Another spec on the same output is refused before anything is trained, naming the run that owns it.
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["training"]["learningRate"] = doc["spec"]["training"].get("learningRate", 1e-4) * 2
    other = quickstart / "qs-lora-other.yaml"
    other.write_text(yaml.safe_dump(doc))
    refused = _run(other, quickstart / "work-lora-other")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "FAILED (OutputInUse)" in refused.stdout
    assert f"output.uri file://{run}/ already holds another run" in refused.stdout
    assert (run / "adapter_model.safetensors").read_bytes() == adapter

    # `ftj merge` does the same merge by hand, here with small shards.
    again = quickstart / "merged-by-hand"
    merge = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_operator",
            "merge",
            "--base",
            str(quickstart / "model"),
            "--adapter",
            str(run),
            "--output",
            str(again),
            "--dtype",
            "fp32",
            "--max-shard-size",
            "100KB",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert merge.returncode == 0, merge.stderr
    shards = sorted(again.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((again / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in shards:  # within the limit, unless one tensor alone is larger
        tensors = [t for t, f in index.items() if f == shard.name]
        assert shard.stat().st_size <= 100_000 or len(tensors) == 1, (shard.name, shard.stat().st_size, tensors)


def test_two_local_nodes_train_over_torchrun(quickstart: Path) -> None:
    path = _job(
        quickstart,
        "qs-two-nodes",
        distribution={"nodes": 2, "procsPerNode": 1},
        training={
            "epochs": 1,
            "learningRate": 0.01,
            "perDeviceBatchSize": 4,
            "cutoffLen": 128,
            "precision": "fp32",
            "gradientCheckpointing": False,
            "loggingSteps": 2,
            "saveSteps": 100,
        },
    )
    result = _run(path, quickstart / "work-two", "--no-merge")
    assert result.returncode == 0, result.stdout + result.stderr
    node1 = (quickstart / "work-two" / "node-1.log").read_text()
    assert node1  # the second node ran its own torchrun
    configs = sorted(p.name for p in (quickstart / "work-two").glob("trainer-node-*.json"))
    assert configs == ["trainer-node-0.json", "trainer-node-1.json"]
    assert (quickstart / "runs" / "qs-two-nodes" / "adapter_model.safetensors").is_file()


def test_a_data_error_stops_the_run_with_file_and_line(quickstart: Path) -> None:
    bad = quickstart / "data" / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    path = _job(quickstart, "qs-bad", datasets=[{"uri": f"file://{bad}", "format": "alpaca"}])
    result = _run(path, quickstart / "work-bad")
    assert result.returncode == 1
    assert "FAILED (DataError)" in result.stdout
    assert "bad.jsonl" in result.stdout
    assert "line 2" in result.stdout
    assert not (quickstart / "runs" / "qs-bad" / "adapter_model.safetensors").exists()
    assert "adapter:" not in result.stdout  # a failed run names no outputs it did not write


def test_ctrl_c_checkpoints_like_a_preempted_pod_and_the_next_run_resumes(quickstart: Path) -> None:
    # Long enough to be interrupted mid-way; no checkpoint but the one Ctrl-C makes.
    training = yaml.safe_load((quickstart / "finetunejob.yaml").read_text())["spec"]["training"]
    path = _job(
        quickstart, "qs-interrupted", training={**training, "epochs": 40, "saveSteps": 10_000, "evalSteps": 10_000}
    )
    workdir = quickstart / "work-interrupted"
    cmd = [sys.executable, "-m", "finetune_operator", "run", str(path), "--workdir", str(workdir), "--no-merge"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    total = 0
    for line in proc.stdout:  # Ctrl-C once training is under way
        seen.append(line)
        row = re.match(r"\s+(\d+)/(\d+)\s", line)
        if row:
            total = int(row.group(2))
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 130, "".join(seen) + rest
    assert "ftj run: qs-interrupted interrupted after" in rest
    match = re.search(r"checkpoints: .* \(newest: step (\d+); `ftj run` again resumes from it\)", rest)
    assert match, rest
    step = int(match.group(1))
    assert 0 < step < total
    assert (quickstart / "runs" / "qs-interrupted" / "checkpoints" / f"step-{step}" / "manifest.json").is_file()
    assert not (quickstart / "runs" / "qs-interrupted" / "manifest.json").exists()  # not finished

    again = _run(path, workdir, "--no-merge")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from step {step}" in again.stdout
    steps = [r["step"] for r in _progress(workdir / "node-0.log") if "loss" in r]
    assert steps, again.stdout
    assert min(steps) > step, steps
    assert max(steps) == total, steps
    assert (quickstart / "runs" / "qs-interrupted" / "adapter_model.safetensors").is_file()
