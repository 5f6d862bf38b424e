"""A look at the result: the trained model answers prompts after training (output.samples → samples.jsonl).

Prompts come from two places: `output.samples.prompts` (one user turn each, rendered with the run's chat template)
and the first `fromEval` held-out eval samples, whose prompt is everything before their last answer and whose
reference is that answer. Generation is greedy (reproducible), at most `maxNewTokens` new tokens, stopping at the
template's EOS. Global rank 0 runs it once training is over, on the trained model (base + adapter: what the merged
model computes, before the merge's rounding to its dtype).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from finetune_trainer.config import SamplesSpec, TrainerConfig
from finetune_trainer.data.conversation import Conversation, Turn
from finetune_trainer.data.packing import IGNORE
from finetune_trainer.data.templates import ChatTemplate, get_template

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"


def prompt_ids(template: ChatTemplate, tokenizer: Any, prompt: str) -> list[int]:
    """The token ids the model sees before its answer to `prompt` (a single user turn), as in training: each
    rendered piece tokenized on its own."""
    rendered = template.render(Conversation((Turn("user", prompt), Turn("assistant", ""))))
    ids: list[int] = []
    for piece in rendered.messages[0]:
        ids.extend([piece] if isinstance(piece, int) else tokenizer.encode(piece, add_special_tokens=False))
    return ids


def _samples_of_row(row: dict[str, Any]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The samples of one tokenized row: packed rows hold several, each starting where position_ids restart."""
    ids = np.asarray(row["input_ids"])
    labels = np.asarray(row["labels"])
    positions = row.get("position_ids")
    if positions is None:
        yield ids, labels
        return
    starts = [int(i) for i in np.flatnonzero(np.asarray(positions) == 0)] + [len(ids)]
    for begin, end in itertools.pairwise(starts):
        yield ids[begin:end], labels[begin:end]


def eval_prompts(dataset: Any, count: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) of the first `count` eval samples: the reference is the last labelled span."""
    out: list[tuple[list[int], list[int]]] = []
    for index in range(len(dataset) if dataset is not None else 0):
        for ids, labels in _samples_of_row(dataset[index]):
            labelled = np.flatnonzero(labels != IGNORE)
            if len(labelled) == 0:
                continue
            # The last answer: the final run of consecutive labelled positions.
            breaks = np.flatnonzero(np.diff(labelled) != 1)
            start = int(labelled[breaks[-1] + 1]) if len(breaks) else int(labelled[0])
            out.append(([int(i) for i in ids[:start]], [int(i) for i in labels[start : int(labelled[-1]) + 1]]))
            if len(out) == count:
                return out
    return out


def generate(
    model: Any, ids: list[int], max_new_tokens: int, eos_ids: list[int], pad_id: int, synced: bool = False
) -> list[int]:
    """Greedy continuation of `ids` (the new tokens only, the stopping EOS left out). `synced`: every rank runs
    this together (ZeRO-3 gathers the partitioned weights collectively)."""
    import torch

    device = next(model.parameters()).device
    inputs = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_ids or None,
            pad_token_id=pad_id,
            synced_gpus=synced,
        )
    new = [int(t) for t in out[0, len(ids) :]]
    while new and new[-1] in eos_ids:
        new.pop()
    return new


def write_samples(
    model: Any, tokenizer: Any, config: TrainerConfig, eval_dataset: Any, path: Path | None, *, synced: bool = False
) -> list[dict[str, Any]]:
    """Generate for output.samples and write them to `path` (when given) as JSON lines (prompt, reference where
    known, generation); returns the rows."""
    spec: SamplesSpec = config.output.samples or SamplesSpec()
    template = get_template(config.template, tokenizer)
    eos = [i for i in {template.eos_token_id, tokenizer.eos_token_id} if i is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    jobs: list[dict[str, Any]] = [
        {"source": "prompt", "prompt": p, "ids": prompt_ids(template, tokenizer, p)} for p in spec.prompts or []
    ]
    if spec.from_eval and eval_dataset is None:
        log.warning("output.samples.fromEval: this run has no eval data (evalDatasets or valSize); skipped")
    for ids, reference in eval_prompts(eval_dataset, spec.from_eval) if spec.from_eval else []:
        jobs.append(
            {
                "source": "eval",
                "prompt": tokenizer.decode(ids, skip_special_tokens=False),
                "reference": tokenizer.decode([t for t in reference if t not in eos], skip_special_tokens=True),
                "ids": ids,
            }
        )
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = True  # training turned it off; generation wants it
    rows = []
    try:
        for job in jobs:
            new = generate(model, job.pop("ids"), spec.max_new_tokens, eos, pad, synced)
            rows.append({**job, "generation": tokenizer.decode(new, skip_special_tokens=True)})
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    if path is not None:
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        log.info("samples: %d generations written to %s", len(rows), path)
    return rows


def read_samples(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
