"""`ftj convert` takes every LLaMA-Factory template name across unchanged and refuses any other with the list."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_operator.convert import Conversion, ConvertOptions, convert
from finetune_trainer.config import TEMPLATES, TrainerConfig
from finetune_trainer.data.lf_templates import TEMPLATES as LF_TEMPLATES

INFO = {"mine": {"file_name": "mine.json"}}


def _convert(template: str, tmp_path: Path) -> Conversion:
    train = {"model_name_or_path": "Qwen/Qwen2-0.5B", "stage": "sft", "dataset": "mine", "template": template}
    options = ConvertOptions(output_uri="s3://runs/x/", data_uri="s3://data/lf/")
    return convert(train, INFO, tmp_path / "train.yaml", tmp_path / "dataset_info.json", options)


TEXT = sorted(name for name, spec in LF_TEMPLATES.items() if spec["text_only"])


@pytest.mark.parametrize("template", TEXT)
def test_every_llamafactory_template_name_is_carried_unchanged(template: str, tmp_path: Path) -> None:
    conversion = _convert(template, tmp_path)
    assert conversion.errors == []
    assert conversion.document["spec"]["template"] == template
    assert not any("template" in line for line in conversion.not_carried)


@pytest.mark.parametrize("template", ["qwen9", "paligemma"])
def test_an_unknown_or_image_only_template_is_refused_with_the_names(template: str, tmp_path: Path) -> None:
    conversion = _convert(template, tmp_path)
    [error] = [e for e in conversion.errors if e.startswith("template:")]
    assert f"{template!r} is not a LLaMA-Factory text template" in error
    assert all(name in error for name in ("qwen", "llama3", "glm4", "deepseek3", "phi4", "empty"))


def test_the_config_accepts_exactly_auto_and_the_llamafactory_names() -> None:
    assert set(TEMPLATES) == {"auto", *TEXT}
    assert len(LF_TEMPLATES) == 121
    assert len(TEXT) == 119
    schema = TrainerConfig.model_json_schema()
    assert schema["properties"]["template"]["enum"] == list(TEMPLATES)
