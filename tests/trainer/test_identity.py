"""Run identity: checkpoints and final outputs record the run's fingerprint and its FineTuneJob; a job whose
output.uri holds another run fails at once with OutputInUse (exit 3, naming the URI and the other run), while the
same spec re-created under another name or uid (GitOps delete and re-apply) resumes, on a real S3 server."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from trainer.tinymodels import config_dict, write_dataset, write_model

from finetune_trainer.cli import main
from finetune_trainer.config import TrainerConfig, run_fingerprint

BASE: dict[str, Any] = {
    "model": {"uri": "s3://models/qwen/"},
    "datasets": [{"uri": "s3://data/train.jsonl", "format": "alpaca"}],
    "training": {"learningRate": 1e-4, "loggingSteps": 10},
    "output": {"uri": "s3://runs/qwen-lora/"},
}


def _config(**changes: Any) -> TrainerConfig:
    doc = json.loads(json.dumps(BASE))
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return TrainerConfig.model_validate(doc)


@pytest.mark.parametrize(
    "change",
    [
        {"jobName": "renamed", "namespace": "team-b"},
        {"storage.endpoint": "http://minio.other:9000", "storage.region": "eu-west-1"},
        {"storage.secretRef": {"name": "other-keys"}},
        {"output.checkpoints": {"keep": 10}},
        {"output.merge": {"enabled": False}},
        {"output.plotLoss": False},
        {"training.loggingSteps": 1, "training.saveSteps": 50, "training.evalSteps": 25},
        {"cacheDir": "/other/scratch", "deepspeedConfigPath": "/etc/other/ds.json"},
        {"output.uri": "s3://runs/qwen-lora"},  # the same prefix, without the slash
        {"training.learningRate": 1e-4, "method": {"type": "lora"}},  # defaults written out
    ],
    ids=lambda c: ",".join(c),
)
def test_settings_that_do_not_define_the_run_keep_its_fingerprint(change: dict[str, Any]) -> None:
    assert run_fingerprint(_config(**change)) == run_fingerprint(_config())


@pytest.mark.parametrize(
    "change",
    [
        {"model.uri": "s3://models/llama/"},
        {"datasets": [{"uri": "s3://data/other.jsonl", "format": "alpaca"}]},
        {"datasets": [{"uri": "s3://data/train.jsonl", "format": "alpaca", "maxSamples": 100}]},
        {"valSize": 0.1},
        {"template": "qwen"},
        {"method": {"type": "dora"}},
        {"method": {"type": "lora", "lora": {"rank": 16}}},
        {"training.learningRate": 5e-4},
        {"training.maxSteps": 100},
        {"training.cutoffLen": 4096},
        {"training.seed": 1},
        {"deepspeed": {}},  # ZeRO-2 with its defaults is not DDP
        {"output.uri": "s3://runs/qwen-lora-2/"},
    ],
    ids=lambda c: ",".join(c),
)
def test_every_run_defining_field_changes_the_fingerprint(change: dict[str, Any]) -> None:
    assert run_fingerprint(_config(**change)) != run_fingerprint(_config())


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("**/*.yaml"))


def test_the_operator_gets_the_trainers_fingerprint_from_the_spec() -> None:
    import yaml

    from finetune_operator.api import FineTuneJob
    from finetune_operator.render import JobRef, trainer_config

    seen = set()
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob":
                job = FineTuneJob.model_validate(doc)
                ref = JobRef(doc["metadata"]["name"], "ns", job.spec)
                assert run_fingerprint(job.spec) == run_fingerprint(trainer_config(ref)), path
                seen.add(run_fingerprint(job.spec))
    assert len(seen) >= 5, "every example is a run of its own"


# -- against storage -------------------------------------------------------------------------------------------


@dataclass
class Attempt:
    code: int
    report: dict[str, Any]  # the termination message ({} when nothing failed)
    events: list[dict[str, Any]]  # rank 0's JSON lines
    log: str


@pytest.fixture
def job(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run `python -m finetune_trainer train` in-process as FineTuneJob `name`/`uid` with a spec whose output is
    s3://<bucket>/runs/shared/, as a new Pod would (nothing cached)."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "KUBERNETES_SERVICE_HOST", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.setenv("FTJ_NAMESPACE", "team-a")
    model = write_model(tmp_path / "model")
    data = write_dataset(tmp_path / "train.jsonl", n=16)
    storage = {"endpoint": s3.endpoint_url, "region": s3.region, "addressingStyle": "path"}
    runs = 0

    def run(name: str, uid: str, capfd: Any, **training: Any) -> Attempt:
        nonlocal runs
        runs += 1
        monkeypatch.setenv("FTJ_JOB_NAME", name)
        monkeypatch.setenv("FTJ_JOB_UID", uid)
        termination = tmp_path / f"termination-{runs}"
        termination.touch()
        monkeypatch.setenv("FTJ_TERMINATION_LOG", str(termination))
        config = config_dict(
            tmp_path,
            model_uri=model.as_uri(),
            data_uri=data.as_uri(),
            output_uri=s3.uri("runs/shared/"),
            training={"maxSteps": 2, "saveSteps": 1, **training},
            cache_dir=tmp_path / f"cache-{runs}",
            jobName=name,
            storage=storage,
        )
        path = tmp_path / f"config-{runs}.json"
        path.write_text(json.dumps(config))
        capfd.readouterr()
        code = main(["train", "--config", str(path)])
        out, err = capfd.readouterr()
        events = [json.loads(line) for line in out.splitlines() if line.startswith('{"time"')]
        return Attempt(code, json.loads(termination.read_text() or "{}"), events, err)

    return run


def _objects(s3: Any) -> dict[str, str]:
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="runs/shared/").get("Contents", [])
    return {o["Key"].removeprefix("runs/shared/"): o["ETag"] for o in listed}


def _read(s3: Any, key: str) -> dict[str, Any]:
    body = s3.client().get_object(Bucket=s3.bucket, Key=f"runs/shared/{key}")["Body"].read()
    doc: dict[str, Any] = json.loads(body)
    return doc


def test_output_of_another_run_is_refused_and_the_same_spec_recreated_resumes(
    job: Any, s3: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    assert job("lora-a", "uid-a", capfd, learningRate=5e-3).code == 0
    run = _read(s3, "manifest.json")["run"]
    assert {k: run[k] for k in ("job", "namespace", "uid")} == {"job": "lora-a", "namespace": "team-a", "uid": "uid-a"}
    assert len(run["fingerprint"]) == 64
    assert _read(s3, "checkpoints/step-2/manifest.json")["run"] == run
    assert _read(s3, "checkpoints/step-2/.nodes/node-0.json")["run"] == run
    before = _objects(s3)

    # Another spec (another learning rate) on the same output fails before training, naming both runs.
    other = job("lora-b", "uid-b", capfd, learningRate=1e-3)
    assert other.code == 3
    assert other.report["reason"] == "OutputInUse"
    message = other.report["message"]
    assert f"output.uri s3://{s3.bucket}/runs/shared/ already holds another run" in message
    assert f"FineTuneJob team-a/lora-a (uid uid-a), run fingerprint {run['fingerprint'][:12]}" in message
    assert "Set another output.uri, or delete that run's outputs" in message
    assert [e["event"] for e in other.events] == ["failed"], "nothing trained, nothing reported but the failure"
    assert _objects(s3) == before, "the other run's outputs are left as they were"

    # The same spec, re-created (GitOps delete and re-apply: new uid, even a new name): its outputs are complete.
    again = job("lora-a-again", "uid-c", capfd, learningRate=5e-3)
    assert (again.code, again.report) == (0, {})
    assert [e["event"] for e in again.events] == ["already-complete", "artifacts"]

    # Only checkpoints left (the final outputs deleted): refused for the other spec, resumed for the same one.
    s3.client().delete_object(Bucket=s3.bucket, Key="runs/shared/manifest.json")
    other = job("lora-b", "uid-b", capfd, learningRate=1e-3)
    assert (other.code, other.report["reason"]) == (3, "OutputInUse")
    assert "checkpoints/step-2/manifest.json was written by FineTuneJob team-a/lora-a" in other.report["message"]
    again = job("lora-a-again", "uid-c", capfd, learningRate=5e-3)
    assert (again.code, again.report) == (0, {})
    assert {"event": "resumed", "resumedFromStep": 2}.items() <= again.events[0].items()
    assert _read(s3, "manifest.json")["run"] == {**run, "job": "lora-a-again", "uid": "uid-c"}


def test_outputs_of_a_trainer_without_run_identity_are_resumed(
    job: Any, s3: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    assert job("old", "uid-old", capfd).code == 0
    # What a trainer before run identity left: checkpoint manifests and node records without a `run` record.
    client = s3.client()
    client.delete_object(Bucket=s3.bucket, Key="runs/shared/manifest.json")
    for key in ("checkpoints/step-2/manifest.json", "checkpoints/step-2/.nodes/node-0.json"):
        doc = _read(s3, key)
        del doc["run"]
        client.put_object(Bucket=s3.bucket, Key=f"runs/shared/{key}", Body=json.dumps(doc).encode())

    new = job("new", "uid-new", capfd)
    assert (new.code, new.report) == (0, {})
    assert {"event": "resumed", "resumedFromStep": 2}.items() <= new.events[0].items()
    assert "has no run fingerprint (written by an older trainer): taking it as this run's" in new.log
