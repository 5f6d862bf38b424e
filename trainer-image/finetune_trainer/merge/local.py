"""The streaming merge on local directories: base safetensors in, merged sharded safetensors out, tensor by tensor.

The model is never instantiated. Base tensors are read one at a time with positioned file reads (tensors the
adapter does not touch are copied in slices of rows, cast on the way), the LoRA/DoRA arithmetic of
`finetune_trainer.merge.weights` is applied to the few it does touch, in float32, and the bytes go straight into
the planned output shard. Peak memory is therefore about one adapted weight matrix in float32 plus the adapter,
whatever the model's size.

Before anything is written, every adapter module is checked against the base's tensor names and shapes (all
problems reported at once). The output directory only ever appears complete: files are written into a sibling
temporary directory, the manifest (every file's size and sha256) goes in last, and the directory is renamed into
place. An existing complete output is replaced only with `overwrite=True`; re-running the same merge onto it is a
no-op that reports it as already complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune_trainer.config import METHOD_REGISTRY, TrainerConfig
from finetune_trainer.errors import MergeError
from finetune_trainer.merge.card import CardFacts, render_model_card
from finetune_trainer.merge.shards import (
    CODES,
    DTYPES,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    SafetensorsError,
    SafetensorsReader,
    ShardWriter,
    TensorEntry,
    WrittenFile,
    parse_size,
    plan_shards,
)
from finetune_trainer.merge.weights import AdapterWeights, fit_problems, merge_tensor, parse_adapter
from finetune_trainer.samples import SAMPLES_FILE, read_samples
from finetune_trainer.storage import sha256_file
from finetune_trainer.timefmt import now_rfc3339

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OUTPUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Files of the base that are not carried over: weights in any format, and what this merge writes itself.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_REWRITTEN = {"config.json", "generation_config.json", "README.md", MANIFEST}
_CHUNK_BYTES = 64 * 1024 * 1024  # untouched tensors are copied in slices of about this size
_MAX_LISTED = 20
_FP16_MAX = float(torch.finfo(torch.float16).max)

OnFile = Callable[[Path, WrittenFile], None]


@dataclass
class MergeReport:
    """What a merge wrote (or found already written)."""

    output: str
    method: str  # lora | dora | qlora
    dtype: str
    files: list[dict[str, Any]] = field(default_factory=list)  # path, size, sha256 (the manifest's list)
    shards: list[str] = field(default_factory=list)
    tensors: int = 0
    merged_modules: int = 0
    replaced_tensors: int = 0
    weight_bytes: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    already_complete: bool = False

    def summary(self) -> str:
        if self.already_complete:
            return f"{self.output} already holds this merge (manifest present): nothing to do"
        return (
            f"merged {self.method} adapter ({self.merged_modules} modules) into {self.tensors} tensors: "
            f"{self.weight_bytes / 1e9:.2f} GB {self.dtype} in {len(self.shards)} shard(s) at {self.output} "
            f"in {self.seconds:.1f}s, peak RSS {self.peak_rss_bytes / 2**30:.2f} GiB"
        )


@dataclass(frozen=True)
class MergeSettings:
    """How to merge and what to record; `base_label`/`adapter_label` name the sources in messages, the model card
    and the manifest (URIs when the inputs came from storage)."""

    dtype: str = "bf16"
    max_shard_size: str = "5GB"
    overwrite: bool = False
    config: TrainerConfig | None = None
    model_card_extra: Mapping[str, Any] | None = None
    base_label: str | None = None
    adapter_label: str | None = None


# --- reading the inputs -----------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise MergeError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise MergeError(f"{what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MergeError(f"{what} {path} is not a JSON object")
    return data


def _optional_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class LoadedAdapter:
    weights: AdapterWeights
    directory: Path
    sha256: str
    trainer_state: dict[str, Any] | None
    run_manifest: dict[str, Any] | None
    samples: list[dict[str, Any]]


def _optional_samples(path: Path) -> list[dict[str, Any]]:
    """The run's samples.jsonl for the model card; an unreadable file is left out with a warning."""
    if not path.is_file():
        return []
    try:
        return [row for row in read_samples(path.read_text()) if isinstance(row, dict)]
    except ValueError as exc:
        log.warning("not showing samples in the model card: %s is unreadable (%s)", path, exc)
        return []


def load_adapter(directory: Path, label: str) -> LoadedAdapter:
    """Read a peft adapter directory (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import load_file

    if not directory.is_dir():
        raise MergeError(f"no adapter at {label}: {directory} does not exist")
    run_manifest = _optional_json(directory / MANIFEST)
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        method = (run_manifest or {}).get("method")
        if method in METHOD_REGISTRY and not METHOD_REGISTRY[method].adapter:
            raise MergeError(f"no adapter at {label}: that run trained method {method!r}, which writes a whole model")
        present = sorted(p.name for p in directory.iterdir())[:_MAX_LISTED]
        raise MergeError(
            f"no adapter at {label}: {ADAPTER_CONFIG} not found (the location holds {present or 'nothing'})"
        )
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        hint = (
            " (adapter_model.bin is not supported; save with safetensors)"
            if (directory / "adapter_model.bin").exists()
            else ""
        )
        raise MergeError(f"no adapter weights at {label}: {ADAPTER_WEIGHTS} not found{hint}")
    config = _read_json(config_path, "adapter config")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise MergeError(f"cannot read the adapter weights {weights_path}: {exc}") from exc
    return LoadedAdapter(
        weights=parse_adapter(tensors, config, where=f"adapter {label}"),
        directory=directory,
        sha256=sha256_file(weights_path),
        trainer_state=_optional_json(directory / "trainer_state.json"),
        run_manifest=run_manifest,
        samples=_optional_samples(directory / SAMPLES_FILE),
    )


@dataclass(frozen=True)
class BaseTensor:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class BaseModel:
    directory: Path
    config: dict[str, Any]
    tensors: list[BaseTensor]  # in read order: file by file

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in self.tensors}

    @property
    def architecture(self) -> str | None:
        names = self.config.get("architectures")
        return str(names[0]) if isinstance(names, list) and names else self.config.get("model_type")


def read_base(directory: Path, label: str) -> BaseModel:
    """The base's config and the name, dtype and shape of every tensor, without reading tensor data."""
    if not directory.is_dir():
        raise MergeError(f"no base model at {label}: {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise MergeError(f"no base model at {label}: config.json not found (not a Hugging Face model directory)")
    config = _read_json(config_path, "base model config")
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"
        raise MergeError(
            f"the base model at {label} is quantized ({method}); adapters are merged into the full-precision base "
            "only (a QLoRA adapter too): point the merge at the original, unquantized model"
        )
    index_path = directory / SAFE_INDEX
    if index_path.is_file():
        weight_map = _read_json(index_path, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MergeError(f"the safetensors index of the base model at {label} has no weight_map")
        files = sorted(set(map(str, weight_map.values())))
    elif (directory / SAFE_WEIGHTS).is_file():
        files = [SAFE_WEIGHTS]
    else:
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        found = f"; found {others[:5]} (convert the model to safetensors first)" if others else ""
        raise MergeError(f"the base model at {label} has no safetensors weights{found}")
    tensors = []
    for name in files:
        path = directory / name
        if not path.is_file():
            raise MergeError(f"the base model at {label} lacks {name}, which its index lists")
        try:
            with SafetensorsReader(path) as reader:
                tensors += [BaseTensor(t.name, name, t.dtype, t.shape) for t in reader.tensors.values()]
        except (OSError, SafetensorsError) as exc:
            raise MergeError(f"cannot read the base weights {path}: {exc}") from exc
    return BaseModel(directory, config, tensors)


def check_fit(base: BaseModel, adapter: AdapterWeights, base_label: str, adapter_label: str) -> None:
    """Raise MergeError naming every module that does not fit (missing in the base, or of other shape)."""
    problems = fit_problems(base.shapes, adapter)
    if not problems:
        return
    declared = (adapter.config.get("auto_mapping") or {}).get("base_model_class")
    trained_on = adapter.config.get("base_model_name_or_path")
    context = f"base architecture {base.architecture}"
    if declared:
        context += f", adapter made for {declared}"
    if trained_on:
        context += f", adapter trained on {trained_on}"
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise MergeError(
        f"the adapter {adapter_label} does not fit the base model {base_label} ({context}):\n  "
        + "\n  ".join(shown)
        + more
    )


# --- writing ----------------------------------------------------------------------------------------------------


def _describe(path: Path, root: Path) -> WrittenFile:
    return WrittenFile(path.relative_to(root).as_posix(), path.stat().st_size, sha256_file(path))


def _output_entries(base: BaseModel, dtype: torch.dtype) -> list[TensorEntry]:
    out_code = CODES[dtype]
    return [
        TensorEntry(t.name, out_code if DTYPES[t.dtype].is_floating_point else t.dtype, t.shape) for t in base.tensors
    ]


def _check_range(name: str, tensor: torch.Tensor, dtype: str) -> None:
    """Refuse NaN/inf, and values the fp16 output cannot hold. One max-abs reduction, no temporary tensor."""
    if tensor.numel() == 0:
        return
    peak = float(torch.linalg.vector_norm(tensor, ord=math.inf))
    if not math.isfinite(peak):
        raise MergeError(f"merged tensor {name} holds NaN or infinite values; the adapter may be broken")
    if dtype == "fp16" and peak > _FP16_MAX:
        raise MergeError(f"tensor {name} holds values up to {peak:.3g}, beyond the fp16 range: use bf16 or fp32")


def _row_slices(tensor: BaseTensor) -> Iterator[tuple[int, int]]:
    rows = tensor.shape[0]
    row_bytes = DTYPES[tensor.dtype].itemsize * max(1, int(torch.Size(tensor.shape[1:]).numel()))
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _stream_weights(
    base: BaseModel, adapter: AdapterWeights, out_dir: Path, settings: MergeSettings, on_file: OnFile | None
) -> tuple[list[WrittenFile], list[str], int, int]:
    """Write the merged shards (and the index); returns (files, shard names, weight bytes, parameters)."""
    dtype = OUTPUT_DTYPES[settings.dtype]
    plan = plan_shards(_output_entries(base, dtype), parse_size(settings.max_shard_size))
    by_name = {t.name: t for t in base.tensors}
    touched = adapter.touched_keys()
    written: list[WrittenFile] = []
    with ExitStack() as stack:
        readers: dict[str, SafetensorsReader] = {}

        def reader_for(file: str) -> SafetensorsReader:
            if file not in readers:
                readers[file] = stack.enter_context(SafetensorsReader(base.directory / file))
            return readers[file]

        for file_name, entries in zip(plan.files, plan.shards, strict=True):
            writer = ShardWriter(out_dir / file_name, entries)
            try:
                for entry in entries:
                    source = by_name[entry.name]
                    target = DTYPES[entry.dtype]
                    reader = reader_for(source.file)
                    if entry.name in touched or not source.shape or not source.shape[0]:
                        tensor, changed = merge_tensor(entry.name, reader.read(entry.name), adapter)
                        if changed or target != tensor.dtype:
                            _check_range(entry.name, tensor, settings.dtype)
                        writer.write(entry.name, tensor.to(target))
                        del tensor
                        continue
                    # Untouched tensors (the embedding is the largest) pass through in slices of rows.
                    for rows in _row_slices(source):
                        chunk = reader.read(entry.name, rows)
                        if chunk.is_floating_point() and target != chunk.dtype:
                            _check_range(entry.name, chunk, settings.dtype)
                        writer.write(entry.name, chunk.to(target))
                        del chunk
                written_file = writer.close()
            except BaseException:
                writer.abort()
                raise
            log.info("wrote %s (%d tensors, %.1f MB)", file_name, len(entries), written_file.size / 1e6)
            written.append(written_file)
            if on_file is not None:
                on_file(out_dir / file_name, written_file)
    index_path = plan.write_index(out_dir)
    if index_path is not None:
        written.append(_emit(index_path, out_dir, on_file))
    params = int(plan.index()["metadata"]["total_parameters"])
    return written, plan.files, plan.total_bytes, params


def _emit(path: Path, root: Path, on_file: OnFile | None) -> WrittenFile:
    described = _describe(path, root)
    if on_file is not None:
        on_file(path, described)
    return described


def _generation_config(base: BaseModel) -> dict[str, Any]:
    # What transformers derives from a model config when a model ships without generation_config.json.
    derived: dict[str, Any] = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if base.config.get(key) is not None:
            derived[key] = base.config[key]
    return derived


def _copy_small_files(
    base: BaseModel, adapter: LoadedAdapter, out_dir: Path, settings: MergeSettings, on_file: OnFile | None
) -> list[WrittenFile]:
    """config.json (with the new dtype), generation config, tokenizer, the base's other small files."""
    written = []
    config = dict(base.config)
    torch_name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[settings.dtype]
    config["dtype"] = torch_name
    if "torch_dtype" in config:
        config["torch_dtype"] = torch_name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written.append(_emit(out_dir / "config.json", out_dir, on_file))

    generation = base.directory / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, out_dir / generation.name)
    else:
        (out_dir / generation.name).write_text(json.dumps(_generation_config(base), indent=2) + "\n")
    written.append(_emit(out_dir / generation.name, out_dir, on_file))

    # The run saved the tokenizer it trained with next to the adapter (chat template, pad token); take the whole
    # set from one place so that files never mix.
    tokenizer_dir = adapter.directory if (adapter.directory / "tokenizer_config.json").is_file() else base.directory
    carried = {n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()}
    for path in sorted(base.directory.iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name in _REWRITTEN or name in TOKENIZER_FILES:
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        shutil.copyfile(path, out_dir / name)
        written.append(_emit(out_dir / name, out_dir, on_file))
    for name in sorted(carried):
        shutil.copyfile(tokenizer_dir / name, out_dir / name)
        written.append(_emit(out_dir / name, out_dir, on_file))
    return written


def source_record(base: str, adapter: str, adapter_sha256: str, settings: MergeSettings) -> dict[str, Any]:
    """What identifies a merge: the same record on an existing output means the same result is already there."""
    return {
        "base": base,
        "adapter": adapter,
        "adapter_sha256": adapter_sha256,
        "dtype": settings.dtype,
        "max_shard_size": settings.max_shard_size,
    }


def check_output_apart(output: str, inputs: Mapping[str, str]) -> None:
    """Refuse an output that is an input or contains one: replacing it would delete the input."""
    out = output.rstrip("/") + "/"
    for what, uri in inputs.items():
        if (uri.rstrip("/") + "/").startswith(out):
            raise MergeError(f"the output {output} holds the {what} {uri}; write the merged model somewhere else")


def build_manifest(report: MergeReport, source: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "format": 1,
        "kind": "merged-model",
        "time": now_rfc3339(),
        "method": report.method,
        "dtype": report.dtype,
        "source": dict(source),
        "shards": report.shards,
        "weight_bytes": report.weight_bytes,
        "files": report.files,
    }


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def merge_into(
    base_dir: Path, adapter: LoadedAdapter, out_dir: Path, settings: MergeSettings, on_file: OnFile | None = None
) -> MergeReport:
    """Write the merged model into the empty directory `out_dir` (no manifest); `on_file(path, entry)` is called
    as each file is finished, e.g. to upload it. Raises MergeError before writing anything when the adapter does
    not fit."""
    if settings.dtype not in OUTPUT_DTYPES:
        raise MergeError(f"dtype must be one of {sorted(OUTPUT_DTYPES)}, got {settings.dtype!r}")
    parse_size(settings.max_shard_size)
    started = time.monotonic()
    base_label = settings.base_label or str(base_dir)
    adapter_label = settings.adapter_label or str(adapter.directory)
    base = read_base(base_dir, base_label)
    check_fit(base, adapter.weights, base_label, adapter_label)
    trained = (adapter.run_manifest or {}).get("method") or (settings.config.method.type if settings.config else None)
    method = "qlora" if trained == "qlora" else adapter.weights.method
    log.info(
        "merging the %s adapter %s (%d modules) into %s (%s, %d tensors) as %s, shards up to %s",
        method,
        adapter_label,
        len(adapter.weights.deltas),
        base_label,
        base.architecture,
        len(base.tensors),
        settings.dtype,
        settings.max_shard_size,
    )
    files, shards, weight_bytes, params = _stream_weights(base, adapter.weights, out_dir, settings, on_file)
    files += _copy_small_files(base, adapter, out_dir, settings, on_file)
    facts = CardFacts(
        base=base_label,
        adapter=adapter_label,
        method=method,
        dtype=settings.dtype,
        shards=len(shards),
        weight_bytes=weight_bytes,
        parameters=params,
        adapter_config=adapter.weights.config,
        merged_modules=len(adapter.weights.deltas),
        replaced_tensors=len(adapter.weights.replacements),
        architecture=base.architecture,
        config=settings.config,
        trainer_state=adapter.trainer_state,
        run_manifest=adapter.run_manifest,
        samples=adapter.samples,
        extra=dict(settings.model_card_extra or {}),
    )
    (out_dir / "README.md").write_text(render_model_card(facts))
    files.append(_emit(out_dir / "README.md", out_dir, on_file))
    return MergeReport(
        output=str(out_dir),
        method=method,
        dtype=settings.dtype,
        files=sorted((f.as_dict() for f in files), key=lambda f: str(f["path"])),
        shards=shards,
        tensors=len(base.tensors),
        merged_modules=len(adapter.weights.deltas),
        replaced_tensors=len(adapter.weights.replacements),
        weight_bytes=weight_bytes,
        seconds=time.monotonic() - started,
        peak_rss_bytes=peak_rss_bytes(),
    )


def existing_report(manifest: Mapping[str, Any], output: str) -> MergeReport:
    return MergeReport(
        output=output,
        method=str(manifest.get("method", "")),
        dtype=str(manifest.get("dtype", "")),
        files=list(manifest.get("files", [])),
        shards=list(manifest.get("shards", [])),
        weight_bytes=int(manifest.get("weight_bytes", 0)),
        already_complete=True,
    )


def merge_model(
    base: Path,
    adapter: Path,
    output: Path,
    *,
    dtype: str,
    max_shard_size: str,
    model_card_extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    config: TrainerConfig | None = None,
) -> MergeReport:
    """Merge the peft adapter directory `adapter` into the Hugging Face model directory `base`, writing the merged
    model to the directory `output` (which appears only once complete, with manifest.json).

    An `output` that already holds a complete merge of the same inputs is left as it is (the report says
    `already_complete`); one holding anything else is replaced only with `overwrite=True`. `config`, the run's
    TrainerConfig, adds the training configuration to the model card.
    """
    settings = MergeSettings(
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        config=config,
        model_card_extra=model_card_extra,
    )
    return merge_to_directory(base, adapter, output, settings)


def merge_to_directory(base: Path, adapter: Path, output: Path, settings: MergeSettings) -> MergeReport:
    """merge_model with all settings in one object (the storage wrapper passes the source URIs as labels)."""
    output = output.absolute()
    check_output_apart(str(output), {"base model": str(base.absolute()), "adapter": str(adapter.absolute())})
    base_label, adapter_label = settings.base_label or str(base), settings.adapter_label or str(adapter)
    loaded = load_adapter(adapter, adapter_label)
    source = source_record(base_label, adapter_label, loaded.sha256, settings)
    existing = _optional_json(output / MANIFEST)
    if existing is not None and existing.get("kind") == "merged-model" and existing.get("source") == source:
        log.info("%s already holds this merge; nothing to do", output)
        return existing_report(existing, str(output))
    occupied = (output.is_dir() and any(output.iterdir())) or output.is_file()
    if occupied and not settings.overwrite:
        merged = existing is not None and existing.get("kind") == "merged-model"
        what = "a different merged model" if merged else "files that are not a complete merged model"
        raise MergeError(f"the output {output} already holds {what}; choose another output or pass --overwrite")

    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(output)
    work = output.parent / f".{output.name}.partial-{os.getpid()}"
    work.mkdir()
    try:
        report = merge_into(base, loaded, work, settings)
        (work / MANIFEST).write_text(json.dumps(build_manifest(report, source), indent=1) + "\n")
        if output.exists():
            # Swap by renames: the old output stays whole until the new one takes its name.
            aside = output.parent / f".{output.name}.replaced-{os.getpid()}"
            os.replace(output, aside)
            os.replace(work, output)
            shutil.rmtree(aside) if aside.is_dir() else aside.unlink()
        else:
            os.replace(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    report.output = str(output)
    log.info("%s", report.summary())
    return report


def _remove_stale_partials(output: Path) -> None:
    # Left by a merge into the same output that was killed; never complete, never visible under the final name.
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
