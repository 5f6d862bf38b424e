"""Every FineTuneJob users can copy from examples/ validates, and the converted LLaMA-Factory example is current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_operator.api import validate_document

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(
    p
    for p in (ROOT / "examples").rglob("*.yaml")
    if any(isinstance(d, dict) and d.get("kind") == "FineTuneJob" for d in yaml.safe_load_all(p.read_text()))
)


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"lora-7b.yaml", "qlora.yaml", "dora-sharegpt.yaml", "full-zero3-multinode.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_validates(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob":
            job, errors = validate_document(doc)
            assert errors == []
            assert job is not None


def test_converted_llamafactory_example_is_what_convert_produces(tmp_path: Path) -> None:
    lf = ROOT / "examples" / "llamafactory"
    out = tmp_path / "converted.yaml"
    args = [
        *("--name", "qwen2-lora-sft", "--model-uri", "s3://models/Qwen2-7B-Instruct/"),
        *("--data-uri", "s3://datasets/llamafactory/", "--output-uri", "s3://runs/qwen2-lora-sft/"),
        *("--storage-secret", "s3-credentials", "-o", str(out)),
    ]
    subprocess.run(
        [sys.executable, "-m", "finetune_operator", "convert", str(lf / "qwen2_lora_sft.yaml"), *args],
        check=True,
        cwd=ROOT,
    )
    assert out.read_text() == (lf / "qwen2-lora-sft.finetunejob.yaml").read_text()


def test_dora_example_keeps_custom_sharegpt_tags() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "dora-sharegpt.yaml").read_text())
    job, _ = validate_document(doc)
    assert job is not None
    tags = job.spec.datasets[0].tags
    assert tags is not None
    assert (tags.role_tag, tags.assistant_tag, tags.observation_tag) == ("role", "assistant", "tool")
    assert job.spec.method.type == "dora"


def test_multinode_example_is_full_zero3_on_two_nodes_of_eight() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "full-zero3-multinode.yaml").read_text())
    job, _ = validate_document(doc)
    assert job is not None
    assert job.spec.deepspeed is not None
    assert (job.spec.method.type, job.spec.deepspeed.zero_stage) == ("full", 3)
    assert (job.spec.distribution.nodes, job.spec.distribution.procs_per_node) == (2, 8)
