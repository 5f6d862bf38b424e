"""`python -m finetune_trainer train`: an invalid config exits 2 listing every bad field; a failure exits 1 with its
reason in the container's termination message (what the operator reads into the FineTuneJob status)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from trainer.tinymodels import config_dict, write_dataset, write_model

from finetune_trainer.cli import main


@pytest.fixture
def termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    path.touch()  # the kubelet creates it empty
    monkeypatch.setenv("FTJ_TERMINATION_LOG", str(path))
    for name in ("KUBERNETES_SERVICE_HOST", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return path


def test_an_invalid_config_exits_2_naming_every_bad_field(tmp_path: Path, termination_log: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "model": {"uri": "ftp://models/x"},
                "datasets": [{"uri": "s3://data/train.jsonl"}],
                "output": {"uri": "s3://runs/x/"},
                "training": {"learningRate": -1},
            }
        )
    )
    assert main(["train", "--config", str(config)]) == 3  # permanent: the Job fails at once, no retries
    report = json.loads(termination_log.read_text())
    assert report["reason"] == "InvalidConfig"
    assert "model.uri: unsupported scheme 'ftp://'" in report["message"]
    assert "training.learningRate" in report["message"] or "training.learning_rate" in report["message"]


def test_a_data_error_exits_3_with_its_reason_in_the_termination_message(tmp_path: Path, termination_log: Path) -> None:
    model = write_model(tmp_path / "model")
    broken = tmp_path / "train.jsonl"
    write_dataset(broken, n=4)
    broken.write_text(broken.read_text() + '{"instruction": "unterminated\n')
    config = tmp_path / "config.json"
    config.write_text(json.dumps(config_dict(tmp_path, model_uri=model.as_uri(), data_uri=broken.as_uri())))
    assert main(["train", "--config", str(config)]) == 3  # permanent: no retry can fix the data
    report = json.loads(termination_log.read_text())
    assert report["reason"] == "DataError"
    assert "train.jsonl" in report["message"]
    assert "line 5" in report["message"]
    assert not (tmp_path / "out" / "manifest.json").exists()


ENDING = """
import atexit, os, sys
from finetune_trainer.cli import exit_process

marker = os.path.join(sys.argv[1], "finalized")

class Finalized:  # freed by the interpreter's finalization, if that runs
    def __del__(self, fd=os.open(marker, os.O_WRONLY | os.O_CREAT), write=os.write):
        write(fd, b"yes")

kept = Finalized()
atexit.register(lambda: open(os.path.join(sys.argv[1], "atexit"), "w").write("ran"))
sys.stdout.write("the last words, not yet flushed")
exit_process(7)
"""


@pytest.mark.parametrize(("world_size", "finalized"), [("2", ""), ("1", "yes")], ids=["rank-of-two", "single"])
def test_a_distributed_rank_ends_without_the_interpreters_finalization(
    tmp_path: Path, world_size: str, finalized: str
) -> None:
    """gloo's threads can abort a finished rank in the finalization (SIGABRT; torchrun calls the rank failed): a
    rank of a distributed run skips it, keeping its exit code, its atexit handlers and its unflushed output."""
    script = tmp_path / "ending.py"
    script.write_text(textwrap.dedent(ENDING))
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": world_size, "LOCAL_WORLD_SIZE": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 7, done.stderr
    assert done.stdout == "the last words, not yet flushed"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "finalized").read_text() == finalized
