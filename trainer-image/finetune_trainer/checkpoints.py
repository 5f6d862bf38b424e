"""Checkpoints in storage: layout, completeness, background upload, retention and the choice of where to resume.

Layout under the run's output URI:
    checkpoints/step-<N>/<files>               what the Hugging Face Trainer saved locally (checkpoint-<N>/), with
                                               DeepSpeed's per-rank shards (global_step<N>/...) from every node
    checkpoints/step-<N>/.nodes/node-<k>.json  node k's list of files it uploaded (path, size, sha256), the id
                                               of the attempt that wrote them and the run record (identity.py)
    checkpoints/step-<N>/manifest.json         written LAST by global rank 0, once every node's list is in: the
                                               union of the files and the run record; its presence is what makes a
                                               checkpoint complete
Resume takes the newest complete checkpoint whose listed files are all present with their sizes; anything without
a manifest is an interrupted upload and is ignored (and deleted once a newer checkpoint is complete). Retention
keeps the newest `keep` complete checkpoints and deletes an older one only after a newer one is complete, manifest
first, so a half-deleted checkpoint never looks complete.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from finetune_trainer.distenv import Ranks
from finetune_trainer.errors import CheckpointWriteError
from finetune_trainer.storage import Storage, StorageError, join_uri
from finetune_trainer.timefmt import now_rfc3339

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
NODES_DIR = ".nodes"
FORMAT = 1
_STEP = re.compile(r"^step-(\d+)/(.+)$")
LOCAL_PREFIX = "checkpoint-"  # the Trainer's local directory names


def checkpoints_uri(output_uri: str) -> str:
    return join_uri(output_uri, "checkpoints/")


def step_uri(output_uri: str, step: int) -> str:
    return join_uri(output_uri, f"checkpoints/step-{step}/")


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint in storage."""

    step: int
    uri: str
    manifest: dict[str, Any]

    @property
    def loss(self) -> float | None:
        value = self.manifest.get("loss")
        return float(value) if isinstance(value, int | float) else None


@dataclass
class CheckpointListing:
    complete: list[int] = field(default_factory=list)  # ascending
    incomplete: list[int] = field(default_factory=list)
    files: dict[int, dict[str, int]] = field(default_factory=dict)  # step -> {path: size}


def list_checkpoints(storage: Storage, output_uri: str) -> CheckpointListing:
    """Every step found under <output>/checkpoints/, split by whether its manifest exists."""
    listing = CheckpointListing()
    for obj in storage.list(checkpoints_uri(output_uri)):
        match = _STEP.match(obj.key)
        if match:
            listing.files.setdefault(int(match.group(1)), {})[match.group(2)] = obj.size
    for step in sorted(listing.files):
        (listing.complete if MANIFEST in listing.files[step] else listing.incomplete).append(step)
    return listing


def latest_complete(storage: Storage, output_uri: str) -> CheckpointRef | None:
    """The newest checkpoint whose manifest exists and whose every listed file is present with its size."""
    listing = list_checkpoints(storage, output_uri)
    for step in reversed(listing.complete):
        uri = step_uri(output_uri, step)
        raw = storage.read_bytes(join_uri(uri, MANIFEST))
        try:
            manifest = json.loads(raw or b"")
            files = {str(f["path"]): int(f["size"]) for f in manifest["files"]}
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring checkpoint %s: its manifest is unreadable", uri)
            continue
        present = listing.files.get(step, {})
        missing = [p for p, size in files.items() if present.get(p) != size]
        if missing:
            log.warning("ignoring checkpoint %s: %d listed file(s) missing or of another size", uri, len(missing))
            continue
        return CheckpointRef(step, uri, manifest)
    if listing.incomplete:
        log.info("ignoring incomplete checkpoint(s) (no manifest): steps %s", listing.incomplete)
    return None


def remove_unfinished_writes(storage: Storage, output_uri: str) -> int:
    """Remove what writes of an earlier attempt left unfinished under the run's output (Storage.abort_incomplete:
    a killed stream's multipart upload or temporary file), before any rank of this attempt writes there. A store
    that refuses to list them is not an error: their parts stay until the bucket's lifecycle rule removes them."""
    try:
        removed = storage.abort_incomplete(output_uri)
    except StorageError as exc:
        log.warning("%s; an earlier attempt's unfinished uploads stay until a lifecycle rule removes them", exc)
        return 0
    if removed:
        log.info("removed %d unfinished write(s) of an earlier attempt under %s", removed, output_uri)
    return removed


def apply_retention(storage: Storage, output_uri: str, keep: int) -> list[int]:
    """Delete complete checkpoints beyond the newest `keep`, and incomplete ones older than the newest complete one.
    Returns the deleted steps."""
    listing = list_checkpoints(storage, output_uri)
    if not listing.complete:
        return []
    newest = listing.complete[-1]
    doomed = listing.complete[:-keep] if keep > 0 else []
    doomed += [s for s in listing.incomplete if s < newest]
    for step in sorted(doomed):
        uri = step_uri(output_uri, step)
        # Manifest first: if we stop half way, what is left is merely incomplete, never a broken "complete" one.
        storage.delete(join_uri(uri, MANIFEST))
        storage.delete_prefix(uri)
        log.info("deleted checkpoint %s (keeping the newest %d)", uri, keep)
    return sorted(doomed)


class _Writes(Protocol):
    stored: list[dict[str, Any]]  # files already put into storage by the writes (path, size, sha256)

    def wait(self) -> None: ...


@dataclass
class _Job:
    step: int
    local_dir: Path
    loss: float | None
    extra: dict[str, Any]
    writes: _Writes | None = None


class CheckpointUploader:
    """Uploads local checkpoint directories in a background thread while training continues.

    Every node's local rank 0 owns one: it uploads its node's files and a node record; on global rank 0 the
    uploader then waits for all nodes' records, writes the manifest, calls `on_complete(step, uri, loss)` and
    applies retention. Errors are kept and raised by `check()` / `drain()` in the training thread.
    """

    def __init__(
        self,
        storage: Storage,
        output_uri: str,
        ranks: Ranks,
        *,
        keep: int,
        job_name: str = "",
        nodes_wait_seconds: float = 1800.0,
        on_complete: Callable[[int, str, float | None], None] | None = None,
        keep_local: int = 0,
        attempt: str = "",
        run: dict[str, Any] | None = None,
    ) -> None:
        self.storage = storage
        self.output_uri = output_uri
        self.ranks = ranks
        self.keep = keep
        self.job_name = job_name
        self.nodes_wait_seconds = nodes_wait_seconds
        self.on_complete = on_complete
        self.keep_local = keep_local
        self.attempt = attempt  # the same on every rank of this run; records of earlier runs do not count
        self.run = run  # the run record (finetune_trainer.identity) every record and manifest carries
        self.completed: list[int] = []
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._unfinished: deque[float] = deque()  # when each job in the queue or in progress was submitted
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(
        self, local_dir: Path, step: int, *, loss: float | None = None, writes: _Writes | None = None, **extra: Any
    ) -> None:
        """Queue checkpoint `step` for upload: written to `local_dir` by every local rank, except for the files
        this process still writes in the background (`writes`, staging.PendingWrites), which the upload waits for;
        those the writes put into storage themselves (`stored_file`) join this node's record."""
        self.check()
        self._unfinished.append(time.monotonic())
        self._queue.put(_Job(step, local_dir, loss, extra, writes))

    def stored_file(self, step: int, name: str) -> tuple[Storage, str]:
        """Where file `name` of checkpoint `step` goes in storage, for a background write that puts it there itself
        (staging.save_staged) instead of the local checkpoint directory."""
        return self.storage, join_uri(step_uri(self.output_uri, step), name)

    def busy_since(self) -> float | None:
        """When (time.monotonic()) the oldest checkpoint still queued or being uploaded (its files written, hashed,
        sent) was submitted; None when there is none."""
        try:
            return self._unfinished[0]
        except IndexError:
            return None

    def check(self) -> None:
        """Raise the first background upload error, if any."""
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, CheckpointWriteError):  # the local disk, not the upload: its own message
                raise CheckpointWriteError(str(error)) from error
            raise StorageError(f"checkpoint upload failed: {error}") from error

    def drain(self) -> None:
        """Wait until every queued checkpoint is uploaded (and, on rank 0, complete); then raise any error."""
        self._queue.join()
        self.check()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    self._upload(job)
            except BaseException as exc:  # kept for the training thread; this thread must survive
                log.error("checkpoint step %s upload failed: %s", getattr(job, "step", "?"), exc)
                self._error = exc
            finally:
                if job is not None:
                    self._unfinished.popleft()
                self._queue.task_done()

    def _upload(self, job: _Job) -> None:
        started = time.monotonic()
        uri = step_uri(self.output_uri, job.step)
        files = []
        if job.writes is not None:
            job.writes.wait()
            files = list(job.writes.stored)
        files = sorted(files + self.storage.upload_dir(job.local_dir, uri), key=lambda f: str(f["path"]))
        node_record: dict[str, Any] = {"node": self.ranks.node_rank, "attempt": self.attempt, "files": files}
        if self.run is not None:
            node_record["run"] = self.run
        record_uri = join_uri(uri, f"{NODES_DIR}/node-{self.ranks.node_rank}.json")
        self.storage.write_bytes(record_uri, json.dumps(node_record).encode())
        size = sum(f["size"] for f in files)
        log.info(
            "uploaded checkpoint step %d from node %d: %d file(s), %.1f MiB in %.1fs",
            job.step,
            self.ranks.node_rank,
            len(files),
            size / 2**20,
            time.monotonic() - started,
        )
        if self.ranks.is_main:
            self._complete(job, uri)
        self._prune_local(job)

    def _complete(self, job: _Job, uri: str) -> None:
        records = self._wait_for_nodes(uri)
        merged: dict[str, dict[str, Any]] = {}
        for record in records:
            for entry in record["files"]:
                merged[str(entry["path"])] = entry
        manifest = {
            "format": FORMAT,
            "step": job.step,
            "job": self.job_name,
            "time": now_rfc3339(),
            "loss": job.loss,
            "nodes": self.ranks.nnodes,
            "world_size": self.ranks.world_size,
            "files": [merged[k] for k in sorted(merged)],
            **job.extra,
        }
        if self.run is not None:
            manifest["run"] = self.run
        self.storage.write_bytes(join_uri(uri, MANIFEST), json.dumps(manifest, indent=1).encode())
        self.completed.append(job.step)
        log.info("checkpoint %s complete (%d file(s))", uri, len(merged))
        if self.on_complete is not None:
            try:
                self.on_complete(job.step, uri, job.loss)
            except Exception as exc:  # reporting must never fail an upload
                log.warning("checkpoint report failed: %s", exc)
        apply_retention(self.storage, self.output_uri, self.keep)

    def _wait_for_nodes(self, uri: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.nodes_wait_seconds
        prefix = join_uri(uri, NODES_DIR + "/")
        while True:
            records = []
            for obj in self.storage.list(prefix):
                raw = self.storage.read_bytes(join_uri(prefix, obj.key))
                record = json.loads(raw) if raw else None
                if record is not None and record.get("attempt", "") == self.attempt:
                    records.append(record)
            if len(records) >= self.ranks.nnodes:
                return records
            if time.monotonic() > deadline:
                raise StorageError(
                    f"checkpoint {uri}: only {len(records)} of {self.ranks.nnodes} nodes uploaded their files within "
                    f"{self.nodes_wait_seconds:.0f}s; it stays incomplete"
                )
            time.sleep(1.0)

    def _prune_local(self, job: _Job) -> None:
        """Once a checkpoint is uploaded its local copy serves nothing (resume reads storage, and a new container
        removes what an earlier one left) but holds scratch disk, gigabytes for a full fine-tune: it goes,
        with any older one, except the newest `keep_local` uploaded ones. Newer directories may still be being
        written and stay. (The Trainer's own rotation is off: it could delete a directory that is still
        uploading.)"""
        parent = job.local_dir.parent
        suffixes = (p.name[len(LOCAL_PREFIX) :] for p in parent.glob(LOCAL_PREFIX + "*"))
        uploaded = sorted(step for step in map(int, filter(str.isdigit, suffixes)) if step <= job.step)
        kept = set(uploaded[-self.keep_local :]) if self.keep_local > 0 else set()
        for step in uploaded:
            if step not in kept:
                shutil.rmtree(parent / f"{LOCAL_PREFIX}{step}", ignore_errors=True)
