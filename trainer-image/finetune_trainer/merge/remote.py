"""The merge between storage URIs: fetch the adapter and the base, merge, upload, manifest last.

Inputs on file:// or pvc:// are used where they are; s3:// inputs are downloaded into the cache directory (the base
with the node cache's layout, so a cache shared with training is reused; only the files a merge needs). The
adapter URI is usually a run's output prefix, which also holds checkpoints/ and possibly merged/: only the files the
run's manifest lists (or, without one, the top-level files) are fetched.

A local output is written by `merge_to_directory` (temporary directory, then rename). An S3 output is written as
the merge goes: each shard is uploaded as soon as it is finished and deleted locally (scratch space needed: the
base plus one shard), and manifest.json goes up last. A marker object (`.ftj-merge-incomplete`) is written first
and removed after the manifest, so that a restarted merge Job recognises its own interrupted output and replaces
it, while a prefix holding anything else is never touched without `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from finetune_trainer.cache import NodeCache
from finetune_trainer.config import StorageSpec, TrainerConfig
from finetune_trainer.distenv import Ranks
from finetune_trainer.errors import MergeError
from finetune_trainer.merge.local import (
    ADAPTER_CONFIG,
    MANIFEST,
    MergeReport,
    MergeSettings,
    build_manifest,
    check_output_apart,
    existing_report,
    load_adapter,
    merge_into,
    merge_to_directory,
    source_record,
)
from finetune_trainer.merge.shards import WrittenFile
from finetune_trainer.storage import (
    ObjectInfo,
    S3Storage,
    Storage,
    StorageError,
    Uri,
    as_prefix,
    join_uri,
    open_storage,
)
from finetune_trainer.timefmt import now_rfc3339

log = logging.getLogger(__name__)

INCOMPLETE_MARKER = ".ftj-merge-incomplete"
# Base files a merge never reads: other weight formats and the original (non-HF) checkpoints some repos carry.
_SKIP_BASE = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".ot")


@dataclass(frozen=True)
class MergeRequest:
    """One merge, as the CLI and `ftj merge` describe it."""

    base: str
    adapter: str
    output: str
    dtype: str = "bf16"
    max_shard_size: str = "5GB"
    overwrite: bool = False
    config: TrainerConfig | None = None
    model_card_extra: dict[str, Any] | None = None

    def settings(self) -> MergeSettings:
        return MergeSettings(
            dtype=self.dtype,
            max_shard_size=self.max_shard_size,
            overwrite=self.overwrite,
            config=self.config,
            model_card_extra=self.model_card_extra,
            base_label=self.base,
            adapter_label=self.adapter,
        )


def _is_local(uri: str) -> bool:
    return Uri.parse(uri).entry.is_local


def _key_for(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def fetch_adapter(storage: Storage, uri: str, dest: Path) -> Path:
    """The local directory holding the adapter at `uri`: the path itself when local, else a copy of the adapter
    files only (never the run's checkpoints or an earlier merged model)."""
    local = storage.local_path(uri)
    if local is not None:
        if not local.exists():
            raise MergeError(f"no adapter at {uri}: {local} does not exist")
        return local
    prefix = as_prefix(uri)
    listed = storage.list(prefix)
    if not listed:
        raise MergeError(f"no adapter at {uri}: nothing is stored under that prefix")
    present = {o.key: o for o in listed}
    chosen: list[ObjectInfo] = []
    raw = storage.read_bytes(join_uri(prefix, MANIFEST)) if MANIFEST in present else None
    if raw:
        try:
            names = [str(f["path"]) for f in json.loads(raw)["files"]]
            # The run's top-level files (adapter, tokenizer, trainer_state.json, samples.jsonl), not its
            # TensorBoard logs.
            chosen = [present[n] for n in names if n in present and "/" not in n]
        except (ValueError, KeyError, TypeError):
            log.warning("the run manifest at %s is unreadable; fetching the top-level files", uri)
    if not chosen:
        chosen = [o for o in listed if "/" not in o.key]
    if MANIFEST in present:
        chosen.append(present[MANIFEST])
    if ADAPTER_CONFIG not in {o.key for o in chosen}:
        top = sorted(o.key for o in listed if "/" not in o.key)[:20]
        raise MergeError(f"no adapter at {uri}: {ADAPTER_CONFIG} not found (top-level objects: {top or 'none'})")
    # Small: fetched afresh every time, so a retrained adapter at the same URI is never mixed with an old copy.
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    storage.download(prefix, dest, chosen, durable=False)  # fetched afresh every time: never trusted later
    return dest


def fetch_base(uri: str, cache: NodeCache, storage_for: Any) -> Path:
    """The local directory holding the base model at `uri`."""
    if Uri.parse(uri).entry.handler == "hub":  # read-only sources are fetched by the node cache
        return cache.fetch(uri)
    storage: Storage = storage_for(uri)
    local = storage.local_path(uri)
    if local is not None:
        if not local.is_dir():
            raise MergeError(f"no base model at {uri}: {local} is not a directory")
        return local
    prefix = as_prefix(uri)
    listed = storage.list(prefix)
    if not listed:
        raise MergeError(f"no base model at {uri}: nothing is stored under that prefix")
    wanted = [o for o in listed if not o.key.endswith(_SKIP_BASE) and not PurePosixPath(o.key).name.startswith(".")]
    if not any(o.key.endswith(".safetensors") for o in wanted):
        raise MergeError(f"the base model at {uri} has no safetensors weights")
    dest = cache.path_for(prefix)
    storage.download(prefix, dest, wanted, durable=cache.durable)
    return dest


def _delete_object(storage: Storage, uri: str) -> None:
    # Storage.delete_prefix treats its argument as a prefix ("key/") on S3; one object needs its exact key.
    if isinstance(storage, S3Storage):
        parsed = Uri.parse(uri)
        try:
            storage.client.delete_object(Bucket=parsed.root, Key=parsed.path)
        except Exception as exc:
            raise StorageError(f"cannot delete {uri}: {exc}") from exc
    else:
        storage.delete_prefix(uri)


def _prepare_remote_output(
    storage: Storage, output: str, source: dict[str, Any], overwrite: bool
) -> MergeReport | None:
    """Make `output` ready for a fresh merge; return the existing report when the same merge is already there."""
    listed = storage.list(output)
    if not listed:
        return None
    keys = {o.key for o in listed}
    manifest = None
    if MANIFEST in keys:
        raw = storage.read_bytes(join_uri(output, MANIFEST))
        try:
            manifest = json.loads(raw or b"")
        except ValueError:
            manifest = None
    merged = isinstance(manifest, dict) and manifest.get("kind") == "merged-model"
    if merged and isinstance(manifest, dict) and manifest.get("source") == source:
        return existing_report(manifest, output)
    ours_interrupted = manifest is None and INCOMPLETE_MARKER in keys
    if not ours_interrupted and not overwrite:
        what = "a different merged model" if merged else f"{len(keys)} object(s) that are not a merged model"
        raise MergeError(f"the output {output} already holds {what}; choose another output or pass --overwrite")
    # Manifest first: should we stop half way, what is left no longer looks complete.
    if MANIFEST in keys:
        _delete_object(storage, join_uri(output, MANIFEST))
    deleted = storage.delete_prefix(output)
    log.info("cleared %d object(s) from %s before merging", deleted, output)
    return None


def merge_from_storage(request: MergeRequest, *, cache_dir: Path, storage: StorageSpec | None = None) -> MergeReport:
    """Merge `request.adapter` into `request.base` and write the result to `request.output` (any storage URIs)."""
    spec = storage or (request.config.storage if request.config else None) or StorageSpec()

    def storage_for(uri: str) -> Storage:
        return open_storage(uri, spec)

    check_output_apart(request.output, {"base model": request.base, "adapter": request.adapter})
    cache = NodeCache(cache_dir, storage_for, Ranks(), durable=request.config.cache_durable if request.config else True)
    work = cache_dir / "merge" / _key_for(f"{request.base}|{request.adapter}|{request.output}")
    adapter_dir = fetch_adapter(storage_for(request.adapter), request.adapter, work / "adapter")
    settings = request.settings()

    if _is_local(request.output):
        out_path = storage_for(request.output).local_path(request.output)
        assert out_path is not None
        base_dir = fetch_base(request.base, cache, storage_for)
        report = merge_to_directory(base_dir, adapter_dir, out_path, settings)
        report.output = request.output
        return report

    out_storage = storage_for(request.output)
    output = as_prefix(request.output)
    loaded = load_adapter(adapter_dir, request.adapter)
    source = source_record(request.base, request.adapter, loaded.sha256, settings)
    existing = _prepare_remote_output(out_storage, output, source, request.overwrite)
    if existing is not None:
        log.info("%s already holds this merge; nothing to do", output)
        return existing
    base_dir = fetch_base(request.base, cache, storage_for)

    staging = work / "out"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    marker = {"source": source, "started": now_rfc3339()}
    out_storage.write_bytes(join_uri(output, INCOMPLETE_MARKER), json.dumps(marker).encode())

    def upload(path: Path, entry: WrittenFile) -> None:
        out_storage.upload_file(path, join_uri(output, entry.path), sha256=entry.sha256)
        path.unlink()  # scratch holds at most one finished shard at a time

    try:
        report = merge_into(base_dir, loaded, staging, settings, on_file=upload)
        manifest = build_manifest(report, source)
        out_storage.write_bytes(join_uri(output, MANIFEST), json.dumps(manifest, indent=1).encode())
        _delete_object(out_storage, join_uri(output, INCOMPLETE_MARKER))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.output = output
    log.info("%s", report.summary())
    return report
