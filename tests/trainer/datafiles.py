"""Writing small dataset files for trainer tests, and the TrainerConfig factory type the data fixtures provide."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_trainer.config import TrainerConfig

MakeConfig = Callable[..., TrainerConfig]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_json(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    return path


def config_for(*datasets: Path | dict[str, Any], cache: Path, **fields: Any) -> TrainerConfig:
    """A TrainerConfig over dataset paths (file:// URIs) or dataset dicts; training defaults: cutoff 256, no packing."""
    training = fields.pop("training", {})
    specs = [{"uri": d.as_uri()} if isinstance(d, Path) else d for d in datasets]
    return TrainerConfig.model_validate(
        {
            "model": {"uri": "file:///models/tiny"},
            "datasets": specs,
            "output": {"uri": "file:///out"},
            "cache_dir": str(cache),
            "training": {"cutoff_len": 256, "packing": False, **training},
            **fields,
        }
    )
