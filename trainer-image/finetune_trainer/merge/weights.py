"""LoRA and DoRA merging as pure functions on tensors: adapter tensors + a base weight in, the merged weight out.

No file or network I/O here (the streaming merge in `finetune_trainer.merge.local` feeds these functions one
tensor at a time). The arithmetic follows peft 0.21's `merge` for `lora.Linear` and `lora.Embedding`:

    LoRA       W' = W + s * (B @ A)                       s = alpha / r  (alpha / sqrt(r) with rsLoRA)
    DoRA       V  = W + s * (B @ A)
               W' = (m / ||V||) * V                       ||V||: L2 norm of each output row of V (one value per
                                                          output feature, peft's `get_weight_norm`, dim=1 of the
                                                          (out, in) matrix), m: the trained magnitude vector
    lora_bias  b' = b + s * lora_B.bias

The norm is taken over the unmerged base weight plus the delta, exactly as peft's forward pass computes it, so the
merged layer reproduces the adapter's output. Everything is computed in float32 whatever the base dtype, then cast
by the caller; r is taken from the shape of lora_A, and alpha from `alpha_pattern` when a pattern matches the
module, both as peft does when it builds the layers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from finetune_trainer.errors import MergeError

PEFT_PREFIX = "base_model.model."

# adapter_config.json features that change what the saved tensors mean in ways this merge does not reproduce.
# Initialisation-only options (loftq, eva, corda, pissa/olora init) need nothing: the saved A and B are final.
UNSUPPORTED_OPTIONS = (
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
)

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector"
    r"|lora_embedding_A|lora_embedding_B)$"
)


@dataclass(frozen=True)
class LoraDelta:
    """The adapter of one base module: low-rank factors, scaling, and DoRA's magnitude where present."""

    module: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    kind: Literal["linear", "embedding"]
    lora_a: torch.Tensor  # linear (r, in_features); embedding (r, num_embeddings)
    lora_b: torch.Tensor  # linear (out_features, r); embedding (embedding_dim, r)
    scaling: float
    magnitude: torch.Tensor | None = None  # DoRA: one value per output feature
    bias: torch.Tensor | None = None  # lora_B's bias (lora_bias=True)
    fan_in_fan_out: bool = False  # the base stores the weight as (in, out) (GPT-2's Conv1D)

    @property
    def weight_key(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_key(self) -> str:
        return f"{self.module}.bias"

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    def expected_weight_shape(self) -> tuple[int, int]:
        """The base weight shape these factors were trained against."""
        if self.kind == "embedding":
            return int(self.lora_a.shape[1]), int(self.lora_b.shape[0])
        out_features, in_features = int(self.lora_b.shape[0]), int(self.lora_a.shape[1])
        return (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)

    def add_delta_(self, weight: torch.Tensor) -> torch.Tensor:
        """weight += s * B @ A (transposed to the base layout where needed), in place, in one fused pass."""
        a, b = self.lora_a.float(), self.lora_b.float()
        if self.kind == "embedding" or self.fan_in_fan_out:
            return weight.addmm_(a.T, b.T, alpha=self.scaling)
        return weight.addmm_(b, a, alpha=self.scaling)


@dataclass(frozen=True)
class AdapterWeights:
    """A parsed adapter: per-module deltas keyed by the base tensor they change, plus whole-tensor replacements
    (modules_to_save, and embedding weights peft saves when the vocabulary may have been resized)."""

    deltas: dict[str, LoraDelta]
    replacements: dict[str, torch.Tensor]
    method: Literal["lora", "dora"]
    config: dict[str, Any]
    bias_deltas: dict[str, LoraDelta] = field(default_factory=dict)  # by the base bias key (lora_bias=True)

    def touched_keys(self) -> set[str]:
        return set(self.deltas) | set(self.replacements) | set(self.bias_deltas)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # peft matches each pattern key as a regular expression against the end of the module path.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_adapter_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse adapter configs this merge cannot reproduce, naming the option."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise MergeError(f"{where}: adapter type {peft_type} is not supported; only LoRA and DoRA adapters merge")
    used = [name for name in UNSUPPORTED_OPTIONS if config.get(name) not in (None, False, {}, [], "")]
    if used:
        raise MergeError(f"{where}: adapter option(s) {used} are not supported by the merge")


def parse_adapter(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str = "adapter"
) -> AdapterWeights:
    """Group peft's saved tensors (`base_model.model.<module>.lora_A.weight`, ...) into per-module deltas."""
    check_adapter_config(config, where)
    default_alpha = float(config.get("lora_alpha", 8))
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    parts: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for raw_key, tensor in tensors.items():
        key = raw_key.removeprefix(PEFT_PREFIX)
        match = _LORA_KEY.match(key)
        if match:
            parts.setdefault(match.group("module"), {})[match.group("part")] = tensor
        elif "lora_" in key or "modules_to_save" in key or "token_adapter" in key:
            raise MergeError(f"{where}: unsupported adapter tensor {raw_key!r}")
        else:
            # A whole tensor saved with the adapter replaces the base's: modules_to_save come as `<module>.weight`,
            # embeddings saved alongside an embedding LoRA as `<module>.base_layer.weight`.
            replacements[key.replace(".base_layer.", ".")] = tensor

    deltas: dict[str, LoraDelta] = {}
    for module, found in sorted(parts.items()):
        if "lora_A.weight" in found and "lora_B.weight" in found:
            kind: Literal["linear", "embedding"] = "linear"
            lora_a, lora_b = found["lora_A.weight"], found["lora_B.weight"]
        elif "lora_embedding_A" in found and "lora_embedding_B" in found:
            kind = "embedding"
            lora_a, lora_b = found["lora_embedding_A"], found["lora_embedding_B"]
        else:
            raise MergeError(f"{where}: module {module} has an incomplete adapter (found {sorted(found)})")
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise MergeError(
                f"{where}: module {module} has factors of shapes {list(lora_a.shape)} and {list(lora_b.shape)}, "
                "which do not form a low-rank product (only linear and embedding layers merge)"
            )
        magnitude = found.get("lora_magnitude_vector")
        if magnitude is not None and kind == "embedding":
            raise MergeError(f"{where}: module {module}: DoRA on embedding layers is not supported by the merge")
        rank = int(lora_a.shape[0])
        alpha = float(_pattern_value(alpha_pattern, module, default_alpha))
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        delta = LoraDelta(
            module=module,
            kind=kind,
            lora_a=lora_a,
            lora_b=lora_b,
            scaling=scaling,
            magnitude=magnitude,
            bias=found.get("lora_B.bias"),
            fan_in_fan_out=fan_in_fan_out and kind == "linear",
        )
        deltas[delta.weight_key] = delta
    if not deltas and not replacements:
        raise MergeError(f"{where}: the adapter holds no LoRA weights")
    method: Literal["lora", "dora"] = "dora" if any(d.magnitude is not None for d in deltas.values()) else "lora"
    biases = {d.bias_key: d for d in deltas.values() if d.bias is not None}
    return AdapterWeights(deltas, replacements, method, dict(config), biases)


def fit_problems(base_shapes: Mapping[str, tuple[int, ...]], adapter: AdapterWeights) -> list[str]:
    """Every way the adapter does not fit a base with these tensor shapes; [] when it fits."""
    problems = []
    for key, delta in adapter.deltas.items():
        shape = base_shapes.get(key)
        a_shape, b_shape = list(delta.lora_a.shape), list(delta.lora_b.shape)
        if shape is None:
            problems.append(f"module {delta.module}: the base model has no tensor {key}")
            continue
        expected = delta.expected_weight_shape()
        if tuple(shape) != expected:
            problems.append(
                f"module {delta.module}: the adapter (lora_A {a_shape}, lora_B {b_shape}) expects a weight of shape "
                f"{list(expected)}, but the base's {key} is {list(shape)}"
            )
            continue
        out_features = expected[1] if delta.fan_in_fan_out or delta.kind == "embedding" else expected[0]
        if delta.magnitude is not None and tuple(delta.magnitude.shape) != (out_features,):
            problems.append(
                f"module {delta.module}: DoRA magnitude {list(delta.magnitude.shape)} does not match the "
                f"{out_features} output features of the base's {key} {list(shape)}"
            )
        if delta.bias is not None:
            bias_shape = base_shapes.get(delta.bias_key)
            if bias_shape is None:
                problems.append(f"module {delta.module}: the adapter trains a bias (lora_bias) but the base has none")
            elif tuple(bias_shape) != tuple(delta.bias.shape):
                problems.append(
                    f"module {delta.module}: lora_B bias {list(delta.bias.shape)} does not match the base's "
                    f"{delta.bias_key} {list(bias_shape)}"
                )
    for key, tensor in adapter.replacements.items():
        shape = base_shapes.get(key)
        if shape is None:
            problems.append(f"saved module tensor {key}: the base model has no such tensor")
        elif tuple(shape) != tuple(tensor.shape):
            problems.append(
                f"saved module tensor {key}: the adapter's is {list(tensor.shape)}, the base's is {list(shape)} "
                "(a resized vocabulary is not supported by the merge)"
            )
    return problems


def merge_linear(weight: torch.Tensor, delta: LoraDelta) -> torch.Tensor:
    """The merged weight of one module, float32 (LoRA: W + s·BA; DoRA: m / ||W + s·BA||_row * (W + s·BA))."""
    merged = delta.add_delta_(weight.to(torch.float32, copy=True))  # a copy: the input is never modified
    if delta.magnitude is None:
        return merged
    # Norms are per output feature; with fan_in_fan_out the stored matrix is (in, out), so rows become columns.
    rows = merged.T if delta.fan_in_fan_out else merged
    norm = torch.linalg.vector_norm(rows, ord=2, dim=1)
    factor = delta.magnitude.float() / norm
    return merged.mul_(factor.view(1, -1) if delta.fan_in_fan_out else factor.view(-1, 1))


def merge_tensor(key: str, tensor: torch.Tensor, adapter: AdapterWeights) -> tuple[torch.Tensor, bool]:
    """The output tensor for base tensor `key`: (merged float32 tensor, True) when the adapter changes it, else
    (the input, False)."""
    replacement = adapter.replacements.get(key)
    if replacement is not None:
        tensor = replacement.float()
    delta = adapter.deltas.get(key)
    if delta is not None:
        return merge_linear(tensor, delta), True
    owner = adapter.bias_deltas.get(key)
    if owner is not None and owner.bias is not None:
        return tensor.float() + owner.bias.float() * owner.scaling, True
    return tensor, replacement is not None


def merge_state_dict(
    state_dict: Mapping[str, torch.Tensor], adapter: AdapterWeights, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Merge `adapter` into a whole state dict (tensors not touched keep their dtype unless `dtype` is given);
    raises MergeError, listing every problem, when the adapter does not fit."""
    problems = fit_problems({k: tuple(v.shape) for k, v in state_dict.items()}, adapter)
    if problems:
        raise MergeError("the adapter does not fit the base model:\n  " + "\n  ".join(problems))
    out = {}
    for key, tensor in state_dict.items():
        merged, changed = merge_tensor(key, tensor, adapter)
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        out[key] = merged.to(target) if changed or merged.dtype != target else merged
    return out
