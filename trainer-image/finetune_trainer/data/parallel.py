"""Converting, rendering and tokenizing records in parts, in this process and, for large data, worker processes.

The work is split into parts (a piece of one file, formats.Reader): each part is parsed (a JSON file read in
pieces), converted to conversations, rendered and encoded where it is taken up, and only its arrays come back. The
caller puts the conversations in their seeded order afterwards, so the result does not depend on the number of
processes. The workers are forked once the files are read (`forking`): they inherit the files' text or records,
the template and the encoder, so nothing is shipped to them but part numbers. Where fork does not exist everything
runs in this process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune_trainer.data.encode import Encoder, Masking
from finetune_trainer.data.forking import shared, usable
from finetune_trainer.data.formats import Converted, Reader, counted
from finetune_trainer.data.templates import ChatTemplate, Rendered, RenderError

log = logging.getLogger("finetune_trainer.data")

# Below this many records, or with fewer CPUs, one process does it all: workers would not pay for themselves (on
# the 2-CPU development machine, shared with other work, two processes measured slower than one: docs/benchmarks.md).
PARALLEL_MIN = 10_000
MIN_CPUS = 4
MAX_WORKERS = 16


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


def default_workers(records: int) -> int:
    """Processes (this one included) to prepare this many records with: one for small data or few CPUs, else one
    per CPU.
    """
    cpus = available_cpus()
    if records < PARALLEL_MIN or cpus < MIN_CPUS:
        return 1
    return min(MAX_WORKERS, cpus)


@dataclass
class Part:
    """What one piece of a file became.

    `conversations` counts the records converted (the others are in `read_drops` as (reason, locator), in order);
    per conversation, `lengths` (0 where it was dropped), `cut` (truncated at cutoff_len) and `labeled` (its tokens
    with a loss); the kept samples' ids and labels concatenated; (conversation index, reason, locator) for each
    conversation dropped; and the columns of the piece's records where its reader wants them back. A locator names
    a record for its reader's `where`.
    """

    conversations: int
    read_drops: list[tuple[str, int]]
    input_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    cut: np.ndarray
    labeled: np.ndarray
    dropped: list[tuple[int, str, int]] = field(default_factory=list)
    columns: frozenset[str] | None = None

    @property
    def records(self) -> int:
        return self.conversations + len(self.read_drops)


class PartEncoder:
    """Converts, renders and encodes the pieces of files."""

    def __init__(self, template: ChatTemplate, tokenizer: Any, masking: Masking) -> None:
        self.template = template
        self.encoder = Encoder(tokenizer, masking, template)

    def __call__(self, reader: Reader, piece: int) -> Part:
        return self.encode(reader.convert(piece))

    def encode(self, converted: Converted) -> Part:
        conversations = converted.conversations
        count = len(conversations)
        dropped: list[tuple[int, str, int]] = []
        rendered: list[Rendered] = []
        positions: list[int] = []
        render = self.template.render
        for index, conversation in enumerate(conversations):
            try:
                rendered.append(render(conversation))
                positions.append(index)
            except RenderError as exc:
                dropped.append((index, str(exc), conversation.origin))
        encoded = self.encoder(rendered)
        for index, reason in encoded.dropped:
            dropped.append((positions[index], reason, conversations[positions[index]].origin))
        dropped.sort()
        lengths = np.zeros(count, dtype=np.int64)
        cut = np.zeros(count, dtype=bool)
        kept = np.ones(len(positions), dtype=bool)
        kept[[index for index, _ in encoded.dropped]] = False
        where = np.asarray(positions, dtype=np.int64)[kept]
        lengths[where] = encoded.lengths
        cut[where] = encoded.cut
        labeled = np.zeros(count, dtype=np.int64)
        labeled[where] = encoded.labeled
        return Part(
            count,
            converted.drops,
            encoded.input_ids,
            encoded.labels,
            lengths,
            cut,
            labeled,
            dropped,
            converted.columns,
        )


def encode_parts(
    encoder: PartEncoder,
    readers: Sequence[Reader],
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[list[Part]]:
    """For each reader, its pieces converted and encoded, in order; `workers` processes, this one included.

    The processes share the pieces out as `forking.shared` describes; `progress` is told the records done.
    """
    tasks = [(r, piece) for r, reader in enumerate(readers) for piece in range(reader.pieces)]
    processes = usable(workers, len(tasks))
    if processes > 1:
        log.info("preparing %s records in %d processes", counted(readers), processes)

    def encode(index: int) -> Part:
        r, piece = tasks[index]
        return encoder(readers[r], piece)

    results = shared(len(tasks), encode, processes, size=lambda index, part: part.records, progress=progress)
    grouped: list[list[Part]] = [[] for _ in readers]
    for (r, _), made in zip(tasks, results, strict=True):
        grouped[r].append(made)
    return grouped
