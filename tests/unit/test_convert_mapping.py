"""`convert()` key by key: every LLaMA-Factory key lands on its FineTuneJob field, in order, or is reported.

These pin the whole document (key order included, since `ftj convert` dumps with sort_keys=False), the
"not carried" lines and the errors, branch by branch, so the mapping can be restructured without drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.convert import Conversion, ConvertOptions, convert

INFO: dict[str, Any] = {
    "mine": {"file_name": "mine.json", "columns": {"prompt": "q", "response": "a"}, "num_samples": 7, "split": "x"},
    "hub": {
        "hf_hub_url": "org/chats",
        "formatting": "sharegpt",
        "columns": {"messages": "msgs"},
        "tags": {"role_tag": "role", "assistant_tag": "assistant"},
    },
    "ms": {"ms_hub_url": "org/ms"},
    "nosource": {"columns": {"prompt": "q"}},
    "pairs": {"file_name": "pairs.json", "ranking": True},
}


def _same(conversion: Conversion, spec: dict[str, Any], not_carried: list[str], errors: list[str]) -> None:
    assert conversion.errors == errors
    assert conversion.not_carried == not_carried
    assert conversion.document["spec"] == spec
    # Same keys in the same order: the dumped YAML follows dict order.
    assert json.dumps(conversion.document["spec"]) == json.dumps(spec)


def test_dora_with_every_optional_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    train = {
        "model_name_or_path": "s3://models/base/",
        "trust_remote_code": True,
        "finetuning_type": "lora",
        "use_dora": "true",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "lora_target": "q_proj, ,v_proj",
        "additional_target": "embed_tokens,lm_head",
        "dataset": "hub",
        "eval_dataset": "mine",
        "max_samples": 50,
        "val_size": 200,
        "template": "qwen",
        "max_steps": -1,
        "warmup_steps": 0,
        "warmup_ratio": 0.1,
        "seed": 3,
        "train_on_prompt": True,
        "mask_history": "yes",
        "neat_packing": True,
        "pure_bf16": True,
        "disable_gradient_checkpointing": True,
        "deepspeed": "ds_z3_offload_config.json",
        "output_dir": "saves/out",
        "plot_loss": True,
        "export_dir": "merged",
        "export_size": 2,
        "quantization_method": "hqq",
        "report_to": "none",
        "foo": [1],
    }
    options = ConvertOptions(namespace="ml", storage_endpoint="http://minio:9000", storage_secret="s3", nodes=2)
    conversion = convert(train, INFO, tmp_path / "2nd Run.yaml", None, options)
    _same(
        conversion,
        {
            "model": {"uri": "s3://models/base/", "trustRemoteCode": True},
            "method": {
                "type": "dora",
                "lora": {
                    "rank": 4,
                    "alpha": 8.0,
                    "dropout": 0.1,
                    "target": ["q_proj", "v_proj"],
                    "modulesToSave": ["embed_tokens", "lm_head"],
                },
            },
            "datasets": [
                {
                    "uri": "hf://org/chats",
                    "format": "sharegpt",
                    "columns": {"messages": "msgs"},
                    "tags": {"role_tag": "role", "assistant_tag": "assistant"},
                    "maxSamples": 50,
                }
            ],
            "evalDatasets": [
                {
                    "uri": "file://data/mine.json",
                    "format": "alpaca",
                    "columns": {"prompt": "q", "response": "a"},
                    "maxSamples": 7,
                }
            ],
            "template": "qwen",
            "training": {
                "warmupRatio": 0.1,
                "seed": 3,
                "trainOnPrompt": True,
                "maskHistory": True,
                "packing": True,
                "precision": "bf16",
                "gradientCheckpointing": False,
            },
            "deepspeed": {"zeroStage": 3, "offload": "all"},
            "output": {
                "uri": f"file://{tmp_path.resolve()}/saves/out",
                "plotLoss": True,
                "merge": {"uri": f"file://{tmp_path.resolve()}/merged", "maxShardSize": "2GB"},
            },
            "storage": {"endpoint": "http://minio:9000", "secretRef": {"name": "s3"}},
            "distribution": {"nodes": 2, "procsPerNode": 1},
        },
        [
            "dataset_info.json entry 'mine': split='x' (not supported)",
            "val_size: 200 (a sample count); valSize is a fraction below 1",
            "deepspeed: ds_z3_offload_config.json not found; stage and offload taken from its name",
            "output_dir: 'saves/out' became a file:// URI; pass --output-uri s3://...",
            "foo: [1] (no FineTuneJob field)",
            "quantization_method: 'hqq' (only bnb is supported)",
        ],
        [],
    )
    assert conversion.document["metadata"] == {"name": "ftj-2nd-run", "namespace": "ml"}
    assert list(conversion.document) == ["apiVersion", "kind", "metadata", "spec"]


def test_qlora_keeps_quantization_keys_and_reports_dora(tmp_path: Path) -> None:
    model = tmp_path / "org" / "model"
    model.mkdir(parents=True)
    info_path = tmp_path / "data" / "dataset_info.json"
    train = {
        "model_name_or_path": str(model),
        "quantization_bit": 8,
        "use_dora": True,
        "quantization_type": "nf4",
        "double_quantization": "true",
        "quantization_method": "bnb",
        "dataset": " mine , ",
        "deepspeed": "ds_z2_offload_config.json",
        "fp16": True,
        "max_steps": 100,
        "warmup_steps": 0,
    }
    conversion = convert(
        train, INFO, tmp_path / "t.yaml", info_path, ConvertOptions(output_uri="s3://o/", procs_per_node=4)
    )
    _same(
        conversion,
        {
            "model": {"uri": f"file://{model.resolve()}"},
            "method": {
                "type": "qlora",
                "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target": ["all"]},
                "quantization": {"bits": 8, "type": "nf4", "doubleQuant": True},
            },
            "datasets": [
                {
                    "uri": f"file://{info_path.parent.resolve()}/mine.json",
                    "format": "alpaca",
                    "columns": {"prompt": "q", "response": "a"},
                    "maxSamples": 7,
                }
            ],
            "training": {"maxSteps": 100, "warmupSteps": 0, "packing": False, "precision": "fp16"},
            "deepspeed": {"zeroStage": 2, "offload": "optimizer"},
            "output": {"uri": "s3://o/"},
            "distribution": {"nodes": 1, "procsPerNode": 4},
        },
        [
            f"model_name_or_path: local path {str(model)!r} became a file:// URI;"
            " pass --model-uri s3://... for a cluster",
            "use_dora: DoRA on a quantized base is not offered; trained as QLoRA",
            "dataset_info.json entry 'mine': split='x' (not supported)",
            "deepspeed: ds_z2_offload_config.json not found; stage and offload taken from its name",
        ],
        [],
    )
    assert conversion.document["metadata"] == {"name": "t"}


def test_freeze_carries_its_keys_and_reports_the_lora_ones(tmp_path: Path) -> None:
    train = {
        "model_name_or_path": "org/model",
        "finetuning_type": "freeze",
        "freeze_trainable_layers": -2,
        "freeze_extra_modules": "embed_tokens,,norm",
        "lora_rank": 16,
        "quantization_type": "nf4",
        "dataset": "mine",
        "deepspeed": "ds_z0_config.json",
        "bf16": False,
    }
    options = ConvertOptions(name="given", model_uri="s3://m/", data_uri="s3://d/", output_uri="s3://o/")
    conversion = convert(train, INFO, tmp_path / "t.yaml", None, options)
    _same(
        conversion,
        {
            "model": {"uri": "s3://m/"},
            "method": {
                "type": "freeze",
                "freeze": {"trainableLayers": 2, "extraModules": ["embed_tokens", "", "norm"]},
            },
            "datasets": [
                {
                    "uri": "s3://d/mine.json",
                    "format": "alpaca",
                    "columns": {"prompt": "q", "response": "a"},
                    "maxSamples": 7,
                }
            ],
            "training": {"packing": False, "precision": "fp32"},
            "deepspeed": {"zeroStage": 0, "offload": "none"},
            "output": {"uri": "s3://o/"},
        },
        [
            "dataset_info.json entry 'mine': split='x' (not supported)",
            "deepspeed: ds_z0_config.json not found; stage and offload taken from its name",
            "lora_rank: 16 (no FineTuneJob field)",
            "quantization_type: 'nf4' (no FineTuneJob field)",
        ],
        [],
    )
    assert conversion.document["metadata"] == {"name": "given"}


def test_full_without_freeze_keys_reports_them(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"offload_param": {"device": "cpu"}}}))
    train = {
        "model_name_or_path": "org/model",
        "finetuning_type": "full",
        "freeze_trainable_layers": 2,
        "additional_target": "lm_head",
        "dataset": "mine",
        "deepspeed": "ds.json",
        "output_dir": "out",
    }
    conversion = convert(train, INFO, tmp_path / "t.yaml", None, ConvertOptions(output_uri="s3://o/"))
    assert conversion.document["spec"]["method"] == {"type": "full"}
    assert conversion.document["spec"]["deepspeed"] == {"zeroStage": 0, "offload": "all"}
    assert conversion.not_carried[-2:] == [
        "additional_target: 'lm_head' (no FineTuneJob field)",
        "freeze_trainable_layers: 2 (no FineTuneJob field)",
    ]
    assert conversion.errors == []


def test_every_refusal_is_reported_in_order(tmp_path: Path) -> None:
    train = {
        "stage": "pt",
        "trust_remote_code": True,
        "finetuning_type": "full",
        "quantization_bit": 4,
        "dataset": "ms,nosource,pairs,absent",
        "eval_dataset": "hub",
        "template": "nope",
        "deepspeed": "custom.json",
    }
    conversion = convert(train, INFO, tmp_path / "t.yaml", tmp_path / "info.json", ConvertOptions())
    spec = {
        "model": {"trustRemoteCode": True},
        "method": {"type": "full"},
        "evalDatasets": [
            {
                "uri": "hf://org/chats",
                "format": "sharegpt",
                "columns": {"messages": "msgs"},
                "tags": {"role_tag": "role", "assistant_tag": "assistant"},
            }
        ],
        "training": {"packing": False, "precision": "fp32"},
        "output": {},
    }
    errors = [
        "stage: only sft is supported, got 'pt'",
        "model_name_or_path: required (or pass --model-uri)",
        "quantization_bit: 4 needs finetuning_type lora (QLoRA), got 'full'",
        "dataset_info.json entry 'ms': source ms_hub_url is not supported; use file_name or hf_hub_url",
        "dataset_info.json entry 'nosource': source (none) is not supported; use file_name or hf_hub_url",
        "dataset_info.json entry 'pairs': ranking (preference) data is not supervised fine-tuning data",
        f"dataset: 'absent' is not in {tmp_path / 'info.json'} (entries: hub, mine, ms, nosource, pairs)",
    ]
    template_error = [e for e in conversion.errors if e.startswith("template:")]
    assert conversion.errors[: len(errors)] == errors
    assert len(template_error) == 1
    assert conversion.errors[len(errors) + 1 :] == [
        "deepspeed: custom.json is neither a readable file nor a ds_z<stage>[_offload] name",
        "output_dir: required (or pass --output-uri)",
    ]
    assert conversion.document["spec"] == spec
    assert json.dumps(conversion.document["spec"]) == json.dumps(spec)


@pytest.mark.parametrize(
    ("train", "errors"),
    [
        ({}, ["model_name_or_path: required (or pass --model-uri)"]),
        ({"model_name_or_path": "org/m"}, ["dataset: at least one dataset is required"]),
        ({"model_name_or_path": "org/m", "dataset": " , "}, ["dataset: at least one dataset is required"]),
        (
            {"model_name_or_path": "org/m", "finetuning_type": None},
            ["finetuning_type: must be lora, full or freeze, got None"],
        ),
    ],
)
def test_a_dataset_is_required_unless_something_else_failed(
    tmp_path: Path, train: dict[str, Any], errors: list[str]
) -> None:
    conversion = convert(train, {}, tmp_path / "t.yaml", None, ConvertOptions(output_uri="s3://o/"))
    assert conversion.errors == errors
    assert "datasets" not in conversion.document["spec"]


def test_bad_values_raise_as_before(tmp_path: Path) -> None:
    train = {"model_name_or_path": "org/m", "dataset": "mine", "lora_rank": "eight"}
    with pytest.raises(ValueError, match="invalid literal for int"):
        convert(train, INFO, tmp_path / "t.yaml", None, ConvertOptions(output_uri="s3://o/"))


def test_tracking_attention_and_liger_keys_are_carried(tmp_path: Path) -> None:
    from finetune_operator.api import validate_document

    train = {
        "model_name_or_path": "s3://models/base/",
        "dataset": "mine",
        "output_dir": "s3://runs/out/",
        "report_to": "wandb,tensorboard,comet_ml",
        "use_swanlab": True,
        "swanlab_project": "llamafactory",
        "swanlab_run_name": "qwen2-7b-lora-math",
        "swanlab_api_key": "sk-do-not-echo",
        "swanlab_mode": "cloud",
        "flash_attn": "fa2",
        "enable_liger_kernel": True,
    }
    conversion = convert(train, INFO, tmp_path / "t.yaml", None, ConvertOptions(output_uri="s3://runs/out/"))
    spec = conversion.document["spec"]
    assert spec["tracking"] == {
        "reportTo": ["wandb", "swanlab"],
        "project": "llamafactory",
        "runName": "qwen2-7b-lora-math",
    }
    assert spec["training"]["attention"] == "flash_attention_2"
    assert spec["training"]["liger"] is True
    assert conversion.errors == []
    unsupported = "report_to: comet_ml is not supported (tracking.reportTo takes wandb, mlflow or swanlab; "
    assert unsupported + "TensorBoard files are always written)" in conversion.not_carried
    assert any(line.startswith("swanlab_api_key: a key does not belong in a spec") for line in conversion.not_carried)
    assert "sk-do-not-echo" not in json.dumps([conversion.document, conversion.not_carried])
    assert "swanlab_mode: set SWANLAB_MODE in spec.env" in conversion.not_carried
    job, errors = validate_document(conversion.document)
    assert job is not None, errors


def _convert_with(tmp_path: Path, **keys: Any) -> Conversion:
    """A minimal LLaMA-Factory config (model, dataset `mine`) plus `keys`, converted with an S3 output."""
    train = {"model_name_or_path": "s3://models/base/", "dataset": "mine", **keys}
    return convert(train, INFO, tmp_path / "t.yaml", None, ConvertOptions(output_uri="s3://runs/out/"))


@pytest.mark.parametrize(
    ("flash_attn", "attention"),
    [
        ("auto", "auto"),
        ("disabled", "eager"),
        ("sdpa", "sdpa"),
        ("fa2", "flash_attention_2"),
        ("fa3", "flash_attention_3"),
    ],
)
def test_flash_attn_values_map_to_training_attention(tmp_path: Path, flash_attn: str, attention: str) -> None:
    conversion = _convert_with(tmp_path, flash_attn=flash_attn)
    assert conversion.document["spec"]["training"]["attention"] == attention


def test_an_unknown_flash_attn_value_is_an_error(tmp_path: Path) -> None:
    conversion = _convert_with(tmp_path, flash_attn="fa9")
    assert conversion.errors == ["flash_attn: 'fa9' is not one of auto, disabled, sdpa, fa2, fa3"]


def test_fsdp_settings_are_carried_and_other_strategies_reported(tmp_path: Path) -> None:
    from finetune_operator.api import validate_document

    (tmp_path / "fsdp.yaml").write_text(
        "fsdp_offload_params: true\nfsdp_version: 2\nfsdp_backward_prefetch: BACKWARD_PRE\n"
    )
    conversion = _convert_with(tmp_path, fsdp="full_shard auto_wrap", fsdp_config="fsdp.yaml")
    assert conversion.errors == []
    assert conversion.document["spec"]["fsdp"] == {"offload": True}
    fsdp_lines = [line for line in conversion.not_carried if line.startswith("fsdp")]
    assert fsdp_lines == ["fsdp_config.fsdp_backward_prefetch: 'BACKWARD_PRE' (FSDP2 settings are the operator's)"]
    job, errors = validate_document(conversion.document)
    assert job is not None, errors

    conversion = _convert_with(tmp_path, fsdp=["shard_grad_op", "auto_wrap"])
    assert conversion.document["spec"]["fsdp"] == {}
    fsdp_lines = [line for line in conversion.not_carried if line.startswith("fsdp")]
    assert fsdp_lines == ["fsdp: shard_grad_op (FineTuneJobs shard fully: full_shard, FSDP2)"]

    conversion = _convert_with(tmp_path, fsdp="full_shard", deepspeed="ds_z3_config.json")
    _, errors = validate_document(conversion.document)
    assert errors == ["spec: set deepspeed or fsdp, not both"]
