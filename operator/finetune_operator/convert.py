"""Turn a LLaMA-Factory SFT training YAML (plus its dataset_info.json entries) into a FineTuneJob.

Every key of the source is accounted for: carried into the spec, implied by how the operator works, or reported as
not carried with the reason, so a user knows exactly what changed in the move.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_operator.api import API_VERSION_FULL, KIND, MAX_JOB_NAME
from finetune_trainer.config import TEMPLATES

# Keys that need no field because the operator does that job itself.
IMPLIED = {
    "do_train": "training always runs",
    "stage": "only sft exists here",
    "overwrite_output_dir": "each run writes its own output prefix",
    "overwrite_cache": "the tokenized cache is keyed by data, tokenizer and settings",
    "resume_from_checkpoint": "the trainer resumes from the newest complete checkpoint by itself",
    "eval_strategy": "evaluation runs every evalSteps when eval data exist",
    "evaluation_strategy": "evaluation runs every evalSteps when eval data exist",
    "ddp_timeout": "the trainer sets collective timeouts itself",
    "save_only_model": "checkpoints always hold optimizer, scheduler and RNG state for exact resume",
    "report_to": "progress goes to FineTuneJob.status and structured logs",
    "preprocessing_num_workers": "tokenization runs once per node with the node's cores",
    "dataloader_num_workers": "chosen by the trainer",
    "quantization_method": "bitsandbytes is the quantization backend",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+$")


@dataclass
class Conversion:
    """The converted document, the keys left behind and the errors that stop a conversion."""

    document: dict[str, Any]
    not_carried: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class ConvertOptions:
    name: str | None = None
    namespace: str | None = None
    model_uri: str | None = None
    data_uri: str | None = None  # prefix that holds dataset_info.json's file_name entries
    output_uri: str | None = None
    nodes: int | None = None
    procs_per_node: int | None = None
    storage_secret: str | None = None
    storage_endpoint: str | None = None


def _truthy(value: Any) -> bool:
    return str(value).lower() in ("true", "1", "yes")


def _name_from(source: Path, options: ConvertOptions) -> str:
    if options.name:
        return options.name
    slug = re.sub(r"[^a-z0-9-]+", "-", source.stem.lower()).strip("-") or "finetune"
    if not slug[0].isalpha():
        slug = "ftj-" + slug
    return slug[:MAX_JOB_NAME].rstrip("-")


def _join(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name.lstrip("/")


def _dataset(
    name: str, info: dict[str, Any], info_path: Path | None, options: ConvertOptions, conv: Conversion
) -> dict[str, Any] | None:
    where = f"dataset_info.json entry {name!r}"
    if name not in info:
        known = ", ".join(sorted(info)) or "none"
        conv.errors.append(f"dataset: {name!r} is not in {info_path or 'dataset_info.json'} (entries: {known})")
        return None
    entry = info[name]
    out: dict[str, Any] = {}
    if "file_name" in entry:
        base = options.data_uri or (f"file://{info_path.parent.resolve()}" if info_path else "file://data")
        out["uri"] = _join(base, entry["file_name"])
    elif "hf_hub_url" in entry:
        out["uri"] = "hf://" + entry["hf_hub_url"]
    else:
        source = next((k for k in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if k in entry), None)
        conv.errors.append(f"{where}: source {source or '(none)'} is not supported; use file_name or hf_hub_url")
        return None
    if _truthy(entry.get("ranking", False)):
        conv.errors.append(f"{where}: ranking (preference) data is not supervised fine-tuning data")
        return None
    out["format"] = entry.get("formatting", "alpaca")
    if entry.get("columns"):
        out["columns"] = dict(entry["columns"])
    if entry.get("tags"):
        out["tags"] = dict(entry["tags"])
    if "num_samples" in entry:
        out["maxSamples"] = int(entry["num_samples"])
    for key in sorted(set(entry) - {"file_name", "hf_hub_url", "formatting", "columns", "tags", "ranking"}):
        if key != "num_samples":
            conv.not_carried.append(f"{where}: {key}={entry[key]!r} (not supported)")
    return out


def _deepspeed(value: str, source: Path, conv: Conversion) -> dict[str, Any] | None:
    path = Path(value)
    if not path.is_absolute():
        path = source.parent / path
    if path.is_file():
        cfg = json.loads(path.read_text())
        zero = cfg.get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        param = zero.get("offload_param", {}).get("device", "none")
        optim = zero.get("offload_optimizer", {}).get("device", "none")
        offload = "all" if param == "cpu" else "optimizer" if optim == "cpu" else "none"
        return {"zeroStage": stage, "offload": offload}
    # The stock LLaMA-Factory names (ds_z3_offload_config.json ...) say the stage and offload.
    match = re.search(r"z(\d)(_offload)?", path.name)
    if match:
        stage = int(match.group(1))
        conv.not_carried.append(f"deepspeed: {value} not found; stage and offload taken from its name")
        return {"zeroStage": stage, "offload": ("all" if stage == 3 else "optimizer") if match.group(2) else "none"}
    conv.errors.append(f"deepspeed: {value} is neither a readable file nor a ds_z<stage>[_offload] name")
    return None


def convert(
    train: dict[str, Any], dataset_info: dict[str, Any], source: Path, info_path: Path | None, options: ConvertOptions
) -> Conversion:
    """Convert a parsed LLaMA-Factory YAML; `source` locates relative paths (deepspeed JSON)."""
    conv = Conversion(document={})
    left = dict(train)

    def take(key: str, default: Any = None) -> Any:
        return left.pop(key, default)

    stage = take("stage", "sft")
    if stage != "sft":
        conv.errors.append(f"stage: only sft is supported, got {stage!r}")

    spec: dict[str, Any] = {}
    model_path = str(take("model_name_or_path", "") or "")
    if options.model_uri:
        spec["model"] = {"uri": options.model_uri}
    elif not model_path:
        conv.errors.append("model_name_or_path: required (or pass --model-uri)")
    elif "://" in model_path:
        spec["model"] = {"uri": model_path}
    elif _HUB_ID.match(model_path) and not Path(model_path).exists():
        spec["model"] = {"uri": "hf://" + model_path}
    else:
        spec["model"] = {"uri": "file://" + str(Path(model_path).resolve())}
        conv.not_carried.append(
            f"model_name_or_path: local path {model_path!r} became a file:// URI;"
            " pass --model-uri s3://... for a cluster"
        )
    if _truthy(take("trust_remote_code", False)):
        spec.setdefault("model", {})["trustRemoteCode"] = True

    # --- method
    ftype = take("finetuning_type", "lora")
    bits = take("quantization_bit")
    dora = _truthy(take("use_dora", False))
    method: dict[str, Any] = {}
    if ftype == "lora":
        method["type"] = "qlora" if bits else "dora" if dora else "lora"
        if bits and dora:
            conv.not_carried.append("use_dora: DoRA on a quantized base is not offered; trained as QLoRA")
        rank = int(take("lora_rank", 8))
        lora: dict[str, Any] = {
            "rank": rank,
            # LLaMA-Factory's defaults when unset: alpha = 2 * rank, dropout 0.
            "alpha": float(take("lora_alpha", rank * 2)),
            "dropout": float(take("lora_dropout", 0.0)),
        }
        target = take("lora_target", "all")
        lora["target"] = [t.strip() for t in str(target).split(",") if t.strip()]
        if "additional_target" in left:
            lora["modulesToSave"] = [t.strip() for t in str(take("additional_target")).split(",")]
        method["lora"] = lora
        if bits:
            quant: dict[str, Any] = {"bits": int(bits)}
            if "quantization_type" in left:
                quant["type"] = take("quantization_type")
            if "double_quantization" in left:
                quant["doubleQuant"] = _truthy(take("double_quantization"))
            method["quantization"] = quant
    elif ftype in ("full", "freeze"):
        method["type"] = ftype
        if bits:
            conv.errors.append(f"quantization_bit: {bits} needs finetuning_type lora (QLoRA), got {ftype!r}")
        if ftype == "freeze":
            freeze: dict[str, Any] = {}
            if "freeze_trainable_layers" in left:
                freeze["trainableLayers"] = abs(int(take("freeze_trainable_layers")))
            if "freeze_extra_modules" in left:
                freeze["extraModules"] = [m.strip() for m in str(take("freeze_extra_modules")).split(",")]
            if freeze:
                method["freeze"] = freeze
    else:
        conv.errors.append(f"finetuning_type: must be lora, full or freeze, got {ftype!r}")
    spec["method"] = method

    # --- data
    max_samples = take("max_samples")
    for key, target in (("dataset", "datasets"), ("eval_dataset", "evalDatasets")):
        names = [n.strip() for n in str(take(key, "") or "").split(",") if n.strip()]
        entries = [d for n in names if (d := _dataset(n, dataset_info, info_path, options, conv))]
        if max_samples and target == "datasets":
            for d in entries:
                d.setdefault("maxSamples", int(max_samples))
        if entries:
            spec[target] = entries
    if "datasets" not in spec and not conv.errors:
        conv.errors.append("dataset: at least one dataset is required")
    val_size = take("val_size")
    if val_size:
        if float(val_size) < 1:
            spec["valSize"] = float(val_size)
        else:
            conv.not_carried.append(f"val_size: {val_size} (a sample count); valSize is a fraction below 1")
    template = take("template")
    if template:
        # Every LLaMA-Factory template name is one here too, with the same prompt text and trained tokens.
        if template in TEMPLATES:
            spec["template"] = template
        else:
            conv.errors.append(
                f"template: {template!r} is not a LLaMA-Factory text template; use one of {', '.join(TEMPLATES[1:])}"
            )

    # --- training
    training: dict[str, Any] = {}
    mapping: dict[str, tuple[str, Callable[[Any], Any]]] = {
        "num_train_epochs": ("epochs", float),
        "max_steps": ("maxSteps", int),
        "learning_rate": ("learningRate", float),
        "lr_scheduler_type": ("lrScheduler", str),
        "warmup_steps": ("warmupSteps", int),
        "warmup_ratio": ("warmupRatio", float),
        "weight_decay": ("weightDecay", float),
        "max_grad_norm": ("maxGradNorm", float),
        "per_device_train_batch_size": ("perDeviceBatchSize", int),
        "per_device_eval_batch_size": ("perDeviceEvalBatchSize", int),
        "gradient_accumulation_steps": ("gradientAccumulationSteps", int),
        "cutoff_len": ("cutoffLen", int),
        "logging_steps": ("loggingSteps", int),
        "save_steps": ("saveSteps", int),
        "eval_steps": ("evalSteps", int),
        "seed": ("seed", int),
        "train_on_prompt": ("trainOnPrompt", _truthy),
        "mask_history": ("maskHistory", _truthy),
    }
    for key, (name, cast) in mapping.items():
        if key in left:
            value = take(key)
            training[name] = cast(value)
    if training.get("maxSteps", 1) <= 0:  # LLaMA-Factory writes max_steps: -1 for "use epochs"
        training.pop("maxSteps")
    if training.get("warmupSteps") == 0 and "warmupRatio" in training:
        training.pop("warmupSteps")
    # LLaMA-Factory does not pack SFT data unless asked; keep that behaviour.
    training["packing"] = _truthy(take("packing", False)) or _truthy(take("neat_packing", False))
    left.pop("neat_packing", None)
    bf16, fp16, pure_bf16 = _truthy(take("bf16", False)), _truthy(take("fp16", False)), take("pure_bf16")
    training["precision"] = "bf16" if bf16 or _truthy(pure_bf16) else "fp16" if fp16 else "fp32"
    if "disable_gradient_checkpointing" in left:
        training["gradientCheckpointing"] = not _truthy(take("disable_gradient_checkpointing"))
    spec["training"] = training

    ds = take("deepspeed")
    if ds:
        deepspeed = _deepspeed(str(ds), source, conv)
        if deepspeed:
            spec["deepspeed"] = deepspeed

    # --- output
    output_dir = take("output_dir")
    output: dict[str, Any] = {}
    if options.output_uri:
        output["uri"] = options.output_uri
    elif output_dir:
        output["uri"] = "file://" + str(Path(str(output_dir)).resolve())
        conv.not_carried.append(f"output_dir: {output_dir!r} became a file:// URI; pass --output-uri s3://...")
    else:
        conv.errors.append("output_dir: required (or pass --output-uri)")
    if "plot_loss" in left:
        output["plotLoss"] = _truthy(take("plot_loss"))
    merge: dict[str, Any] = {}
    if "export_dir" in left:
        merge["uri"] = "file://" + str(Path(str(take("export_dir"))).resolve())
    if "export_size" in left:
        merge["maxShardSize"] = f"{int(take('export_size'))}GB"
    if merge:
        output["merge"] = merge
    spec["output"] = output

    if options.storage_endpoint or options.storage_secret:
        storage: dict[str, Any] = {}
        if options.storage_endpoint:
            storage["endpoint"] = options.storage_endpoint
        if options.storage_secret:
            storage["secretRef"] = {"name": options.storage_secret}
        spec["storage"] = storage
    if options.nodes or options.procs_per_node:
        spec["distribution"] = {"nodes": options.nodes or 1, "procsPerNode": options.procs_per_node or 1}

    for key in sorted(left):
        reason = IMPLIED.get(key)
        if reason is None:
            conv.not_carried.append(f"{key}: {left[key]!r} (no FineTuneJob field)")
        elif key == "quantization_method" and str(left[key]).lower() != "bnb":
            conv.not_carried.append(f"quantization_method: {left[key]!r} (only bnb is supported)")

    metadata: dict[str, Any] = {"name": _name_from(source, options)}
    if options.namespace:
        metadata["namespace"] = options.namespace
    conv.document = {"apiVersion": API_VERSION_FULL, "kind": KIND, "metadata": metadata, "spec": spec}
    return conv
