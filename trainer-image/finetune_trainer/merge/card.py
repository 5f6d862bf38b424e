"""The merged model's README.md: where it came from, how the adapter was trained and how to load it.

A pure function of what the merge knows (adapter config, the run's TrainerConfig and trainer_state.json when
they are at hand, the output layout); it never includes storage settings or secret names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_trainer.config import METHOD_REGISTRY, TrainerConfig

# Samples shown in the card (samples.jsonl beside the adapter has them all).
CARD_SAMPLES = 3


@dataclass(frozen=True)
class CardFacts:
    """Everything the model card shows."""

    base: str
    adapter: str
    method: str  # lora | dora | qlora
    dtype: str
    shards: int
    weight_bytes: int
    parameters: int
    adapter_config: Mapping[str, Any]
    merged_modules: int
    replaced_tensors: int
    architecture: str | None = None
    config: TrainerConfig | None = None
    trainer_state: Mapping[str, Any] | None = None
    run_manifest: Mapping[str, Any] | None = None
    samples: Sequence[Mapping[str, Any]] = ()  # the run's samples.jsonl (output.samples)
    extra: Mapping[str, Any] = field(default_factory=dict)


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {key} | {_cell(value)} |" for key, value in rows if value is not None)]


def perplexity(loss: float) -> float:
    """exp(loss), infinite where that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _last_logged(history: list[Mapping[str, Any]], key: str) -> Any:
    for record in reversed(history):
        if key in record:
            return record[key]
    return None


def _adapter_rows(cfg: Mapping[str, Any], merged_modules: int, replaced: int) -> list[tuple[str, Any]]:
    targets = cfg.get("target_modules")
    return [
        ("rank (r)", cfg.get("r")),
        ("alpha", cfg.get("lora_alpha")),
        ("rsLoRA", cfg.get("use_rslora") or None),
        ("DoRA", bool(cfg.get("use_dora"))),
        ("dropout", cfg.get("lora_dropout")),
        ("target modules", sorted(targets) if isinstance(targets, list) else targets),
        ("modules saved whole", cfg.get("modules_to_save")),
        (
            "rank / alpha patterns",
            {"rank": cfg.get("rank_pattern"), "alpha": cfg.get("alpha_pattern")}
            if cfg.get("rank_pattern") or cfg.get("alpha_pattern")
            else None,
        ),
        ("merged modules", merged_modules),
        ("replaced tensors", replaced or None),
    ]


def _method_wire(cfg: TrainerConfig) -> dict[str, Any]:
    # Defaults spelled out: a card reader should not need to know which values the run left unset.
    method = cfg.method
    out: dict[str, Any] = {"type": method.type}
    if "lora" in method.info.settings:
        out["lora"] = method.lora_or_default().to_wire()
    if "quantization" in method.info.settings:
        out["quantization"] = method.quantization_or_default().to_wire()
    return out


def _training_section(facts: CardFacts) -> list[str]:
    lines: list[str] = []
    if facts.config is not None:
        cfg = facts.config
        wire = cfg.to_wire()
        run = {
            "job": cfg.job_name,
            "method": _method_wire(cfg),
            "template": cfg.template,
            "datasets": [d.get("uri") for d in wire.get("datasets", [])],
            "evalDatasets": [d.get("uri") for d in wire.get("evalDatasets", [])] or None,
            "valSize": cfg.val_size,
            "training": wire.get("training"),
            "deepspeed": wire.get("deepspeed"),
        }
        lines += [
            "The run's configuration (FineTuneJob spec fields):",
            "",
            "```json",
            json.dumps({k: v for k, v in run.items() if v is not None}, indent=2),
            "```",
            "",
        ]
    state = facts.trainer_state or {}
    history = [r for r in state.get("log_history", []) if isinstance(r, Mapping)]
    manifest = facts.run_manifest or {}
    eval_loss = _last_logged(history, "eval_loss")
    ppl = perplexity(float(eval_loss)) if isinstance(eval_loss, int | float) else None
    rows = [
        ("job", manifest.get("job") if facts.config is None else None),
        ("optimizer steps", state.get("global_step") or manifest.get("step")),
        ("epochs", state.get("epoch")),
        ("train batch size", state.get("train_batch_size")),
        ("last train loss", _last_logged(history, "loss")),
        ("final eval loss", eval_loss),
        ("eval perplexity", None if ppl is None else round(ppl, 4)),
        ("finished", manifest.get("time")),
    ]
    if any(value is not None for _, value in rows):
        lines += ["Training record (trainer_state.json and the run's manifest):", "", *_table(rows), ""]
    return lines or ["No training record was found next to the adapter.", ""]


def _quoted(text: str) -> list[str]:
    return [f"> {line}" if line else ">" for line in text.splitlines() or [""]]


def _samples_section(samples: Sequence[Mapping[str, Any]]) -> list[str]:
    shown = samples[:CARD_SAMPLES]
    lines = [
        "## Samples",
        "",
        f"Greedy generations of the trained model after training ({len(shown)} of {len(samples)}; all are in the "
        "run's samples.jsonl).",
        "",
    ]
    for number, row in enumerate(shown, 1):
        lines += [f"**{number}. Prompt** ({row.get('source', 'prompt')})", "", *_quoted(str(row.get("prompt", ""))), ""]
        if row.get("reference") is not None:
            lines += ["Reference:", "", *_quoted(str(row["reference"])), ""]
        lines += ["Generation:", "", *_quoted(str(row.get("generation", ""))), ""]
    return lines


def render_model_card(facts: CardFacts) -> str:
    """README.md text with YAML front matter."""
    tags = ["finetune-operator", "merged", facts.method]
    front = ["---", "library_name: transformers", "tags:", *(f"- {t}" for t in tags)]
    if facts.base.startswith("hf://"):
        # The Hub links a model to its base only through a Hub id.
        front.append(f"base_model: {facts.base.removeprefix('hf://').split('@')[0].rstrip('/')}")
    front.append("---")
    known = METHOD_REGISTRY.get(facts.method)
    label = known.display if known else facts.method
    size = f"{facts.weight_bytes / 1e9:.2f} GB" if facts.weight_bytes >= 1e8 else f"{facts.weight_bytes / 1e6:.2f} MB"
    lines = [
        *front,
        "",
        "# Merged model",
        "",
        f"`{facts.base}` with the {label} adapter `{facts.adapter}` merged into its weights by "
        "finetune-operator. The merge was done in float32 on the full-precision base"
        + (" (the adapter was trained on a 4-bit quantized copy of it)" if known and known.quantized_base else "")
        + f" and saved as {facts.dtype}.",
        "",
        "## Merge",
        "",
        *_table(
            [
                ("base model", facts.base),
                ("adapter", facts.adapter),
                ("architecture", facts.architecture),
                ("method", facts.method),
                ("dtype", facts.dtype),
                ("parameters", f"{facts.parameters:,}"),
                ("weights", f"{size} in {facts.shards} safetensors shard(s)"),
            ]
        ),
        "",
        "## Adapter",
        "",
        *_table(_adapter_rows(facts.adapter_config, facts.merged_modules, facts.replaced_tensors)),
        "",
        "## Training",
        "",
        *_training_section(facts),
    ]
    if facts.samples:
        lines += _samples_section(facts.samples)
    if facts.extra:
        lines += ["## Notes", "", *_table([(str(k), v) for k, v in facts.extra.items()]), ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("<this directory>", dtype="auto")',
        'tokenizer = AutoTokenizer.from_pretrained("<this directory>")',
        "```",
        "",
    ]
    return "\n".join(lines)
