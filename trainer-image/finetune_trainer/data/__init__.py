"""Training data for supervised fine-tuning: dataset files → tokenized, loss-masked, packed rows, cached per node.

Entry point for the training recipe::

    from finetune_trainer.data import build_datasets

    bundle = build_datasets(config, tokenizer, resolve, local_rank=local_rank)
    trainer = Trainer(model, train_dataset=bundle.train, eval_dataset=bundle.eval,
                      data_collator=bundle.collator(model.config._attn_implementation), ...)

`build_datasets(config: TrainerConfig, tokenizer, resolve: Callable[[str], Path] = local_resolve, *,
local_rank: int = 0, is_local_main: bool | None = None, wait_timeout_s: float = 14400,
fingerprint: Callable[[Path], str] = file_fingerprint, workers: int | None = None) -> DataBundle`

* `resolve(uri)` returns the local file or directory for a dataset URI (`local_resolve` handles file://; the S3
  downloader plugs in here). A directory means every data file under it.
* The local main rank tokenizes into `<config.cache_dir>/tokenized/<key>/` (key: file contents, tokenizer, template
  and every setting that changes the result) or reuses a complete entry; the other ranks wait for it on the file
  system, never in a collective. Large datasets are converted, rendered and tokenized by `workers` processes,
  this one included (default: from 10k records on with 4 or more CPUs, one per CPU the container may use, up to
  16; see `parallel`).
* `DataBundle`: `train`, `eval` (memory-mapped `datasets.Dataset`, columns input_ids/labels[/position_ids]),
  `stats`/`eval_stats` (`DataStats`: records, samples, rows, tokens, label_tokens, truncated, dropped,
  drop_reasons), `packed`, `pad_token_id`, `cache_path`, `cache_hit`, and `collator(attn_implementation)`.
* Errors: `finetune_trainer.errors.ConfigError` for a template the tokenizer contradicts, `DataError` for data that
  cannot be read or leaves no samples. Both carry the `reason` for FineTuneJob status.

Packed batches carry position_ids that restart per sample, use_cache=False and no attention_mask: transformers 5.x
then keeps samples apart itself (sdpa/eager/flex masks, flash-attention varlen on the padding-free layout).
Loss masking, templates and packing are described in `templates`, `encode` and `collate`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune_trainer.data.build import DataBundle, DataStats, build_datasets, local_resolve
    from finetune_trainer.data.cache import file_fingerprint
    from finetune_trainer.data.conversation import Conversation, Turn
    from finetune_trainer.data.templates import NAMED_TEMPLATES, get_template

# Imported on first use: finetune_trainer.config reads the template names from data.lf_templates, which must not
# pull in numpy and the rest of the data pipeline (the operator imports the config without them).
_EXPORTS = {
    "DataBundle": "build",
    "DataStats": "build",
    "build_datasets": "build",
    "local_resolve": "build",
    "file_fingerprint": "cache",
    "Conversation": "conversation",
    "Turn": "conversation",
    "NAMED_TEMPLATES": "templates",
    "get_template": "templates",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = [
    "NAMED_TEMPLATES",
    "Conversation",
    "DataBundle",
    "DataStats",
    "Turn",
    "build_datasets",
    "file_fingerprint",
    "get_template",
    "local_resolve",
]
