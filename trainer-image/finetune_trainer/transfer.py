"""Concurrent, resumable, verified S3 downloads: many files and many byte ranges of each at once.

boto3's `download_file` fetches one file at a time (ranges of that file in parallel) and does not verify ranged
downloads; a model is a dozen shards plus small files, so here one worker pool takes chunks of every file, and every
file is checked before it gets its final name. A multipart object is fetched part by part (GET ?partNumber=n), which
lets each part be verified on its own:
  * objects with an S3 additional checksum (CRC32, SHA1, SHA256; what current SDKs and MinIO store) come with each
    part's checksum, which this module checks while the part streams (a mismatch fetches the part again); the
    parts' checksums must then combine into the object's composite checksum. Where the store lists the parts' sizes
    and checksums (GetObjectAttributes, one call per 1,000 parts), several parts are fetched in one ranged GET of up
    to _SPAN bytes and each is checked at its boundary: a GET costs botocore about 1 ms of CPU and the server about
    as much, which for 8 MiB parts (boto3's and the AWS CLI's default) was a tenth of the CPU a pull used. A large
    single-part object is checked against its full-object checksum after the download;
  * otherwise the MD5 ETag: each part's MD5 while it streams, combined into "<md5 of the part MD5s>-<parts>".
CRC32 is computed by zlib-ng (vectorised, ~16 GB/s here) rather than by botocore, whose `binascii.crc32` (zlib
1.2.13, 2-4 GB/s) cost a third of the client's CPU on a 2-core machine (docs/benchmarks.md, S3 section); botocore
is only asked for the checksum headers (`x-amz-checksum-mode`), not to validate them.
Every finished chunk is recorded next to the partial file (`<name>.part.state`), so a restarted Pod continues where
the last one stopped. A finished file is fsynced before it takes its final name when `durable` (the default; the
operator turns it off for an emptyDir cache, which does not outlive its node, so a crash cannot leave a torn file
there for a later Pod to trust).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zlib_ng.zlib_ng import crc32

from finetune_trainer.errors import TrainerError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-(\d+))?$")
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
# Read from the socket in pieces this size, each checked and written while it is still in the CPU's cache: 512 KiB
# used 0.9 client CPU s/GiB pulling from MinIO on the 2-core development machine, 1 MiB reads 1.0, 64 KiB 1.4
# (more pieces, more GIL hand-offs between the 16 threads).
_READ = 512 * 1024
# Each read goes to the file in writes of this size. With 16 threads on one file, 1 MiB buffered writes (one copy
# into the page cache under the inode lock each) kept the other writers spinning on that lock: pulling 2 GiB from
# MinIO on the 2-core development machine took 1.9 client CPU s/GiB with 1 MiB writes and 1.2 with 256 KiB ones
# (coreutils' buffer size; 64 KiB and 512 KiB did worse), 1.4x faster (docs/benchmarks.md, S3 section).
_WRITE = 256 * 1024
_ATTEMPTS = 5
# Consecutive parts of a multipart object fetched in one ranged GET, up to this many bytes (s5cmd fetches 50 MiB).
_SPAN = 64 * MiB
_PARTS_PER_CALL = 1000  # GetObjectAttributes lists at most 1,000 parts per call
# Checksums whose combination this module can compute without extra packages (CRC32C/CRC64NVME need awscrt).
_ALGORITHMS = ("CRC32", "SHA256", "SHA1")


class TransferError(TrainerError):
    """A download failed or did not verify; the message names the object."""

    reason = "StorageError"


@dataclass
class Transfer:
    """One object to fetch into `dest`."""

    bucket: str
    key: str
    dest: Path
    size: int
    etag: str | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass
class _Chunk:
    index: int  # 0-based; part number index+1 in parts mode
    start: int = 0  # byte range in ranges and spans mode
    end: int = 0
    parts: tuple[tuple[int, str], ...] = ()  # spans mode: each part's size and checksum


@dataclass
class _FileState:
    transfer: Transfer
    mode: str  # "parts" | "spans" (ranged GETs of several parts) | "ranges" (ranged GETs) | "whole" (one GET)
    chunks: list[_Chunk]
    checksum: tuple[str, str, str] | None = None  # (algorithm, type COMPOSITE|FULL_OBJECT, base64 value)
    fd: int = -1
    done: dict[int, dict[str, str]] = field(default_factory=dict)  # chunk -> {"md5": hex} and/or {"ck": b64}
    lock: threading.Lock = field(default_factory=threading.Lock)
    state_path: Path = Path()
    part_path: Path = Path()
    finished: bool = False

    def header(self, chunk_size: int) -> dict[str, Any]:
        return {
            "etag": self.transfer.etag,
            "size": self.transfer.size,
            "mode": self.mode,
            "chunk": chunk_size,
            "checksum": list(self.checksum) if self.checksum else None,
        }


class _Progress:
    """Bytes done across all files, logged every few seconds while a large download runs."""

    def __init__(self, label: str, total: int, already: int, every: float) -> None:
        self.label, self.total, self.done, self.every = label, total, already, every
        self.started = time.monotonic()
        self.fetched = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="download-progress", daemon=True)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            self.fetched += n

    def start(self) -> None:
        if self.total >= 64 * MiB and self.every > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def line(self) -> str:
        elapsed = max(1e-6, time.monotonic() - self.started)
        rate = self.fetched / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"downloading {self.label}: {self.done / MiB:.0f}/{self.total / MiB:.0f} MiB ({pct:.0f}%), "
            f"{rate / MiB:.0f} MiB/s, ETA {eta:.0f}s"
        )

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            log.info(self.line())


class RangedDownloader:
    """Fetch many S3 objects with one pool of `workers` threads, in chunks of `chunk_size` (or the upload's parts)."""

    def __init__(
        self,
        client: Any,
        *,
        workers: int = 16,
        chunk_size: int = 16 * MiB,
        progress_every: float = 10.0,
        on_chunk: Callable[[Transfer, int], None] | None = None,
        verify: bool = True,
        durable: bool = True,
    ) -> None:
        self.client = client
        self.verify = verify  # False: sizes only (the benchmark uses it to show what verification costs)
        self.durable = durable  # fsync each file before its rename
        if verify:
            ask_for_checksums(client)
        self.workers = max(1, workers)
        self.chunk_size = max(MiB, chunk_size)
        self.progress_every = progress_every
        self._on_chunk = on_chunk  # test hook: called after each chunk is recorded
        self._failed = threading.Event()

    def run(self, transfers: list[Transfer], label: str = "") -> None:
        """Download every transfer; files already at their final path with the right size are kept."""
        started = time.monotonic()
        states = [s for s in (self._prepare(t) for t in transfers) if s is not None]
        total = sum(t.size for t in transfers)
        already = total - sum(s.transfer.size for s in states)
        already += sum(self._chunk_bytes(s, i) for s in states for i in s.done)
        progress = _Progress(label or (transfers[0].uri if transfers else ""), total, already, self.progress_every)
        progress.start()
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="s3-get") as pool:
                futures: list[Future[None]] = []
                for state in states:
                    pending = [c for c in state.chunks if c.index not in state.done]
                    if not pending:
                        self._finish(state)
                        continue
                    futures += [pool.submit(self._fetch, state, c, progress) for c in pending]
                finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
                errors = [f.exception() for f in finished if f.exception() is not None]
                if errors:
                    self._failed.set()
                    for future in futures:
                        future.cancel()
                    raise errors[0]  # type: ignore[misc]
        finally:
            progress.stop()
            for state in states:
                if state.fd >= 0:
                    os.close(state.fd)
                    state.fd = -1
        elapsed = time.monotonic() - started
        if progress.fetched:
            log.info(
                "downloaded %s: %.1f MiB of %.1f MiB fetched in %.1fs (%.0f MiB/s), %d file(s)",
                label,
                progress.fetched / MiB,
                total / MiB,
                elapsed,
                progress.fetched / MiB / max(elapsed, 1e-6),
                len(transfers),
            )

    # -- planning ----------------------------------------------------------------------------------------------

    def _prepare(self, transfer: Transfer) -> _FileState | None:
        dest = transfer.dest
        if dest.is_file() and dest.stat().st_size == transfer.size:
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        match = _MD5_ETAG.match((transfer.etag or "").lower())
        parts = int(match.group(2)) if match and match.group(2) else 0
        size, step = transfer.size, self.chunk_size
        checksum = None
        if parts > 0:
            mode, chunks = "parts", [_Chunk(i) for i in range(parts)]
            if self.verify:
                # The part list carries the object's checksum too; only where the store refuses it, a HEAD.
                listing = self._part_list(transfer, parts)
                checksum, spans = listing or (self._object_checksum(transfer, "COMPOSITE"), None)
                if spans:
                    mode, chunks, step = "spans", spans, _SPAN
        elif size <= step:
            mode, chunks = "whole", [_Chunk(0, 0, size - 1)] if size else []
        else:
            mode = "ranges"
            chunks = [_Chunk(i, s, min(s + step, size) - 1) for i, s in enumerate(range(0, size, step))]
            checksum = self._object_checksum(transfer, "FULL_OBJECT") if self.verify else None
        state = _FileState(transfer, mode, chunks, checksum)
        state.part_path = dest.with_name(dest.name + ".part")
        state.state_path = dest.with_name(dest.name + ".part.state")
        header = state.header(step)
        if state.part_path.is_file() and state.state_path.is_file():
            state.done = self._read_state(state.state_path, header)
        if not state.done:
            with open(state.part_path, "wb") as handle:
                handle.truncate(transfer.size)
            state.state_path.write_text(json.dumps(header) + "\n")
        else:
            log.info("resuming %s: %d of %d chunk(s) already here", transfer.uri, len(state.done), len(chunks))
        state.fd = os.open(state.part_path, os.O_RDWR)
        return state

    def _object_checksum(self, transfer: Transfer, kind: str) -> tuple[str, str, str] | None:
        """The object's additional checksum of type `kind` (COMPOSITE for multipart uploads, FULL_OBJECT for one
        PUT) in an algorithm this module can check, from one HEAD request; None when there is none."""
        try:
            head = self.client.head_object(Bucket=transfer.bucket, Key=transfer.key, ChecksumMode="ENABLED")
        except Exception as exc:
            raise TransferError(f"cannot read the metadata of {transfer.uri}: {exc}") from exc
        found_type = str(head.get("ChecksumType") or ("COMPOSITE" if transfer.etag and "-" in transfer.etag else ""))
        return _pick_checksum(head, found_type, kind)

    def _part_list(
        self, transfer: Transfer, count: int
    ) -> tuple[tuple[str, str, str] | None, list[_Chunk] | None] | None:
        """A multipart object's composite checksum and its parts grouped into ranges of up to _SPAN bytes (each part
        with its size and checksum), from GetObjectAttributes. None where the store does not answer it (no
        permission for it, an older server); the ranges are None where the list does not add up to the object,
        which is then fetched part by part."""
        listed: list[tuple[int, str]] = []
        checksum: tuple[str, str, str] | None = None
        marker = 0
        try:
            while True:
                page = {"PartNumberMarker": marker} if marker else {}
                reply = self.client.get_object_attributes(
                    Bucket=transfer.bucket,
                    Key=transfer.key,
                    ObjectAttributes=["ETag", "Checksum", "ObjectParts"],
                    MaxParts=_PARTS_PER_CALL,
                    **page,
                )
                if transfer.etag and str(reply.get("ETag", "")).strip('"') != transfer.etag:
                    return None  # another version than the one listed: the GETs' If-Match will say so
                if checksum is None:
                    whole = reply.get("Checksum") or {}
                    checksum = _pick_checksum(whole, str(whole.get("ChecksumType") or "COMPOSITE"), "COMPOSITE")
                    if checksum is None:
                        return None, None  # no additional checksum: each part's MD5 serves for the ETag
                found = reply.get("ObjectParts") or {}
                listed += [
                    (int(p.get("Size", -1)), str(p.get(f"Checksum{checksum[0]}") or ""))
                    for p in found.get("Parts") or []
                ]
                if not found.get("IsTruncated"):
                    break
                marker = int(found["NextPartNumberMarker"])
        except Exception as exc:
            log.debug("%s: no part list (%s); fetching it part by part", transfer.uri, exc)
            return None
        algorithm, _, expected = checksum
        sizes_add_up = len(listed) == count and sum(size for size, _ in listed) == transfer.size
        if not sizes_add_up or not all(size > 0 and ck and "-" not in ck for size, ck in listed):
            return checksum, None
        if _digest(algorithm, b"".join(base64.b64decode(ck) for _, ck in listed)) != expected:
            return checksum, None  # a list that does not give the object's checksum is not used to check it
        spans: list[_Chunk] = []
        group: list[tuple[int, str]] = []
        start = held = 0
        for size, ck in listed:
            if group and held + size > _SPAN:
                spans.append(_Chunk(len(spans), start, start + held - 1, tuple(group)))
                start, group, held = start + held, [], 0
            group.append((size, ck))
            held += size
        spans.append(_Chunk(len(spans), start, start + held - 1, tuple(group)))
        return checksum, spans

    @staticmethod
    def _read_state(path: Path, header: dict[str, Any]) -> dict[int, dict[str, str]]:
        lines = path.read_text().splitlines()
        try:
            if not lines or json.loads(lines[0]) != header:
                return {}  # another object version or another chunking: start over
            done = {}
            for line in lines[1:]:
                record = json.loads(line)
                done[int(record.pop("i"))] = {str(k): str(v) for k, v in record.items()}
            return done
        except (ValueError, KeyError, TypeError):
            return {}  # a torn last line: start the file over rather than trust it

    def _chunk_bytes(self, state: _FileState, index: int) -> int:
        if state.mode != "parts":
            chunk = state.chunks[index]
            return chunk.end - chunk.start + 1
        return state.transfer.size // max(1, len(state.chunks))

    # -- fetching ----------------------------------------------------------------------------------------------

    def _fetch(self, state: _FileState, chunk: _Chunk, progress: _Progress) -> None:
        transfer = state.transfer
        for attempt in range(1, _ATTEMPTS + 1):
            if self._failed.is_set():
                return
            written = 0
            try:
                args: dict[str, Any] = {"Bucket": transfer.bucket, "Key": transfer.key}
                if transfer.etag:
                    args["IfMatch"] = f'"{transfer.etag}"'
                if state.mode == "parts":
                    args["PartNumber"] = chunk.index + 1
                elif state.mode in ("ranges", "spans"):
                    args["Range"] = f"bytes={chunk.start}-{chunk.end}"
                response = self.client.get_object(**args)
                offset = chunk.start
                if state.mode == "parts":
                    match = _RANGE.match(str(response.get("ContentRange", "")))
                    if match is None:
                        raise TransferError(f"{transfer.uri}: part {chunk.index + 1} came without a Content-Range")
                    offset = int(match.group(1))
                # A part or whole object carries its own checksum header, checked while the body streams; only
                # without one is its MD5 needed (for the ETag). A span checks each of its parts.
                check: _StreamCheck | _SpanCheck | None = None
                if self.verify and state.mode == "spans":
                    assert state.checksum is not None
                    check = _SpanCheck(state.checksum[0], chunk.parts)
                elif self.verify and state.mode != "ranges":
                    check = _StreamCheck.of(response, state)
                body = response["Body"]
                while True:
                    data = body.read(_READ)
                    if not data:
                        break
                    if check is not None:
                        check.update(data)
                    _pwrite_all(state.fd, data, offset + written)
                    written += len(data)
                    progress.add(len(data))
                expected = int(response.get("ContentLength", written))
                if written != expected:
                    raise TransferError(f"{transfer.uri}: got {written} of {expected} bytes")
                record = check.result(f"{transfer.uri} chunk {chunk.index}") if check is not None else {}
            except Exception as exc:
                progress.add(-written)
                code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
                if code in ("PreconditionFailed", "412"):
                    raise TransferError(f"{transfer.uri} changed while it was being downloaded; retry the run") from exc
                if code in ("AccessDenied", "NoSuchKey", "NoSuchBucket", "InvalidAccessKeyId") or attempt == _ATTEMPTS:
                    raise TransferError(f"cannot download {transfer.uri}: {exc}") from exc
                log.warning("download of %s chunk %d failed (%s); retrying", transfer.uri, chunk.index, exc)
                time.sleep(min(10.0, 0.5 * 2**attempt))
                continue
            # Outside the retry: recording (and verifying the finished file) is not a network problem to retry.
            self._record(state, chunk.index, record)
            return

    def _record(self, state: _FileState, index: int, record: dict[str, str]) -> None:
        with state.lock:
            state.done[index] = record
            with open(state.state_path, "a") as handle:
                handle.write(json.dumps({"i": index, **record}) + "\n")
            complete = len(state.done) == len(state.chunks)
        if self._on_chunk is not None:
            self._on_chunk(state.transfer, index)
        if complete:
            self._finish(state)

    def _finish(self, state: _FileState) -> None:
        with state.lock:
            if state.finished:
                return
            state.finished = True
        transfer = state.transfer
        problem = self._verify(state)
        if problem:
            state.part_path.unlink(missing_ok=True)
            state.state_path.unlink(missing_ok=True)
            raise TransferError(f"{transfer.uri} did not verify: {problem}")
        if self.durable:
            os.fsync(state.fd)
        os.replace(state.part_path, transfer.dest)
        state.state_path.unlink(missing_ok=True)

    # -- verification ------------------------------------------------------------------------------------------

    def _verify(self, state: _FileState) -> str | None:
        transfer = state.transfer
        size = os.fstat(state.fd).st_size
        if size != transfer.size:
            return f"size {size}, expected {transfer.size}"
        if not self.verify:
            return None
        records = [state.done.get(i, {}) for i in range(len(state.chunks))]
        if state.checksum is not None:
            algorithm, kind, expected = state.checksum
            if kind == "COMPOSITE" and all("ck" in r for r in records):
                parts = [ck for r in records for ck in r["ck"].split()]  # a span records its parts' checksums
                got = _digest(algorithm, b"".join(base64.b64decode(ck) for ck in parts))
                return None if got == expected else f"{algorithm} {expected}-{len(parts)}, parts give {got}"
            if kind == "FULL_OBJECT":
                got = _file_digest(algorithm, state.part_path)
                return None if got == expected else f"{algorithm} {expected}, content gives {got}"
        if state.mode == "whole" and records and "ck" in records[0]:
            return None  # checked against the object's own checksum while it streamed
        etag = (transfer.etag or "").lower()
        match = _MD5_ETAG.match(etag)
        if not match:
            return None  # neither an additional checksum nor an MD5 ETag (e.g. some encrypted objects): size only
        if state.mode == "parts":
            if not all("md5" in r for r in records):
                log.warning("%s: parts came with mixed checksums; checked the size only", transfer.uri)
                return None
            joined = b"".join(bytes.fromhex(r["md5"]) for r in records)
            got = f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(records)}"
        elif state.mode == "whole":
            got = records[0]["md5"] if records else hashlib.md5(b"", usedforsecurity=False).hexdigest()
        else:
            got = _file_md5(state.part_path)
        if got == etag:
            return None
        if self._encrypted(transfer):
            log.warning("%s: ETag is not an MD5 of the content (encrypted object); checked the size only", transfer.uri)
            return None
        return f"ETag {etag}, content gives {got}"

    def _encrypted(self, transfer: Transfer) -> bool:
        try:
            head = self.client.head_object(Bucket=transfer.bucket, Key=transfer.key)
        except Exception:
            return False
        return head.get("ServerSideEncryption") == "aws:kms" or bool(head.get("SSECustomerAlgorithm"))


def _pick_checksum(found: dict[str, Any], found_type: str, kind: str) -> tuple[str, str, str] | None:
    """(algorithm, kind, base64 value) of the first checksum in `found` this module can check, when it is of type
    `kind`; a composite value's "-<parts>" suffix is left off."""
    if found_type != kind:
        return None
    for algorithm in _ALGORITHMS:
        if value := found.get(f"Checksum{algorithm}"):
            return algorithm, kind, str(value).split("-")[0]
    return None


def ask_for_checksums(client: Any) -> None:
    """Have `client` ask S3 for the checksum headers of every GetObject (`x-amz-checksum-mode: ENABLED`) without
    passing ChecksumMode, which would also make botocore validate them with its slower CRC32 (a client made with
    response_checksum_validation="when_supported", boto3's default, validates them all the same)."""

    def add_header(request: Any, **kwargs: Any) -> None:
        if "x-amz-checksum-mode" not in request.headers:  # a second copy (ChecksumMode given) breaks the signature
            request.headers["x-amz-checksum-mode"] = "ENABLED"

    client.meta.events.register("before-sign.s3.GetObject", add_header, unique_id="finetune-trainer-checksum-mode")


class _StreamCheck:
    """The checksum of one streamed part or whole object: the S3 additional checksum it came with, else its MD5."""

    def __init__(self, algorithm: str | None, expected: str | None) -> None:
        self.algorithm, self.expected = algorithm, expected
        self.crc = 0
        self.digest = None if algorithm == "CRC32" else hashlib.new((algorithm or "md5").lower())

    @classmethod
    def of(cls, response: dict[str, Any], state: _FileState) -> _StreamCheck:
        wanted = [state.checksum[0]] if state.checksum else list(_ALGORITHMS) if state.mode == "whole" else []
        for algorithm in wanted:
            value = response.get(f"Checksum{algorithm}")
            # "<value>-<parts>" is the composite of a whole multipart object, not this body's own checksum.
            if value and "-" not in str(value):
                return cls(algorithm, str(value))
        return cls(None, None)

    def update(self, data: bytes | memoryview) -> None:
        if self.digest is None:
            self.crc = crc32(data, self.crc)
        else:
            self.digest.update(data)

    def result(self, what: str) -> dict[str, str]:
        """The record of a checked chunk ({"ck": base64} or {"md5": hex}); raises when the body did not match."""
        if self.algorithm is None:
            assert self.digest is not None
            return {"md5": self.digest.hexdigest()}
        raw = self.crc.to_bytes(4, "big") if self.digest is None else self.digest.digest()
        got = base64.b64encode(raw).decode()
        if got != self.expected:
            raise TransferError(f"{what}: {self.algorithm} {self.expected} expected, the bytes give {got}")
        return {"ck": got}


class _SpanCheck:
    """The checksums of the consecutive parts one ranged GET streams, each checked where the part ends."""

    def __init__(self, algorithm: str, parts: tuple[tuple[int, str], ...]) -> None:
        self.algorithm, self.parts = algorithm, parts
        self.index, self.left = 0, parts[0][0]
        self.current = _StreamCheck(algorithm, parts[0][1])
        self.done: list[str] = []

    def update(self, data: bytes) -> None:
        view, at = memoryview(data), 0
        while at < len(view):
            if self.index == len(self.parts):
                raise TransferError(f"{len(view) - at} byte(s) past the last of {len(self.parts)} part(s)")
            n = min(self.left, len(view) - at)
            self.current.update(view[at : at + n])
            at, self.left = at + n, self.left - n
            if self.left == 0:
                self.done.append(self.current.result(f"part {self.index + 1} of the span")["ck"])
                self.index += 1
                if self.index < len(self.parts):
                    self.left, self.current = (
                        self.parts[self.index][0],
                        _StreamCheck(self.algorithm, self.parts[self.index][1]),
                    )

    def result(self, what: str) -> dict[str, str]:
        if self.index != len(self.parts):
            raise TransferError(f"{what}: the body ended inside part {self.index + 1} of {len(self.parts)}")
        return {"ck": " ".join(self.done)}


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset`, in pieces of _WRITE bytes (a short write continues where it stopped)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done : done + _WRITE], offset + done)
        if n <= 0:
            raise OSError(f"write at offset {offset + done} wrote nothing")
        done += n


def crc32_checksum(crc: int) -> str:
    """A CRC32 in the form S3 sends and keeps it (`x-amz-checksum-crc32`: base64 of its four big-endian bytes)."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def _digest(algorithm: str, data: bytes) -> str:
    if algorithm == "CRC32":
        return crc32_checksum(crc32(data))
    return base64.b64encode(hashlib.new(algorithm.lower(), data).digest()).decode()


def _file_digest(algorithm: str, path: Path) -> str:
    crc, digest = 0, hashlib.new(algorithm.lower()) if algorithm != "CRC32" else None
    with open(path, "rb") as handle:
        while block := handle.read(8 * MiB):
            if digest is None:
                crc = crc32(block, crc)
            else:
                digest.update(block)
    raw = crc.to_bytes(4, "big") if digest is None else digest.digest()
    return base64.b64encode(raw).decode()


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(8 * MiB):
            digest.update(block)
    return digest.hexdigest()
