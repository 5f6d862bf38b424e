"""From a TrainerConfig to tokenized train/eval datasets: read, convert, mix, split, template, mask, pack, cache."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from finetune_trainer.config import DatasetSpec, TrainerConfig
from finetune_trainer.data.cache import TokenCache, cache_key, file_fingerprint, tokenizer_fingerprint
from finetune_trainer.data.conversation import Conversation
from finetune_trainer.data.encode import IGNORE, Masking
from finetune_trainer.data.formats import Drops, convert
from finetune_trainer.data.packing import Rows, pack
from finetune_trainer.data.parallel import default_workers, encode_all
from finetune_trainer.data.readers import list_files, read_file
from finetune_trainer.data.templates import ChatTemplate, get_template
from finetune_trainer.errors import DataError, TrainerError

log = logging.getLogger("finetune_trainer.data")

REPORT_EVERY = 50_000
DEFAULT_WAIT_S = 4 * 3600.0


@dataclass
class DataStats:
    """What became of one split's records: read, dropped (by reason), truncated, and what is left."""

    records: int = 0  # records read (after maxSamples)
    samples: int = 0  # conversations kept after tokenization
    rows: int = 0  # dataset rows: packed rows, or samples when not packing
    tokens: int = 0  # input tokens over all rows
    label_tokens: int = 0  # tokens that carry a loss
    truncated: int = 0  # samples cut at cutoffLen (and kept)
    dropped: int = 0  # records left out, all reasons
    drop_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class DataBundle:
    """The prepared data: `train` and `eval` are memory-mapped `datasets.Dataset`s with int32 list columns
    input_ids, labels (-100 = no loss) and, when packed, position_ids.
    """

    train: Any
    eval: Any | None
    stats: DataStats
    eval_stats: DataStats | None
    packed: bool
    pad_token_id: int
    cache_path: Path
    cache_hit: bool

    def collator(self, attn_implementation: str | None = None, *, block_mask_dtype: Any = None) -> Any:
        """The batch collator for a model using `attn_implementation` (its config's `_attn_implementation`).

        flash_attention_* gets the padding-free layout (one concatenated row per micro-batch, varlen kernels);
        the others get padded rows, kept apart by position_ids (packed) or attention_mask (unpacked).
        `block_mask_dtype` (the model's dtype) adds an explicit 4D block-diagonal causal mask to packed batches.
        """
        from finetune_trainer.data.collate import SFTCollator

        padding_free = bool(attn_implementation and attn_implementation.startswith("flash"))
        return SFTCollator(self.pad_token_id, padding_free=padding_free, block_mask_dtype=block_mask_dtype)


def local_resolve(uri: str) -> Path:
    """file:// URIs (and plain paths) to local paths; the S3/PVC downloaders provide their own `resolve`."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.netloc + parsed.path) if parsed.scheme else uri)
    raise DataError(f"cannot read {uri!r} without a downloader for {parsed.scheme}:// URIs")


@dataclass(frozen=True)
class _Dataset:
    spec: DatasetSpec
    root: Path
    files: tuple[Path, ...]


def _locate(specs: Sequence[DatasetSpec], resolve: Callable[[str], Path]) -> list[_Dataset]:
    located = []
    for spec in specs:
        root = Path(resolve(spec.uri))
        located.append(_Dataset(spec, root, tuple(list_files(root, spec.file_type))))
    return located


def _describe(datasets: Sequence[_Dataset], fingerprint: Callable[[Path], str]) -> list[dict[str, Any]]:
    described = []
    for dataset in datasets:
        spec = dataset.spec.model_dump(mode="json", exclude={"uri"})
        files = [
            [str(path.relative_to(dataset.root)) if path != dataset.root else path.name, fingerprint(path)]
            for path in dataset.files
        ]
        described.append({"spec": spec, "files": files})
    return described


def _read(datasets: Sequence[_Dataset], drops: Drops) -> tuple[list[Conversation], int]:
    """All conversations of these datasets, concatenated; a dataset that yields none is a DataError."""
    conversations: list[Conversation] = []
    records = 0
    for dataset in datasets:
        limit = dataset.spec.max_samples
        found: list[Conversation] = []
        read = 0
        own = Drops()
        for path in dataset.files:
            remaining = None if limit is None else limit - read
            if remaining == 0:
                break
            source = read_file(path, dataset.spec.file_type)
            batch, count = convert(dataset.spec, source, own, remaining)
            found += batch
            read += count
        if not found:
            detail = f": {read} records, all dropped ({own.summary()}); first: {own.examples[0]}" if read else ""
            raise DataError(f"dataset {dataset.spec.uri} has no usable samples{detail or ' (no records)'}")
        drops.merge(own)
        conversations += found
        records += read
    return conversations, records


@dataclass(frozen=True)
class _Job:
    """What every split is prepared with."""

    config: TrainerConfig
    tokenizer: Any
    template: ChatTemplate
    workers: int | None  # None: decided by the number of conversations

    @property
    def masking(self) -> Masking:
        training = self.config.training
        return Masking(training.cutoff_len, training.train_on_prompt, training.mask_history)


def _tokenize(job: _Job, conversations: Sequence[Conversation], drops: Drops, label: str) -> tuple[Rows, int]:
    count = len(conversations)
    next_report = [REPORT_EVERY]

    def progress(done: int) -> None:
        if next_report[0] <= done < count:
            log.info("%s: tokenized %d of %d samples", label, done, count)
            next_report[0] += REPORT_EVERY

    ids: list[Any] = []
    labels: list[Any] = []
    truncated = 0
    workers = default_workers(count) if job.workers is None else job.workers
    chunks = encode_all(conversations, job.template, job.tokenizer, job.masking, workers=workers, progress=progress)
    for chunk in chunks:
        for reason, origin in chunk.dropped:
            drops.add(reason, origin)
        for sample in chunk.samples:
            ids.append(sample.input_ids)
            labels.append(sample.labels)
            truncated += sample.truncated
    return Rows.from_samples(ids, labels), truncated


def _prepare_split(
    job: _Job, conversations: list[Conversation], records: int, drops: Drops, label: str
) -> tuple[Rows, DataStats]:
    training = job.config.training
    samples, truncated = _tokenize(job, conversations, drops, label)
    if len(samples) == 0:
        raise DataError(
            f"no {label} samples left after tokenization ({drops.summary()}); first: "
            f"{drops.examples[0] if drops.examples else 'none'}"
        )
    # Unpacked samples keep the seeded order of the conversations; packed rows get their own seeded order.
    rows = pack(samples, training.cutoff_len, seed=training.seed) if training.packing else samples
    stats = DataStats(
        records=records,
        samples=len(samples),
        rows=len(rows),
        tokens=len(rows.input_ids),
        label_tokens=int((rows.labels != IGNORE).sum()),
        truncated=truncated,
        dropped=drops.total,
        drop_reasons=dict(drops.counts),
    )
    for example in drops.examples:
        log.warning("%s: dropped %s", label, example)
    log.info(
        "%s data: %d records, %d samples in %d rows, %d tokens (%d with loss), %d truncated at %d, %d dropped%s",
        label,
        stats.records,
        stats.samples,
        stats.rows,
        stats.tokens,
        stats.label_tokens,
        stats.truncated,
        training.cutoff_len,
        stats.dropped,
        f" ({drops.summary()})" if stats.dropped else "",
    )
    return rows, stats


def _build(
    job: _Job, train_sets: Sequence[_Dataset], eval_sets: Sequence[_Dataset]
) -> tuple[dict[str, Rows], dict[str, Any]]:
    config = job.config
    seed = config.training.seed
    drops = Drops()
    conversations, records = _read(train_sets, drops)
    random.Random(seed).shuffle(conversations)
    eval_conversations: list[Conversation] = []
    eval_drops = Drops()
    eval_records = 0
    if config.val_size:
        count = len(conversations)
        if count < 2:
            raise DataError(f"valSize {config.val_size} needs at least 2 samples, the training data has {count}")
        held = min(max(1, round(count * config.val_size)), count - 1)
        eval_conversations, conversations = conversations[:held], conversations[held:]
        # The held-out records are no longer training records; count them once, under eval.
        eval_records, records = held, records - held
    elif eval_sets:
        eval_conversations, eval_records = _read(eval_sets, eval_drops)
        random.Random(seed).shuffle(eval_conversations)
    splits: dict[str, Rows] = {}
    stats: dict[str, Any] = {}
    splits["train"], train_stats = _prepare_split(job, conversations, records, drops, "train")
    stats["train"] = asdict(train_stats)
    if eval_conversations:
        splits["eval"], eval_stats = _prepare_split(job, eval_conversations, eval_records, eval_drops, "eval")
        stats["eval"] = asdict(eval_stats)
    return splits, stats


def build_datasets(
    config: TrainerConfig,
    tokenizer: Any,
    resolve: Callable[[str], Path] = local_resolve,
    *,
    local_rank: int = 0,
    is_local_main: bool | None = None,
    wait_timeout_s: float = DEFAULT_WAIT_S,
    fingerprint: Callable[[Path], str] = file_fingerprint,
    workers: int | None = None,
) -> DataBundle:
    """Tokenized train (and eval) data for `config`, built once per node and cached under config.cache_dir.

    Every local rank calls this. `resolve` maps each dataset URI to a local file or directory (every rank calls
    it); `fingerprint` identifies a local file's contents for the cache key (default: its sha256; a downloader
    that knows ETags and sizes may pass a cheaper one). The local main rank (default: local_rank == 0) builds the
    cache or reuses a complete one; the others wait up to `wait_timeout_s` for it by polling the file system.
    `workers` processes render and tokenize (default: one for small data, else the CPUs the container may use).
    Raises ConfigError (template/tokenizer mismatch) and DataError (unreadable or unusable data).
    """
    main = local_rank == 0 if is_local_main is None else is_local_main
    training = config.training
    template = get_template(
        config.template, tokenizer, mask_history=training.mask_history, train_on_prompt=training.train_on_prompt
    )
    train_sets = _locate(config.datasets, resolve)
    eval_sets = _locate(config.eval_datasets or [], resolve)
    key = cache_key(
        {
            "datasets": _describe(train_sets, fingerprint),
            "eval_datasets": _describe(eval_sets, fingerprint),
            "val_size": config.val_size,
            "template": template.fingerprint(),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "cutoff_len": training.cutoff_len,
            "packing": training.packing,
            "train_on_prompt": training.train_on_prompt,
            "mask_history": training.mask_history,
            "seed": training.seed,
        }
    )
    cache = TokenCache(Path(config.cache_dir) / "tokenized", key)
    hit = cache.complete
    if main and not hit:
        cache.clear_error()
        try:
            splits, stats = _build(_Job(config, tokenizer, template, workers), train_sets, eval_sets)
        except TrainerError as exc:
            cache.record_error(exc)
            raise
        cache.write(splits, stats)
    elif not main:
        cache.wait(wait_timeout_s)
    if hit:
        log.info("using tokenized data from %s", cache.path)
    loaded, stats = cache.load()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataBundle(
        train=loaded["train"],
        eval=loaded.get("eval"),
        stats=DataStats(**stats["train"]),
        eval_stats=DataStats(**stats["eval"]) if "eval" in stats else None,
        packed=training.packing,
        pad_token_id=pad if pad is not None else 0,
        cache_path=cache.path,
        cache_hit=hit,
    )
