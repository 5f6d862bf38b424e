"""`ftj validate` and `ftj convert` as a user runs them: exit codes, file:line, field and value in each message."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from finetune_operator.cli import main

GOOD = """\
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: good}
spec:
  model: {uri: s3://models/base/}
  datasets: [{uri: s3://data/train.json}]
  output: {uri: s3://runs/good/}
"""


def test_validate_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "good.yaml"
    f.write_text(GOOD + "---\napiVersion: v1\nkind: Secret\nmetadata: {name: s3}\n")
    assert main(["validate", str(f)]) == 0
    assert "1 FineTuneJob valid" in capsys.readouterr().out


def test_validate_reports_every_error_with_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(
        GOOD.replace("metadata: {name: good}", "metadata: {name: bad}")
        + "  training:\n    learningRate: -1\n    cutoffLen: 4\n"
        + "  method: {type: full, lora: {rank: 8}}\n"
    )
    assert main(["validate", str(f)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert f"{f}:9: FineTuneJob bad: spec.training.learningRate: Input should be greater than 0 (got -1)" in err
    assert any(line.startswith(f"{f}:10: ") and "spec.training.cutoffLen" in line for line in err)
    assert any(line.startswith(f"{f}:11: ") and "spec.method: lora settings" in line for line in err)
    assert len(err) == 3


def test_validate_names_yaml_syntax_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("spec:\n  model: [unclosed\n")
    assert main(["validate", str(f)]) == 1
    assert f"{f}:3: not valid YAML" in capsys.readouterr().err


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def _lf_project(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(
        json.dumps(
            {
                "mine": {"file_name": "mine.json", "columns": {"prompt": "q", "response": "a"}},
                "chats": {
                    "file_name": "chats.jsonl",
                    "formatting": "sharegpt",
                    "columns": {"messages": "msgs"},
                    "tags": {
                        "role_tag": "role",
                        "content_tag": "content",
                        "user_tag": "user",
                        "assistant_tag": "assistant",
                    },
                },
            }
        )
    )
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        textwrap.dedent(
            """\
            model_name_or_path: Qwen/Qwen2-0.5B
            stage: sft
            do_train: true
            finetuning_type: lora
            lora_target: q_proj,v_proj
            lora_rank: 16
            quantization_bit: 4
            double_quantization: false
            dataset: mine,chats
            template: llama3
            cutoff_len: 1024
            max_samples: 100
            val_size: 0.05
            per_device_train_batch_size: 2
            gradient_accumulation_steps: 4
            learning_rate: 2.0e-4
            num_train_epochs: 1.0
            lr_scheduler_type: linear
            warmup_steps: 10
            fp16: true
            logging_steps: 1
            save_steps: 50
            eval_steps: 25
            output_dir: saves/out
            use_swanlab: true
            swanlab_mode: local
            """
        )
        + extra
    )
    return cfg


def test_convert_carries_llamafactory_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _lf_project(tmp_path)
    out = tmp_path / "ftj.yaml"
    code = main(["convert", str(cfg), "--output-uri", "s3://runs/x/", "--data-uri", "s3://data/lf/", "-o", str(out)])
    assert code == 0
    doc = yaml.safe_load(out.read_text())
    spec = doc["spec"]
    assert doc["metadata"]["name"] == "train"
    assert spec["model"] == {"uri": "hf://Qwen/Qwen2-0.5B"}
    assert spec["method"] == {
        "type": "qlora",
        "lora": {"rank": 16, "alpha": 32.0, "dropout": 0.0, "target": ["q_proj", "v_proj"]},
        "quantization": {"bits": 4, "doubleQuant": False},
    }
    assert spec["datasets"][0] == {
        "uri": "s3://data/lf/mine.json",
        "format": "alpaca",
        "columns": {"prompt": "q", "response": "a"},
        "maxSamples": 100,
    }
    assert spec["datasets"][1]["tags"]["assistant_tag"] == "assistant"
    assert spec["valSize"] == 0.05
    assert spec["template"] == "llama3"
    assert spec["training"] == {
        "epochs": 1.0,
        "learningRate": 2e-4,
        "lrScheduler": "linear",
        "warmupSteps": 10,
        "perDeviceBatchSize": 2,
        "gradientAccumulationSteps": 4,
        "cutoffLen": 1024,
        "loggingSteps": 1,
        "saveSteps": 50,
        "evalSteps": 25,
        "packing": False,
        "precision": "fp16",
    }
    assert spec["tracking"] == {"reportTo": ["swanlab"]}
    err = capsys.readouterr().err
    assert "not carried: swanlab_mode: set SWANLAB_MODE in spec.env" in err
    assert "# Not carried over:" in out.read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("stage: dpo\n", "stage: only sft is supported, got 'dpo'"),
        ("dataset: nothere\n", "dataset: 'nothere' is not in"),
        ("finetuning_type: full\n", "quantization_bit: 4 needs finetuning_type lora"),
        ("finetuning_type: oft\n", "finetuning_type: must be lora, full or freeze, got 'oft'"),
    ],
)
def test_convert_refuses_what_cannot_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, message: str
) -> None:
    cfg = _lf_project(tmp_path, extra)
    assert main(["convert", str(cfg), "--output-uri", "s3://runs/x/"]) == 1
    assert message in capsys.readouterr().err


def test_convert_reads_deepspeed_json(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text(
        json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    )
    cfg = _lf_project(tmp_path, "deepspeed: ds.json\n")
    out = tmp_path / "o.yaml"
    assert main(["convert", str(cfg), "--output-uri", "s3://runs/x/", "-o", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["spec"]["deepspeed"] == {"zeroStage": 3, "offload": "optimizer"}
