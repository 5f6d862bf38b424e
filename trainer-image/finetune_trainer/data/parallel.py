"""Rendering and tokenizing conversations in chunks, in this process or in a pool of worker processes.

Only the node's main rank preprocesses while the other ranks wait, so large datasets are spread over the CPUs the
container may use. Chunks come back in order, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer.data.conversation import Conversation
from finetune_trainer.data.encode import Encoder, Masking, Sample
from finetune_trainer.data.templates import ChatTemplate, Rendered, RenderError, get_template

log = logging.getLogger("finetune_trainer.data")

CHUNK = 1000
# Below this many conversations, starting worker processes (a few seconds each) costs more than it saves.
PARALLEL_MIN = 10_000
MAX_WORKERS = 16
MIN_CPUS = 4


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a Pod's CPU limit)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return count


def default_workers(conversations: int) -> int:
    """Worker processes for this many conversations: none for small data or few CPUs.

    One process already keeps every CPU busy while the Rust tokenizer runs (it has its own thread pool), so
    workers only spread the Python part (rendering, masking); on 2 CPUs that gain is smaller than the cost of
    starting them and shipping the results back (measured with bench/bench_preprocess.py).
    """
    cpus = available_cpus()
    if conversations < PARALLEL_MIN or cpus < MIN_CPUS:
        return 1
    return min(MAX_WORKERS, cpus)


@dataclass
class Chunk:
    """The result of one chunk: samples kept, and (reason, origin) for each conversation dropped."""

    samples: list[Sample] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)


class ChunkEncoder:
    def __init__(self, template: ChatTemplate, tokenizer: Any, masking: Masking) -> None:
        self.template = template
        self.encoder = Encoder(tokenizer, masking, template)

    def __call__(self, conversations: Sequence[Conversation]) -> Chunk:
        out = Chunk()
        rendered: list[Rendered] = []
        origins: list[str] = []
        for conversation in conversations:
            try:
                rendered.append(self.template.render(conversation))
                origins.append(conversation.origin)
            except RenderError as exc:
                out.dropped.append((str(exc), conversation.origin))
        for origin, result in zip(origins, self.encoder(rendered), strict=True):
            if isinstance(result, str):
                out.dropped.append((result, origin))
            else:
                out.samples.append(result)
        return out


_worker: ChunkEncoder | None = None


def _start_worker(template: str, tokenizer: Any, masking: Masking) -> None:
    global _worker
    # The processes already share the CPUs; the tokenizer's own thread pool in each would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    chat = get_template(template, tokenizer, mask_history=masking.mask_history, train_on_prompt=masking.train_on_prompt)
    _worker = ChunkEncoder(chat, tokenizer, masking)


def _run_worker(conversations: Sequence[Conversation]) -> Chunk:
    assert _worker is not None
    return _worker(conversations)


def encode_all(
    conversations: Sequence[Conversation],
    template: ChatTemplate,
    tokenizer: Any,
    masking: Masking,
    *,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Chunk]:
    """Chunks of encoded conversations, in input order; `workers` > 1 uses that many spawned processes."""
    chunks = [conversations[i : i + CHUNK] for i in range(0, len(conversations), CHUNK)]
    done = 0
    if workers <= 1 or len(chunks) <= 1:
        encode = ChunkEncoder(template, tokenizer, masking)
        for chunk in chunks:
            yield encode(chunk)
            done += len(chunk)
            if progress:
                progress(done)
        return
    log.info("preprocessing %d conversations in %d worker processes", len(conversations), workers)
    # spawn, not fork: the parent may already run torch and tokenizer thread pools, which do not survive a fork.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(template.name, tokenizer, masking)
    ) as pool:
        for chunk, result in zip(chunks, pool.map(_run_worker, chunks), strict=True):
            yield result
            done += len(chunk)
            if progress:
                progress(done)
