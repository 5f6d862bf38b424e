"""From a TrainerConfig to tokenized train/eval datasets: read, convert, mix, split, template, mask, pack, cache."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from finetune_trainer.config import DatasetSpec, TrainerConfig
from finetune_trainer.data.cache import TokenCache, cache_key, file_fingerprint, tokenizer_fingerprint
from finetune_trainer.data.encode import Masking
from finetune_trainer.data.forking import reaping_later, trim_heap
from finetune_trainer.data.formats import Drops, PieceReader, Reader, counted, piece_reader, reader
from finetune_trainer.data.packing import Layout
from finetune_trainer.data.parallel import Part, PartEncoder, default_workers, encode_parts
from finetune_trainer.data.readers import PieceError, list_files, read_file, read_pieces
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


def _file_reader(spec: DatasetSpec, path: Path, remaining: int | None, whole: bool) -> Reader | None:
    """The Reader of one file: a JSON file in pieces, unless `whole` or under maxSamples (whose cut needs the count
    of every record before it) or where its first piece cannot tell how to read it; any other file whole."""
    if not whole and remaining is None:
        text = read_pieces(path, spec.file_type)
        if text is not None:
            try:
                return piece_reader(spec, text)
            except PieceError as exc:
                log.debug("reading %s whole: %s", path, exc)
    return reader(spec, read_file(path, spec.file_type), remaining)


def _readers(datasets: Sequence[_Dataset], whole: bool) -> list[tuple[_Dataset, list[Reader]]]:
    """Each dataset with a Reader per file it uses (files past its maxSamples are not read); JSON files in pieces
    unless `whole`."""
    out = []
    for dataset in datasets:
        limit = dataset.spec.max_samples
        found: list[Reader] = []
        read = 0
        for path in dataset.files:
            remaining = None if limit is None else limit - read
            if remaining == 0:
                break
            file_reader = _file_reader(dataset.spec, path, remaining, whole)
            if file_reader is not None:
                found.append(file_reader)
                read += file_reader.count
        out.append((dataset, found))
    return out


@dataclass
class _Encoded:
    """The conversations of some datasets, in read order, encoded: per conversation its sample's length (0 where
    dropped), whether it was truncated, its tokens with a loss, and where its ids and labels are (which part, from
    where).
    """

    records: int
    drops: Drops  # records dropped when read
    parts: list[Part]
    part: np.ndarray  # per conversation: its part
    starts: np.ndarray  # per conversation: where its sample starts in its part's arrays
    lengths: np.ndarray
    cut: np.ndarray
    labeled: np.ndarray
    dropped: dict[int, tuple[str, str]]  # conversation → (reason, where its record is)

    @property
    def count(self) -> int:
        return len(self.lengths)

    @classmethod
    def join(cls, datasets: Sequence[tuple[_Dataset, list[tuple[Reader, list[Part]]]]]) -> _Encoded:
        """The parts of these datasets, in order; a dataset that yields no conversation is a DataError."""
        drops = Drops()
        records = 0
        parts: list[Part] = []
        dropped: dict[int, tuple[str, str]] = {}
        offset = 0  # conversations before the part
        for dataset, files in datasets:
            own = Drops()
            read = found = 0
            for file_reader, file_parts in files:
                base = 0  # the file's records before the part
                for part in file_parts:
                    for reason, locator in part.read_drops:
                        own.add(reason, file_reader.where(base, locator))
                    for index, reason, locator in part.dropped:
                        dropped[offset + index] = (reason, file_reader.where(base, locator))
                    base += part.records
                    offset += part.conversations
                    found += part.conversations
                    parts.append(part)
                read += base
            if not found:
                detail = f": {read} records, all dropped ({own.summary()}); first: {own.examples[0]}" if read else ""
                raise DataError(f"dataset {dataset.spec.uri} has no usable samples{detail or ' (no records)'}")
            drops.merge(own)
            records += read
        sizes = [part.conversations for part in parts]
        return cls(
            records,
            drops,
            parts,
            np.repeat(np.arange(len(parts)), sizes),
            np.concatenate([np.cumsum(part.lengths) - part.lengths for part in parts]),
            np.concatenate([part.lengths for part in parts]),
            np.concatenate([part.cut for part in parts]),
            np.concatenate([part.labeled for part in parts]),
            dropped,
        )

    def choose(self, order: Sequence[int], drops: Drops) -> np.ndarray:
        """The conversations of `order` that became samples, in that order; those dropped on the way go to
        `drops`."""
        for conversation in order:
            if conversation in self.dropped:
                drops.add(*self.dropped[conversation])
        chosen = np.asarray(order, dtype=np.int64)
        return chosen[self.lengths[chosen] > 0]

    def gather(self, conversations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids and labels of these conversations' samples, one after another (new arrays)."""
        spans = list(
            zip(
                self.part[conversations].tolist(),
                self.starts[conversations].tolist(),
                self.lengths[conversations].tolist(),
                strict=True,
            )
        )
        columns = []
        for name in ("input_ids", "labels"):
            arrays = [getattr(part, name) for part in self.parts]
            pieces = [arrays[p][a : a + n] for p, a, n in spans]
            columns.append(np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32))
        return columns[0], columns[1]


@dataclass(frozen=True)
class _Job:
    """What every split is prepared with."""

    config: TrainerConfig
    tokenizer: Any
    template: ChatTemplate
    workers: int | None  # None: decided by the number of records

    @property
    def masking(self) -> Masking:
        training = self.config.training
        return Masking(training.cutoff_len, training.train_on_prompt, training.mask_history)


Grouped = list[tuple[_Dataset, list[tuple[Reader, list[Part]]]]]


def _encode(job: _Job, groups: Sequence[Sequence[_Dataset]]) -> tuple[int, list[Grouped]]:
    """Every file of these groups of datasets read, converted and encoded, in one pass over all processes (and how
    many processes that is).

    JSON files are read in pieces, parsed where they are encoded; when a piece turns out not to be whole records, or
    a file's later records call for another format than its first, it is all done again with every file read whole.
    """
    try:
        return _encode_read(job, [_readers(group, whole=False) for group in groups])
    except PieceError as exc:
        log.info("reading the data files whole: %s", exc)
    return _encode_read(job, [_readers(group, whole=True) for group in groups])


def _encode_read(job: _Job, groups: Sequence[list[tuple[_Dataset, list[Reader]]]]) -> tuple[int, list[Grouped]]:
    readers = [file_reader for group in groups for _, files in group for file_reader in files]
    count = sum(file_reader.count for file_reader in readers)
    total = counted(readers)
    next_report = [REPORT_EVERY]

    def progress(done: int) -> None:
        if next_report[0] <= done < count:
            log.info("prepared %d of %s records", done, total)
            next_report[0] += REPORT_EVERY

    workers = default_workers(count) if job.workers is None else job.workers
    if workers > 1:
        trim_heap()  # before the forks of this and the cache writer's phase
    encoder = PartEncoder(job.template, job.tokenizer, job.masking)
    encoded = encode_parts(encoder, readers, workers, progress)
    for file_reader, file_parts in zip(readers, encoded, strict=True):
        if isinstance(file_reader, PieceReader):
            file_reader.check(frozenset().union(*(part.columns or () for part in file_parts)))
    parts = iter(zip(readers, encoded, strict=True))
    return workers, [[(dataset, [next(parts) for _ in files]) for dataset, files in group] for group in groups]


def _split_stats(encoded: _Encoded, chosen: np.ndarray, records: int, drops: Drops, label: str) -> DataStats:
    if len(chosen) == 0:
        raise DataError(
            f"no {label} samples left after tokenization ({drops.summary()}); first: "
            f"{drops.examples[0] if drops.examples else 'none'}"
        )
    stats = DataStats(
        records=records,
        samples=len(chosen),
        rows=len(chosen),
        tokens=int(encoded.lengths[chosen].sum()),
        label_tokens=int(encoded.labeled[chosen].sum()),
        truncated=int(encoded.cut[chosen].sum()),
        dropped=drops.total,
        drop_reasons=dict(drops.counts),
    )
    for example in drops.examples:
        log.warning("%s: dropped %s", label, example)
    return stats


def _layout(job: _Job, encoded: _Encoded, chosen: np.ndarray, stats: DataStats, drops: Drops, label: str) -> Layout:
    training = job.config.training
    # Unpacked samples keep the seeded order of the conversations; packed rows get their own seeded order.
    if training.packing:
        layout = Layout.packed_rows(chosen, encoded.lengths, encoded.gather, training.cutoff_len, training.seed)
    else:
        layout = Layout.unpacked(chosen, encoded.lengths, encoded.gather)
    stats.rows = len(layout)
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
    return layout


def _build(
    job: _Job, train_sets: Sequence[_Dataset], eval_sets: Sequence[_Dataset]
) -> tuple[dict[str, Layout], dict[str, Any], int]:
    """The splits' rows planned, their stats, and the number of processes that prepared them."""
    config = job.config
    seed = config.training.seed
    groups = [train_sets]
    if not config.val_size and eval_sets:
        groups.append(eval_sets)
    workers, grouped = _encode(job, groups)
    encoded = [_Encoded.join(group) for group in grouped]
    train = encoded[0]
    # The seeded shuffle of the conversations (it depends only on their number).
    order = list(range(train.count))
    random.Random(seed).shuffle(order)
    records = train.records
    splits: dict[str, tuple[_Encoded, np.ndarray, int, Drops]] = {}
    if config.val_size:
        count = train.count
        if count < 2:
            raise DataError(f"valSize {config.val_size} needs at least 2 samples, the training data has {count}")
        held = min(max(1, round(count * config.val_size)), count - 1)
        # The held-out records are no longer training records; count them once, under eval.
        eval_drops = Drops()
        splits["eval"] = (train, train.choose(order[:held], eval_drops), held, eval_drops)
        order, records = order[held:], records - held
    elif len(encoded) > 1:
        eval_order = list(range(encoded[1].count))
        random.Random(seed).shuffle(eval_order)
        eval_drops = encoded[1].drops
        splits["eval"] = (encoded[1], encoded[1].choose(eval_order, eval_drops), encoded[1].records, eval_drops)
    drops = train.drops
    splits = {"train": (train, train.choose(order, drops), records, drops), **splits}
    layouts: dict[str, Layout] = {}
    stats: dict[str, Any] = {}
    for label in ("train", "eval"):
        if label in splits:
            source, chosen, split_records, split_drops = splits[label]
            split_stats = _split_stats(source, chosen, split_records, split_drops, label)
            layouts[label] = _layout(job, source, chosen, split_stats, split_drops, label)
            stats[label] = asdict(split_stats)
    return layouts, stats, workers


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
    `workers` processes render and tokenize, this one included (default: one for small data, else the CPUs the
    container may use).
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
    # The worker processes of one phase exit while the next one runs (and the last ones while the cache loads).
    with reaping_later():
        if main and not hit:
            cache.clear_error()
            try:
                splits, stats, processes = _build(_Job(config, tokenizer, template, workers), train_sets, eval_sets)
            except TrainerError as exc:
                cache.record_error(exc)
                raise
            cache.write(splits, stats, processes)
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
