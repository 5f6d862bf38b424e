"""Turn a LLaMA-Factory SFT training YAML (plus its dataset_info.json entries) into a FineTuneJob.

Every key of the source is accounted for: carried into the spec, implied by how the operator works, or reported as
not carried with the reason, so a user knows exactly what changed in the move.

MAPPING is the whole mapping, in the order it runs (which is also the order of the spec's keys): a Field carries one
key, when present, to a spec path through a value transform; a Rule hands several keys (with LLaMA-Factory's defaults)
to a named function that may also report. Keys left over are IMPLIED by how the operator works or reported as not
carried.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.api import API_VERSION_FULL, KIND, MAX_JOB_NAME
from finetune_trainer.config import METHOD_REGISTRY, TEMPLATES, TRACKERS
from finetune_trainer.rules import human_list

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
    "preprocessing_num_workers": "tokenization runs once per node with the node's cores",
    "dataloader_num_workers": "chosen by the trainer",
    "quantization_method": "bitsandbytes is the quantization backend",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+$")

# As a Rule's default: the source lacks the key. As a transform's result: the spec path stays unset.
_MISSING: Any = object()


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


@dataclass
class _Context:
    """What a Rule reads besides its own keys, and where it reports."""

    conv: Conversion
    left: dict[str, Any]  # the source keys no entry has consumed yet
    source: Path
    info: dict[str, Any]
    info_path: Path | None
    options: ConvertOptions

    def take(self, key: str, default: Any = None) -> Any:
        return self.left.pop(key, default)

    def carry(self, *fields: Field) -> dict[str, Any]:
        """The fields the source has, as a sub-object (paths relative to it)."""
        out: dict[str, Any] = {}
        for f in fields:
            f.apply(self, out)
        return out


def _put(into: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path, making the objects on the way; _MISSING leaves it (and them) unset."""
    if value is _MISSING:
        return
    *parents, last = path.split(".")
    for part in parents:
        into = into.setdefault(part, {})
    into[last] = value


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Field:
    """One LLaMA-Factory key, carried when the source has it to a dotted spec path through a value transform."""

    key: str
    path: str
    transform: Callable[[Any], Any] = _same

    def apply(self, ctx: _Context, into: dict[str, Any]) -> None:
        if self.key in ctx.left:
            _put(into, self.path, self.transform(ctx.take(self.key)))


@dataclass(frozen=True)
class Rule:
    """LLaMA-Factory keys, with LLaMA-Factory's defaults, that a named function maps to spec paths.

    The function gets the context and the keys' values in this order; it returns the value for `to` (a tuple of
    values when `to` is a tuple of paths), may report into the conversion and may consume further keys.
    """

    keys: dict[str, Any]
    to: str | tuple[str, ...]
    fn: Callable[..., Any]

    def apply(self, ctx: _Context, into: dict[str, Any]) -> None:
        value = self.fn(ctx, *[ctx.take(key, default) for key, default in self.keys.items()])
        if isinstance(self.to, str):
            _put(into, self.to, value)
        else:
            for path, item in zip(self.to, value, strict=True):
                _put(into, path, item)


# --- value transforms


def _names(value: Any) -> list[str]:
    return [t.strip() for t in str(value).split(",") if t.strip()]


def _split(value: Any) -> list[str]:  # unlike _names, keeps blank items
    return [t.strip() for t in str(value).split(",")]


def _true_or_missing(value: Any) -> Any:
    return True if _truthy(value) else _MISSING


def _not_truthy(value: Any) -> bool:
    return not _truthy(value)


def _positive_steps(value: Any) -> Any:  # LLaMA-Factory writes max_steps: -1 for "use epochs"
    steps = int(value)
    return steps if steps > 0 else _MISSING


def _abs_int(value: Any) -> int:
    return abs(int(value))


def _file_uri(value: Any) -> str:
    return "file://" + str(Path(str(value)).resolve())


def _gigabytes(value: Any) -> str:
    return f"{int(value)}GB"


# --- named functions for the mappings that need more than a transform


def _only_sft(ctx: _Context, stage: Any) -> tuple[()]:
    if stage != "sft":
        ctx.conv.errors.append(f"stage: only sft is supported, got {stage!r}")
    return ()


def _model(ctx: _Context, name_or_path: Any) -> Any:
    model_path = str(name_or_path or "")
    if ctx.options.model_uri:
        return {"uri": ctx.options.model_uri}
    if not model_path:
        ctx.conv.errors.append("model_name_or_path: required (or pass --model-uri)")
        return _MISSING
    if "://" in model_path:
        return {"uri": model_path}
    if _HUB_ID.match(model_path) and not Path(model_path).exists():
        return {"uri": "hf://" + model_path}
    uri = _file_uri(model_path)
    ctx.conv.not_carried.append(
        f"model_name_or_path: local path {model_path!r} became a file:// URI; pass --model-uri s3://... for a cluster"
    )
    return {"uri": uri}


def _method_from_lf(ctx: _Context, ftype: Any, bits: Any, use_dora: Any) -> dict[str, Any]:
    """finetuning_type + quantization_bit + use_dora -> method.type (METHOD_REGISTRY's lf_* fields); the chosen
    method's keys -> its sub-objects."""
    # Adapter methods first: LLaMA-Factory's own order (lora, full, freeze).
    registry = sorted(METHOD_REGISTRY.values(), key=lambda m: not m.adapter)
    kinds = list(dict.fromkeys(m.lf_finetuning_type for m in registry))
    if ftype not in kinds:
        ctx.conv.errors.append(f"finetuning_type: must be {human_list(kinds, 'or')}, got {ftype!r}")
        return {}
    candidates = [m for m in registry if m.lf_finetuning_type == ftype]
    quantized, dora = bool(bits), _truthy(use_dora)
    if quantized and not any(m.lf_quantization for m in candidates):
        ctx.conv.errors.append(f"quantization_bit: {bits} needs finetuning_type lora (QLoRA), got {ftype!r}")
        quantized = False
    if quantized and dora:
        ctx.conv.not_carried.append("use_dora: DoRA on a quantized base is not offered; trained as QLoRA")
    dora = dora and not quantized and any(m.lf_use_dora for m in candidates)
    method = next(m for m in candidates if (m.lf_quantization, m.lf_use_dora) == (quantized, dora))
    out: dict[str, Any] = {"type": method.name}
    if "lora" in method.settings:
        rank = int(ctx.take("lora_rank", 8))
        out["lora"] = {
            "rank": rank,
            # LLaMA-Factory's defaults when unset: alpha = 2 * rank, dropout 0.
            "alpha": float(ctx.take("lora_alpha", rank * 2)),
            "dropout": float(ctx.take("lora_dropout", 0.0)),
            "target": _names(ctx.take("lora_target", "all")),
            **ctx.carry(Field("additional_target", "modulesToSave", _split)),
        }
    if "quantization" in method.settings:
        out["quantization"] = {
            "bits": int(bits),
            **ctx.carry(Field("quantization_type", "type"), Field("double_quantization", "doubleQuant", _truthy)),
        }
    if "freeze" in method.settings:
        freeze = ctx.carry(
            Field("freeze_trainable_layers", "trainableLayers", _abs_int),
            Field("freeze_extra_modules", "extraModules", _split),
        )
        if freeze:
            out["freeze"] = freeze
    return out


def _dataset_list(ctx: _Context, names: Any) -> list[dict[str, Any]]:
    wanted = [n.strip() for n in str(names or "").split(",") if n.strip()]
    return [d for n in wanted if (d := _dataset(n, ctx.info, ctx.info_path, ctx.options, ctx.conv))]


def _datasets(ctx: _Context, dataset: Any, eval_dataset: Any, max_samples: Any) -> tuple[Any, Any]:
    train = _dataset_list(ctx, dataset)
    if max_samples:
        for d in train:
            d.setdefault("maxSamples", int(max_samples))
    evals = _dataset_list(ctx, eval_dataset)
    if not train and not ctx.conv.errors:
        ctx.conv.errors.append("dataset: at least one dataset is required")
    return train or _MISSING, evals or _MISSING


def _val_size(ctx: _Context, val_size: Any) -> Any:
    if not val_size:
        return _MISSING
    if float(val_size) < 1:
        return float(val_size)
    ctx.conv.not_carried.append(f"val_size: {val_size} (a sample count); valSize is a fraction below 1")
    return _MISSING


def _template(ctx: _Context, template: Any) -> Any:
    # Every LLaMA-Factory template name is one here too, with the same prompt text and trained tokens.
    if not template:
        return _MISSING
    if template in TEMPLATES:
        return template
    ctx.conv.errors.append(
        f"template: {template!r} is not a LLaMA-Factory text template; use one of {', '.join(TEMPLATES[1:])}"
    )
    return _MISSING


def _warmup(_ctx: _Context, steps: Any, ratio: Any) -> tuple[Any, Any]:
    """warmup_steps: 0 beside a warmup_ratio is LLaMA-Factory's way of saying "use the ratio"."""
    steps = steps if steps is _MISSING else int(steps)
    ratio = ratio if ratio is _MISSING else float(ratio)
    return (_MISSING if steps == 0 and ratio is not _MISSING else steps), ratio


def _packing(_ctx: _Context, packing: Any, neat_packing: Any) -> bool:
    # LLaMA-Factory does not pack SFT data unless asked; keep that behaviour.
    return _truthy(packing) or _truthy(neat_packing)


def _precision(_ctx: _Context, bf16: Any, fp16: Any, pure_bf16: Any) -> str:
    return "bf16" if _truthy(bf16) or _truthy(pure_bf16) else "fp16" if _truthy(fp16) else "fp32"


def _deepspeed(ctx: _Context, value: Any) -> Any:
    if not value:
        return _MISSING
    value = str(value)
    path = Path(value)
    if not path.is_absolute():
        path = ctx.source.parent / path
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
        ctx.conv.not_carried.append(f"deepspeed: {value} not found; stage and offload taken from its name")
        return {"zeroStage": stage, "offload": ("all" if stage == 3 else "optimizer") if match.group(2) else "none"}
    ctx.conv.errors.append(f"deepspeed: {value} is neither a readable file nor a ds_z<stage>[_offload] name")
    return _MISSING


# LLaMA-Factory's flash_attn values -> training.attention.
_ATTENTION = {
    "auto": "auto",
    "disabled": "eager",
    "sdpa": "sdpa",
    "fa2": "flash_attention_2",
    "fa3": "flash_attention_3",
}


def _attention(ctx: _Context, value: Any) -> Any:
    if value is _MISSING:
        return _MISSING
    found = _ATTENTION.get(str(value).lower())
    if found is None:
        ctx.conv.errors.append(f"flash_attn: {value!r} is not one of {', '.join(_ATTENTION)}")
        return _MISSING
    return found


def _tracking(
    ctx: _Context,
    report_to: Any,
    use_swanlab: Any,
    swanlab_project: Any,
    swanlab_run_name: Any,
    run_name: Any,
) -> Any:
    """report_to (a name, a comma list or a list) and use_swanlab -> tracking.reportTo; the SwanLab project and run
    name; TensorBoard needs no key (its files are always written). SwanLab's other keys are reported by the caller."""
    names = report_to if isinstance(report_to, list) else _names(report_to) if report_to is not _MISSING else []
    services: list[str] = []
    for name in (str(n).strip().lower() for n in names):
        if name in TRACKERS and name not in services:
            services.append(name)
        elif name == "all":
            ctx.conv.not_carried.append(
                f"report_to: all; name the services instead (tracking.reportTo: {', '.join(TRACKERS)})"
            )
        elif name not in ("none", "tensorboard", ""):
            ctx.conv.not_carried.append(
                f"report_to: {name} is not supported (tracking.reportTo takes {human_list(TRACKERS, 'or')}; "
                "TensorBoard files are always written)"
            )
    if _truthy(use_swanlab) and "swanlab" not in services:
        services.append("swanlab")
    out: dict[str, Any] = {}
    if services:
        out["reportTo"] = services
    if swanlab_project is not _MISSING:
        out["project"] = str(swanlab_project)
    name = swanlab_run_name if swanlab_run_name is not _MISSING else run_name
    if name is not _MISSING:
        out["runName"] = str(name)
    for key, hint in (
        (
            "swanlab_api_key",
            "a key does not belong in a spec: put SWANLAB_API_KEY into a Secret named by tracking.secretRef",
        ),
        ("swanlab_mode", "set SWANLAB_MODE in spec.env"),
        ("swanlab_workspace", "set SWANLAB_WORKSPACE in spec.env"),
        ("swanlab_logdir", "SwanLab's local files stay in the trainer's scratch directory"),
        ("swanlab_lark_webhook_url", "not supported"),
        ("swanlab_lark_secret", "not supported"),
    ):
        if key in ctx.left:
            ctx.take(key)  # the value is never echoed: it may be a credential
            ctx.conv.not_carried.append(f"{key}: {hint}")
    return out or _MISSING


# transformers' fsdp options (LLaMA-Factory passes them through) that FineTuneJobs express, or not.
_FSDP_IMPLIED = {"full_shard", "auto_wrap", "true", "1", "yes"}
_FSDP_OFFLOAD_KEYS = ("offload_params", "fsdp_offload_params", "cpu_offload", "fsdp_cpu_offload")


def _fsdp(ctx: _Context, fsdp: Any, fsdp_config: Any) -> Any:
    """fsdp ("full_shard auto_wrap [offload]", a list of them, or true) and fsdp_config (a dict or a JSON/YAML
    file) -> spec.fsdp; sharding strategies other than full sharding and other fsdp_config keys are reported."""
    options = fsdp if isinstance(fsdp, list) else str(fsdp).split() if fsdp is not _MISSING else []
    options = [str(o).strip().lower() for o in options if str(o).strip()]
    if not options or options in (["false"], ["0"], ["no"]):
        if fsdp_config is not _MISSING:
            ctx.conv.not_carried.append("fsdp_config: without fsdp it has no effect")
        return _MISSING
    out: dict[str, Any] = {}
    for option in options:
        if option == "offload":
            out["offload"] = True
        elif option not in _FSDP_IMPLIED:
            ctx.conv.not_carried.append(f"fsdp: {option} (FineTuneJobs shard fully: full_shard, FSDP2)")
    settings: Any = fsdp_config
    if isinstance(fsdp_config, str):
        path = Path(fsdp_config) if Path(fsdp_config).is_absolute() else ctx.source.parent / fsdp_config
        try:
            settings = yaml.safe_load(path.read_text())
        except (OSError, ValueError) as exc:
            ctx.conv.errors.append(f"fsdp_config: cannot read {fsdp_config}: {exc}")
            settings = {}
    if isinstance(settings, dict):
        for key, value in settings.items():
            if key in _FSDP_OFFLOAD_KEYS:
                if _truthy(value):
                    out["offload"] = True
            elif key in ("version", "fsdp_version") and str(value) == "2":
                pass
            else:
                ctx.conv.not_carried.append(f"fsdp_config.{key}: {value!r} (FSDP2 settings are the operator's)")
    return out


def _output(ctx: _Context, output_dir: Any) -> dict[str, Any]:
    if ctx.options.output_uri:
        return {"uri": ctx.options.output_uri}
    if output_dir:
        uri = _file_uri(output_dir)
        ctx.conv.not_carried.append(f"output_dir: {output_dir!r} became a file:// URI; pass --output-uri s3://...")
        return {"uri": uri}
    ctx.conv.errors.append("output_dir: required (or pass --output-uri)")
    return {}


# LLaMA-Factory key(s) -> FineTuneJob.spec path(s), in the order they run and appear in the spec.
MAPPING: tuple[Field | Rule, ...] = (
    Rule({"stage": "sft"}, (), _only_sft),
    Rule({"model_name_or_path": ""}, "model", _model),
    Field("trust_remote_code", "model.trustRemoteCode", _true_or_missing),
    Rule({"finetuning_type": "lora", "quantization_bit": None, "use_dora": False}, "method", _method_from_lf),
    Rule({"dataset": "", "eval_dataset": "", "max_samples": None}, ("datasets", "evalDatasets"), _datasets),
    Rule({"val_size": None}, "valSize", _val_size),
    Rule({"template": None}, "template", _template),
    Field("num_train_epochs", "training.epochs", float),
    Field("max_steps", "training.maxSteps", _positive_steps),
    Field("learning_rate", "training.learningRate", float),
    Field("lr_scheduler_type", "training.lrScheduler", str),
    Rule(
        {"warmup_steps": _MISSING, "warmup_ratio": _MISSING}, ("training.warmupSteps", "training.warmupRatio"), _warmup
    ),
    Field("weight_decay", "training.weightDecay", float),
    Field("max_grad_norm", "training.maxGradNorm", float),
    Field("per_device_train_batch_size", "training.perDeviceBatchSize", int),
    Field("per_device_eval_batch_size", "training.perDeviceEvalBatchSize", int),
    Field("gradient_accumulation_steps", "training.gradientAccumulationSteps", int),
    Field("cutoff_len", "training.cutoffLen", int),
    Field("logging_steps", "training.loggingSteps", int),
    Field("save_steps", "training.saveSteps", int),
    Field("eval_steps", "training.evalSteps", int),
    Field("seed", "training.seed", int),
    Field("train_on_prompt", "training.trainOnPrompt", _truthy),
    Field("mask_history", "training.maskHistory", _truthy),
    Rule({"packing": False, "neat_packing": False}, "training.packing", _packing),
    Rule({"bf16": False, "fp16": False, "pure_bf16": None}, "training.precision", _precision),
    Field("disable_gradient_checkpointing", "training.gradientCheckpointing", _not_truthy),
    Rule({"flash_attn": _MISSING}, "training.attention", _attention),
    Field("enable_liger_kernel", "training.liger", _truthy),
    Rule({"deepspeed": None}, "deepspeed", _deepspeed),
    Rule({"fsdp": _MISSING, "fsdp_config": _MISSING}, "fsdp", _fsdp),
    Rule({"output_dir": None}, "output", _output),
    Field("plot_loss", "output.plotLoss", _truthy),
    Rule(
        {
            "report_to": _MISSING,
            "use_swanlab": False,
            "swanlab_project": _MISSING,
            "swanlab_run_name": _MISSING,
            "run_name": _MISSING,
        },
        "tracking",
        _tracking,
    ),
    Field("export_dir", "output.merge.uri", _file_uri),
    Field("export_size", "output.merge.maxShardSize", _gigabytes),
)


def _from_options(options: ConvertOptions) -> dict[str, Any]:
    """The spec fields LLaMA-Factory has no key for: storage and distribution come from the command line."""
    spec: dict[str, Any] = {}
    if options.storage_endpoint or options.storage_secret:
        storage: dict[str, Any] = {}
        if options.storage_endpoint:
            storage["endpoint"] = options.storage_endpoint
        if options.storage_secret:
            storage["secretRef"] = {"name": options.storage_secret}
        spec["storage"] = storage
    if options.nodes or options.procs_per_node:
        spec["distribution"] = {"nodes": options.nodes or 1, "procsPerNode": options.procs_per_node or 1}
    return spec


def _report_left(left: dict[str, Any], conv: Conversion) -> None:
    """Every key no entry consumed is reported as not carried, unless IMPLIED by how the operator works."""
    for key in sorted(left):
        reason = IMPLIED.get(key)
        if reason is None:
            conv.not_carried.append(f"{key}: {left[key]!r} (no FineTuneJob field)")
        elif key == "quantization_method" and str(left[key]).lower() != "bnb":
            conv.not_carried.append(f"quantization_method: {left[key]!r} (only bnb is supported)")


def convert(
    train: dict[str, Any], dataset_info: dict[str, Any], source: Path, info_path: Path | None, options: ConvertOptions
) -> Conversion:
    """Convert a parsed LLaMA-Factory YAML; `source` locates relative paths (deepspeed JSON)."""
    ctx = _Context(Conversion(document={}), dict(train), source, dataset_info, info_path, options)
    spec: dict[str, Any] = {}
    for entry in MAPPING:
        entry.apply(ctx, spec)
    spec.update(_from_options(options))
    _report_left(ctx.left, ctx.conv)
    metadata: dict[str, Any] = {"name": _name_from(source, options)}
    if options.namespace:
        metadata["namespace"] = options.namespace
    ctx.conv.document = {"apiVersion": API_VERSION_FULL, "kind": KIND, "metadata": metadata, "spec": spec}
    return ctx.conv
