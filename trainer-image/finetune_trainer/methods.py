"""Model setup for each fine-tuning method: load the base, quantize it (qlora), and choose what trains.

full trains everything; freeze trains the last N decoder layers plus named modules; lora/dora wrap linear layers in
peft adapters; qlora loads the frozen base through bitsandbytes (4-bit nf4/fp4 with optional double quantization,
or 8-bit) and trains a LoRA adapter on top. The heavy lifting is transformers/peft/bitsandbytes; this module only
maps the MethodSpec onto them and checks module names so that a typo fails with the list of valid ones.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_trainer.config import MethodSpec, TrainerConfig
from finetune_trainer.device import device_type
from finetune_trainer.distenv import Ranks
from finetune_trainer.errors import ConfigError
from finetune_trainer.rules import human_list

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelSummary:
    method: str
    trainable_params: int
    total_params: int
    targets: tuple[str, ...] = ()
    trainable_layers: tuple[int, ...] = ()

    def line(self) -> str:
        pct = 100.0 * self.trainable_params / max(1, self.total_params)
        extra = f", targets {list(self.targets)}" if self.targets else ""
        extra += f", layers {list(self.trainable_layers)}" if self.trainable_layers else ""
        return f"{self.method}: {self.trainable_params:,} of {self.total_params:,} parameters train ({pct:.2f}%){extra}"


def compute_dtype(config: TrainerConfig) -> torch.dtype:
    return DTYPES[config.training.precision]


def load_dtype(config: TrainerConfig) -> torch.dtype:
    """The dtype the base weights are loaded in.

    Adapters train on a frozen base kept in the compute dtype (peft keeps the adapter itself in fp32). Full and
    freeze training without DeepSpeed load fp32 weights and run bf16/fp16 through autocast, because an optimizer
    stepping bf16 weights loses small updates and fp16 weights cannot be unscaled; DeepSpeed keeps its own fp32
    master copy, so there the base loads in the compute dtype.
    """
    if config.method.uses_adapter or config.deepspeed is not None:
        return compute_dtype(config)
    return torch.float32


# The package each flash-attention implementation needs (what transformers imports for it).
FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def attention_implementation(config: TrainerConfig) -> str:
    """training.attention as transformers' attn_implementation. auto: flash_attention_2 where it is installed and
    usable (CUDA, half precision), SDPA otherwise. Every choice keeps packed samples apart (finetune_trainer.data
    picks the collator for it). A flash-attention choice this process cannot run fails here, saying why."""
    choice = config.training.attention
    half = config.training.precision in ("bf16", "fp16")
    kind = device_type()
    if choice == "auto":
        if kind == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"
    package = FLASH_PACKAGES.get(choice)
    if package is not None:
        missing = []
        if kind != "cuda":
            missing.append(f"a CUDA device (this process has {kind})")
        if importlib.util.find_spec(package) is None:
            missing.append(f"the {package} package")
        if not half:
            missing.append(f"precision bf16 or fp16 (got {config.training.precision})")
        if missing:
            raise ConfigError(f"training.attention: {choice} needs {human_list(missing)}; use auto, sdpa or eager")
    return choice


def liger_model_types() -> list[str]:
    """The model types (config.model_type) liger-kernel has kernels for; ConfigError when it is not installed."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise ConfigError(f"training.liger: liger-kernel cannot be imported in this image ({exc})") from exc
    return sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)


def apply_liger(model: Any, config: TrainerConfig) -> list[str]:
    """training.liger: swap in Liger's kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU) on this model
    instance; returns the names of the modules replaced. ConfigError for a model family liger-kernel lacks."""
    supported = liger_model_types()
    model_type = str(getattr(model.config, "model_type", ""))
    if model_type not in supported:
        raise ConfigError(
            f"training.liger: liger-kernel has no kernels for model type {model_type!r} ({config.model.uri}); it "
            f"supports {', '.join(supported)}. Set training.liger: false"
        )
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    # Liger patches modules in place and renames them (their _get_name, as printed): LigerRMSNorm, LigerSwiGLUMLP.
    before = {name: module._get_name() for name, module in model.named_modules()}
    _apply_liger_kernel_to_instance(model=model)
    replaced = [name for name, module in model.named_modules() if before.get(name) != module._get_name()]
    log.info("liger kernels: %s model, %d modules replaced, fused linear cross-entropy", model_type, len(replaced))
    return replaced


def load_model(config: TrainerConfig, model_dir: Path, ranks: Ranks | None = None) -> Any:
    """Load the base causal LM from a local Hugging Face model directory, quantized for qlora."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ranks = ranks or Ranks.from_env()
    if config.training.liger and device_type() == "cpu":
        # Liger's kernels are Triton GPU kernels: fail before loading anything, not inside the first step.
        liger_model_types()
        raise ConfigError("training.liger: Liger kernels need a GPU, and this process has none; set liger: false")
    kwargs: dict[str, Any] = {
        "dtype": load_dtype(config),
        "trust_remote_code": config.model.trust_remote_code,
        "attn_implementation": attention_implementation(config),
    }
    if config.method.info.quantized_base:
        quant = config.method.quantization_or_default()
        if quant.bits == 4:
            extra: dict[str, Any] = {}
            if config.sharded():
                # ZeRO-3 and FSDP shard parameters by dtype; packed 4-bit storage must look like the compute dtype.
                extra["bnb_4bit_quant_storage"] = compute_dtype(config)
            kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                load_in_4bit=True,
                bnb_4bit_quant_type=quant.type,
                bnb_4bit_use_double_quant=quant.double_quant,
                bnb_4bit_compute_dtype=compute_dtype(config),
                **extra,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
        if torch.cuda.is_available():
            # Quantized weights cannot be moved after loading: each process loads straight onto its own GPU.
            kwargs["device_map"] = {"": ranks.local_rank}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the model from {config.model.uri}: {exc}") from exc
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if config.training.liger:
        apply_liger(model, config)
    return model


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (q_proj, up_proj, ...), the output head excluded."""
    head = _output_head(model)
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, nn.Module) else None


def resolve_lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """["all"] -> every linear leaf name but the head; otherwise check each name against the model's linear
    modules (leaf names or dotted suffixes) and fail with the full list when one does not exist."""
    available = linear_module_names(model)
    if [t.lower() for t in targets] == ["all"]:
        if not available:
            raise ConfigError("lora target 'all': the model has no linear layers besides the output head")
        return available
    full_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unknown = [t for t in targets if t not in available and not any(n == t or n.endswith("." + t) for n in full_names)]
    if unknown:
        raise ConfigError(
            f"method.lora.target: unknown module name(s) {unknown}; the model's linear modules are {available} "
            "(or use [all])"
        )
    return list(targets)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (model.layers, transformer.h, ...)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count)
    ]
    if not candidates:
        raise ConfigError("method freeze: cannot find the model's list of decoder layers")
    return min(candidates, key=lambda item: item[0].count("."))


def apply_freeze(model: nn.Module, method: MethodSpec) -> ModelSummary:
    spec = method.freeze
    trainable_layers = spec.trainable_layers if spec else 2
    extra = list(spec.extra_modules or []) if spec else []
    name, layers = decoder_layers(model)
    if trainable_layers > len(layers):
        raise ConfigError(
            f"method.freeze.trainableLayers: {trainable_layers} is more than the model's {len(layers)} layers"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    chosen = list(range(len(layers) - trainable_layers, len(layers)))
    for index in chosen:
        for param in layers[index].parameters():
            param.requires_grad_(True)
    modules = dict(model.named_modules())
    unknown = []
    for wanted in extra:
        matches = [m for n, m in modules.items() if n == wanted or n.endswith("." + wanted)]
        if not matches:
            unknown.append(wanted)
        for module in matches:
            for param in module.parameters():
                param.requires_grad_(True)
    if unknown:
        layer_prefix = name + "."
        choices = sorted({n.rsplit(".", 1)[-1] for n in modules if n and not n.startswith(layer_prefix) and n != name})
        raise ConfigError(f"method.freeze.extraModules: unknown module(s) {unknown}; choose from {choices}")
    return ModelSummary("freeze", _count(model, True), _count(model, False), tuple(extra), tuple(chosen))


def apply_lora(model: Any, config: TrainerConfig) -> tuple[Any, ModelSummary]:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    method = config.method
    lora = method.lora_or_default()
    targets = resolve_lora_targets(model, lora.target)
    if method.info.quantized_base:
        # Casts norms to fp32, freezes the quantized base and makes inputs require grads for checkpointing.
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model,
            use_gradient_checkpointing=config.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; a float alpha works
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=lora.modules_to_save,
        use_dora=method.info.dora,
        bias="none",
    )
    model = get_peft_model(model, peft_config)
    summary = ModelSummary(method.type, _count(model, True), _count(model, False), tuple(targets))
    return model, summary


def apply_method(model: Any, config: TrainerConfig) -> tuple[Any, ModelSummary]:
    """Mark what trains for `config.method`; adapters wrap the model in a peft PeftModel."""
    info = config.method.info
    if info.adapter:
        return apply_lora(model, config)
    if "freeze" in info.settings:
        return model, apply_freeze(model, config.method)
    for param in model.parameters():
        param.requires_grad_(True)
    return model, ModelSummary("full", _count(model, True), _count(model, False))


def _count(model: nn.Module, trainable: bool) -> int:
    total = 0
    for param in model.parameters():
        if trainable and not param.requires_grad:
            continue
        # bitsandbytes packs two 4-bit values per byte; count logical parameters.
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
    return total
