"""Safetensors files read and written as streams: plan output shards from tensor shapes, append tensor bytes as
they are produced, and read input tensors (or slices of their rows) with plain file reads.

A safetensors file is an 8-byte little-endian header length, a JSON header (dtype, shape and byte range of every
tensor, plus string metadata) padded with spaces to a multiple of 8, then the raw little-endian tensor data. The
whole layout follows from shapes and dtypes, so the header can be written before any tensor exists and each tensor
(or each slice of its rows) appended as soon as it is merged: only the piece in hand is ever in memory, however
large the shard. Shard names and the index follow transformers' convention (`model.safetensors` alone, or
`model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`).

Reading goes through `SafetensorsReader` (positioned reads into a fresh tensor) rather than safetensors' memory
map: pages of a mapped file that have been touched count in the process's resident set until unmapped, which made
a streaming merge of a 3 GB model peak at 3.7 GB RSS although it held 0.6 GB of its own memory. Read data passes
through the page cache, which the kernel reclaims at will.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from finetune_trainer.errors import ConfigError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
_METADATA = {"format": "pt"}  # transformers refuses safetensors files whose metadata lacks format=pt
# Largest offset that can appear in a header, for an upper bound on header size before offsets are known.
_MAX_OFFSET = 10**20


def parse_size(text: str) -> int:
    """ "5GB" -> 5_000_000_000, "200KB" -> 200_000, "1GiB" -> 2**30 (decimal units as transformers reads them)."""
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(f"max shard size must look like 5GB, 500MB or 2GiB, got {text!r}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"max shard size must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of an output file: its name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    def header_bound(self) -> int:
        """Bytes this tensor can add to a header (offsets at their largest), comma included."""
        entry = {self.name: {"dtype": self.dtype, "shape": list(self.shape), "data_offsets": [_MAX_OFFSET] * 2}}
        return len(_dumps(entry)) - 2 + 1


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


_BASE_OVERHEAD = 8 + len(_dumps({"__metadata__": _METADATA})) + 7  # length prefix, metadata, padding


@dataclass
class ShardPlan:
    """Which tensors go into which file, in write order."""

    files: list[str]
    shards: list[list[TensorEntry]]

    @property
    def weight_map(self) -> dict[str, str]:
        return {e.name: name for name, shard in zip(self.files, self.shards, strict=True) for e in shard}

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for shard in self.shards for e in shard)

    def index(self) -> dict[str, Any]:
        """The model.safetensors.index.json document (only written when there is more than one shard)."""
        params = sum(math.prod(e.shape) for shard in self.shards for e in shard)
        return {"metadata": {"total_size": self.total_bytes, "total_parameters": params}, "weight_map": self.weight_map}

    def write_index(self, directory: Path) -> Path | None:
        """Write the index into `directory` where there is more than one shard; its path, else None."""
        if len(self.files) < 2:
            return None
        path = directory / SAFE_INDEX
        path.write_text(json.dumps(self.index(), indent=2, sort_keys=True) + "\n")
        return path


def plan_shards(entries: Sequence[TensorEntry], max_bytes: int) -> ShardPlan:
    """Fill shards in order so that no file exceeds `max_bytes`, headers included; a tensor larger than the limit
    gets a file of its own (it cannot be split)."""
    shards: list[list[TensorEntry]] = []
    current: list[TensorEntry] = []
    used = _BASE_OVERHEAD
    for entry in entries:
        cost = entry.nbytes + entry.header_bound()
        if current and used + cost > max_bytes:
            shards.append(current)
            current, used = [], _BASE_OVERHEAD
        current.append(entry)
        used += cost
    if current or not shards:
        shards.append(current)
    if len(shards) == 1:
        return ShardPlan([SAFE_WEIGHTS], shards)
    count = len(shards)
    return ShardPlan([f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)], shards)


def header_bytes(entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and padded JSON header of a file holding `entries` in this order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or _METADATA)}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = _dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def tensor_entries(tensors: Mapping[str, torch.Tensor]) -> list[TensorEntry] | None:
    """The entries of a file holding `tensors` in this order; None when one has a dtype safetensors cannot hold."""
    entries = []
    for name, tensor in tensors.items():
        code = CODES.get(tensor.dtype)
        if code is None:
            return None
        entries.append(TensorEntry(name, code, tuple(tensor.shape)))
    return entries


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor in row-major order, as safetensors stores them (a view, unless it must be made
    contiguous first)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; writing it on a big-endian host is not supported")
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data


def write_safetensors(
    sink: str | os.PathLike[str] | IO[bytes], entries: Sequence[TensorEntry], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Write the safetensors file holding `entries` (in that order), their bytes taken from `tensors`, into `sink`:
    a path, or any binary stream (one written as it is produced, such as `Storage.open_writer`'s)."""
    if not isinstance(sink, (str, os.PathLike)):
        sink.write(header_bytes(entries))
        for entry in entries:
            tensor = tensors[entry.name]
            if CODES.get(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise RuntimeError(f"tensor {entry.name!r} is not the {entry.dtype} {list(entry.shape)} planned")
            sink.write(tensor_bytes(tensor))
        return
    with open(sink, "wb") as handle:
        write_safetensors(handle, entries, tensors)


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes sit in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * DTYPES[self.dtype].itemsize


class SafetensorsError(ValueError):
    """A file is not valid safetensors; the message names it."""


class SafetensorsReader:
    """The header of a safetensors file, and its tensors read on demand without memory-mapping the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "rb")  # noqa: SIM115 - closed in close()
        try:
            self.tensors = self._parse_header()
        except BaseException:
            self._handle.close()
            raise

    def _parse_header(self) -> dict[str, StoredTensor]:
        size = os.fstat(self._handle.fileno()).st_size
        prefix = self._handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length <= 0 or 8 + length > size:
            raise SafetensorsError(f"{self.path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(self._handle.read(length))
        except ValueError as exc:
            raise SafetensorsError(f"{self.path} has an unreadable safetensors header: {exc}") from exc
        base = 8 + length
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise SafetensorsError(f"{self.path}: malformed header entry for {name!r}") from exc
            if dtype not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            if end - begin != nbytes or begin < 0 or base + end > size:
                raise SafetensorsError(f"{self.path}: tensor {name!r} lies outside the file or has the wrong size")
            tensors[name] = StoredTensor(name, dtype, shape, base + begin, base + end)
        return tensors

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name`, or rows [start, stop) of it (along the first dimension)."""
        stored = self.tensors[name]
        start, end, shape = stored.start, stored.end, stored.shape
        if rows is not None:
            first, stop = rows
            start, end = stored.start + first * stored.row_bytes, stored.start + stop * stored.row_bytes
            shape = (stop - first, *stored.shape[1:])
        buffer = torch.empty(end - start, dtype=torch.uint8)
        view = buffer.numpy().data  # read straight into the tensor's memory
        done = 0
        while done < len(view):
            got = os.preadv(self._handle.fileno(), [view[done:]], start + done)
            if got <= 0:
                raise SafetensorsError(f"{self.path}: file ended inside tensor {name!r}")
            done += got
        return buffer.view(DTYPES[stored.dtype]).reshape(shape)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class WrittenFile:
    """A finished output file: relative path, size and sha256 (the manifest's entry)."""

    path: str
    size: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass
class ShardWriter:
    """Writes one planned shard: the header at once, then each tensor's bytes in plan order, whole or in slices of
    rows. Hashes while writing, so the manifest needs no second read."""

    path: Path
    entries: list[TensorEntry]
    _handle: IO[bytes] | None = None
    _digest: Any = field(default_factory=hashlib.sha256)
    _index: int = 0
    _written: int = 0  # bytes of the current entry
    _size: int = 0

    def __post_init__(self) -> None:
        self._handle = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._emit(header_bytes(self.entries))

    def _emit(self, data: bytes | memoryview) -> None:
        assert self._handle is not None
        self._handle.write(data)
        self._digest.update(data)
        self._size += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` (the whole of `name`, or its next rows) in the dtype the plan gave `name`."""
        entry = self.entries[self._index] if self._index < len(self.entries) else None
        if entry is None or entry.name != name:
            expected = entry.name if entry else "nothing"
            raise RuntimeError(f"{self.path.name}: got tensor {name!r} while expecting {expected!r}")
        if CODES.get(tensor.dtype) != entry.dtype:
            raise RuntimeError(f"{self.path.name}: tensor {name!r} is {tensor.dtype}, planned as {entry.dtype}")
        data = tensor_bytes(tensor)
        if self._written + data.nbytes > entry.nbytes:
            raise RuntimeError(f"{self.path.name}: more bytes for {name!r} than its shape {list(entry.shape)} holds")
        self._emit(data)
        self._written += data.nbytes
        if self._written == entry.nbytes:
            self._index, self._written = self._index + 1, 0

    def close(self) -> WrittenFile:
        if self._index < len(self.entries):
            raise RuntimeError(f"{self.path.name}: tensor {self.entries[self._index].name!r} was not written")
        assert self._handle is not None
        self._handle.close()
        return WrittenFile(self.path.name, self._size, self._digest.hexdigest())

    def abort(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
