"""Experiment tracking and the post-training look at the model, on a tiny real run (a trainer subprocess, as in a
Pod): TensorBoard files read back with tensorboard's own reader, a real MLflow server receiving the metrics, wandb
and swanlab writing their offline run files, samples.jsonl with the expected rows, and the merged model's card
holding the final eval loss, perplexity and samples."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from trainer.tinymodels import REPO_ROOT, config_dict, progress_lines, trainer_env, write_dataset, write_model

from finetune_trainer.config import TrainerConfig

PROMPTS = ["What is the capital of France?", "Add 2 and 3."]
TB_TAGS = {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "eval/loss"}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from support.mlflow import MlflowServer

    server = MlflowServer.start(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, mlflow_server: Any) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("tracked")
    model = write_model(tmp / "model")
    data = write_dataset(tmp / "train.jsonl", n=40)
    raw = config_dict(
        tmp,
        model_uri=model.as_uri(),
        data_uri=data.as_uri(),
        training={"maxSteps": 6, "loggingSteps": 2, "evalSteps": 3, "saveSteps": 3},
        valSize=0.2,
        tracking={
            "reportTo": ["mlflow", "wandb", "swanlab"],
            "project": "tiny-project",
            "mlflowTrackingUri": mlflow_server.url,
        },
    )
    raw["output"]["samples"] = {"prompts": PROMPTS, "fromEval": 2, "maxNewTokens": 8}
    config = TrainerConfig.model_validate(raw)
    path = tmp / "config.json"
    path.write_text(json.dumps(config.to_wire()))
    env = trainer_env(WANDB_MODE="offline", SWANLAB_MODE="offline", WANDB_SILENT="true")
    result = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "train", "--config", str(path)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return {"tmp": tmp, "out": tmp / "out", "model": model, "stdout": result.stdout, "config": config}


def test_tensorboard_event_files_hold_the_runs_metrics(tracked_run: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tracked_run["out"] / "tensorboard"
    files = list(logdir.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {logdir}"
    accumulator = EventAccumulator(str(files[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert tags >= TB_TAGS, tags
    loss_steps = [e.step for e in accumulator.Scalars("train/loss")]
    assert loss_steps == [2, 4, 6]
    assert [e.step for e in accumulator.Scalars("eval/loss")] == [3, 6]
    assert all(e.value > 0 for e in accumulator.Scalars("train/tokens_per_second"))
    # Listed in the final manifest, and reported.
    manifest = json.loads((tracked_run["out"] / "manifest.json").read_text())
    assert any(f["path"].startswith("tensorboard/") for f in manifest["files"])
    artifacts = progress_lines(tracked_run["stdout"], "artifacts")
    assert any(a.get("tensorboard") == f"{tracked_run['out'].as_uri()}/tensorboard/" for a in artifacts), artifacts


def test_mlflow_server_receives_the_metrics_and_the_run_link_is_reported(
    tracked_run: dict[str, Any], mlflow_server: Any
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("tiny-project")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny"  # the job name by default
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    assert len(client.get_metric_history(run.info.run_id, "eval_loss")) == 2
    assert client.get_metric_history(run.info.run_id, "tokens_per_second")
    links = progress_lines(tracked_run["stdout"], "tracking")
    expected = f"{mlflow_server.url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
    assert any(link.get("mlflow") == expected for link in links), links


def test_wandb_and_swanlab_write_their_offline_run_files(tracked_run: dict[str, Any]) -> None:
    local = Path(tracked_run["config"].cache_dir) / "work" / "tiny" / "tracking"
    wandb_runs = list((local / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_runs) == 1, sorted(p.name for p in local.rglob("*"))[:40]
    assert wandb_runs[0].stat().st_size > 0
    swanlab_files = [p for p in (local / "swanlog").rglob("*") if p.is_file()]
    assert swanlab_files, f"swanlab wrote nothing under {local / 'swanlog'}"


def test_samples_hold_the_prompts_and_held_out_eval_answers(tracked_run: dict[str, Any]) -> None:
    rows = [json.loads(line) for line in (tracked_run["out"] / "samples.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["prompt", "prompt", "eval", "eval"]
    assert [r["prompt"] for r in rows[:2]] == PROMPTS
    assert all("reference" not in r for r in rows[:2])
    for row in rows[2:]:
        assert row["reference"], row
        assert "<|im_start|>assistant" in row["prompt"], row  # the eval sample's prompt, template included
    assert all(isinstance(r["generation"], str) for r in rows)
    manifest = json.loads((tracked_run["out"] / "manifest.json").read_text())
    assert manifest["samples"] == 4
    assert "samples.jsonl" in {f["path"] for f in manifest["files"]}
    (event,) = progress_lines(tracked_run["stdout"], "samples")
    assert event["sampleCount"] == 4


def test_the_merged_models_card_carries_eval_loss_perplexity_and_samples(tracked_run: dict[str, Any]) -> None:
    merged = tracked_run["tmp"] / "merged"
    result = subprocess.run(
        [
            sys.executable,
            *("-m", "finetune_trainer", "merge"),
            *("--base", tracked_run["model"].as_uri()),
            *("--adapter", tracked_run["out"].as_uri()),
            *("--output", merged.as_uri()),
            *("--dtype", "fp32"),
        ],
        env=trainer_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    card = (merged / "README.md").read_text()
    state = json.loads((tracked_run["out"] / "trainer_state.json").read_text())
    eval_loss = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e][-1]
    assert f"| final eval loss | {eval_loss} |" in card
    assert f"| eval perplexity | {round(math.exp(eval_loss), 4)} |" in card
    assert "## Samples" in card
    assert f"> {PROMPTS[0]}" in card
    assert "(3 of 4; all are in the run's samples.jsonl)" in card
