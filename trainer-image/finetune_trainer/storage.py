"""Where models, data, checkpoints and outputs live: one small interface over S3 and local paths.

URIs:
    s3://bucket/key          S3-compatible storage (endpoint, region and addressing style from StorageSpec;
                             keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)
    pvc://claim/path         a PersistentVolumeClaim that the workload mounts at /mnt/pvc/<claim>
                             (FTJ_PVC_ROOT overrides /mnt/pvc)
    file:///abs/path         a local path
The schemes, and which handler here serves each, are the table in finetune_trainer.schemes; hf:// sources are
read-only and are fetched by the node cache (cache.py), not here.
A URI ending in "/" (or naming no single object) is a prefix: listing and downloading take every object under it.
Every error names the URI it is about.
"""

from __future__ import annotations

import base64
import functools
import glob
import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from finetune_trainer import schemes
from finetune_trainer.config import StorageSpec
from finetune_trainer.errors import TrainerError

log = logging.getLogger(__name__)


PARTIAL_SUFFIX = ".partial"  # the temporary files a write fills before their rename: ".<name>.<random>.partial"


def temporary_beside(dest: Path) -> tuple[int, Path]:
    """A new temporary file in `dest`'s directory (created if missing), named so that `LocalStorage.abort_incomplete`
    recognises it should its writer die before the rename: its descriptor and path."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=PARTIAL_SUFFIX)
    return fd, Path(name)


def replace_atomically(dest: Path, write: Callable[[Path], object], *, durable: bool = False) -> None:
    """Fill a temporary file beside `dest` with `write`, then rename it over `dest`: a reader sees the old file or
    the whole new one, never half of it, and a failed write leaves no temporary file behind. `durable`: the file
    is fsynced before the rename, so not even a crash of the machine leaves `dest` torn."""
    fd, tmp = temporary_beside(dest)
    os.close(fd)
    try:
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class StorageError(TrainerError):
    """Reading or writing a storage URI failed; the message names the URI."""

    reason = "StorageError"


@dataclass(frozen=True)
class ObjectInfo:
    """One object under a listed URI: its path relative to that URI ("" when the URI is the object itself)."""

    key: str
    size: int
    etag: str | None = None


@dataclass(frozen=True)
class Uri:
    scheme: str
    root: str  # the first path segment (bucket, claim, hf owner), or "" for a scheme without one (file://)
    path: str  # key inside the bucket/claim, or the absolute path for file://

    @classmethod
    def parse(cls, uri: str) -> Uri:
        scheme, _, rest = uri.partition("://")
        entry = schemes.scheme_of(uri)
        if entry is None:
            # The schemes this module opens first, then the read-only ones.
            names = [s.prefix for s in schemes.REGISTRY if s.handler in _OPENERS]
            names += [s.prefix for s in schemes.REGISTRY if s.handler not in _OPENERS]
            raise StorageError(f"unsupported storage URI {uri!r}: expected {', '.join(names[:-1])} or {names[-1]}")
        if not entry.rooted:
            if not rest.startswith("/"):
                raise StorageError(f"{scheme} URI must hold an absolute path ({scheme}:///...), got {uri!r}")
            return cls(scheme, "", rest)
        root, _, path = rest.partition("/")
        if not root:
            roots = "/".join(s.parts[0] for s in schemes.REGISTRY if s.rooted)
            raise StorageError(f"storage URI {uri!r} has no {roots} name")
        return cls(scheme, root, path)

    @property
    def entry(self) -> schemes.Scheme:
        """This URI's scheme in the registry."""
        return schemes.BY_NAME[self.scheme]

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        return f"{self.scheme}://{self.root}/{self.path}"


def join_uri(base: str, *parts: str) -> str:
    """base + "/" + parts, with exactly one slash between; a trailing slash on the last part is kept."""
    out = base
    for part in parts:
        if not part:
            continue
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


def as_prefix(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


# The storage classes have a method named `list`; annotations inside them use this alias for the builtin.
ObjectList = list[ObjectInfo]
FileList = list[dict[str, Any]]  # path, size and sha256 of each file, as checkpoint and output records list them


class ObjectWriter(ABC):
    """One object written into storage as it is produced: `write()` takes bytes-like pieces of any size (torch.save
    streams into it), `commit()` makes the object appear at `uri` in one piece and returns the record's fields for
    it (size and sha256, computed on the way), `abort()` leaves nothing behind, and whatever was at `uri` before
    stays until a commit replaces it. Errors are StorageErrors that name the URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.size = 0
        self._sha256 = hashlib.sha256()

    @abstractmethod
    def write(self, data: Any) -> int: ...

    def flush(self) -> None:  # noqa: B027 (torch.save calls it; the bytes are in the object once commit() returns)
        """Nothing to do before `commit()`."""

    @abstractmethod
    def commit(self) -> dict[str, Any]: ...

    @abstractmethod
    def abort(self) -> None: ...

    def _entry(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self._sha256.hexdigest()}


class Storage(ABC):
    """What the trainer needs from a storage backend. Paths inside a prefix always use "/"."""

    @abstractmethod
    def list(self, uri: str) -> ObjectList:
        """Objects under `uri` (recursively) or the single object `uri` names; [] when there is nothing."""

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes | None:
        """A small object's content, or None when it does not exist."""

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a small object in one piece (readers see the old or the new content, never a part)."""

    @abstractmethod
    def upload_file(
        self,
        path: Path,
        uri: str,
        *,
        sha256: str | None = None,
        crc32: int | None = None,
        part_crc32s: Sequence[int] = (),
    ) -> None:
        """Copy one local file to `uri`. `sha256` (hex) and `crc32`: the file's digests where the caller has
        computed them; a store that can check the bytes it receives does so against the CRC32 where given (cheaper
        for it, and for every later download), else against the sha256, and refuses bytes that differ.
        `part_crc32s`: the CRC32 of each `part_size_for(size)` slice, for a file this store receives in parts."""

    @abstractmethod
    def open_writer(self, uri: str) -> ObjectWriter:
        """A new object at `uri` written as it is produced (`torch.save(obj, writer)`), without a local file:
        see ObjectWriter."""

    def part_size_for(self, size: int) -> int | None:
        """The size of the parts a file of `size` bytes is sent in, where it is sent in parts (else None): the
        caller reads each part's CRC32 with the file's other digests."""
        return None

    @abstractmethod
    def delete_prefix(self, uri: str) -> int:
        """Delete every object under the prefix `uri`; return how many were deleted."""

    @abstractmethod
    def abort_incomplete(self, uri: str) -> int:
        """Remove what writes of the object `uri`, or under the prefix `uri` (ending in "/"), left unfinished:
        S3 multipart uploads never completed nor aborted (a process killed while it sent a file in parts: no
        listing of objects shows them, yet the store keeps and bills their parts), a local writer's temporary
        files. Only for a moment when no write there is under way (a live one would fail). Returns how many were
        removed. MinIO lists the uploads of one object only (a prefix finds none there); it expires unfinished
        uploads itself (`api stale_uploads_expiry`, 24 h by default)."""

    @abstractmethod
    def delete(self, uri: str) -> bool:
        """Delete the one object at `uri` (not a prefix); return whether it existed."""

    @abstractmethod
    def download(self, uri: str, dest: Path, objects: ObjectList | None = None, *, durable: bool = True) -> ObjectList:
        """Copy the object or every object under the prefix `uri` into the directory `dest` (keys become relative
        paths; a single object keeps its base name). Files already complete in `dest` are kept. `durable`: each
        file is on disk (fsynced) before it takes its name, for a `dest` that outlives its node. Returns what was
        listed."""

    def local_path(self, uri: str) -> Path | None:
        """The file-system path of `uri` when this storage is a local one (no copy needed), else None."""
        return None

    def exists(self, uri: str) -> bool:
        return bool(self.list(uri))

    def upload_dir(self, src: Path, uri: str, files: Iterable[str] | None = None, *, workers: int = 4) -> FileList:
        """Upload every file under `src` (or just `files`, relative paths) to the prefix `uri`, `workers` files at a
        time (largest first). Each file is hashed just before it is sent and its digests go with it (see
        `upload_file`), so one read serves both the record (sha256) and the store's check (CRC32). Returns each
        file's path, size and sha256, in path order: the record checkpoints and outputs list (checkpoints.py)."""
        names = sorted(files) if files is not None else _files_under(src)
        sizes = {name: (src / name).stat().st_size for name in names}

        def send(name: str) -> str:
            digest = digest_file(src / name, part_size=self.part_size_for(sizes[name]))
            self.upload_file(
                src / name,
                join_uri(uri, name),
                sha256=digest.sha256,
                crc32=digest.crc32,
                part_crc32s=digest.part_crc32s,
            )
            return digest.sha256

        largest_first = sorted(names, key=lambda n: -sizes[n])
        with ThreadPoolExecutor(workers) as pool:
            digests = dict(zip(largest_first, pool.map(send, largest_first), strict=True))
        return [{"path": name, "size": sizes[name], "sha256": digests[name]} for name in names]


_BLOCK = 8 * 1024 * 1024
PART_SIZE = 64 * 1024 * 1024  # multipart uploads: few parts for multi-GB checkpoint files, fetched part by part later


def _blocks(path: Path) -> Iterator[bytes]:
    """A file's content, _BLOCK bytes at a time."""
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            yield block


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file (hashlib releases the GIL: threads hash in parallel)."""
    digest = hashlib.sha256()
    for block in _blocks(path):
        digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileDigest:
    sha256: str  # hex: what checkpoint and output records list
    crc32: int  # what the store checks an upload against (zlib-ng computes a CRC32 ~14x faster than a SHA-256 here)
    part_crc32s: tuple[int, ...] = ()  # the CRC32 of each part, for a file sent in parts


def digest_file(path: Path, *, part_size: int | None = None) -> FileDigest:
    """A file's SHA-256 and CRC32 from one read (zlib-ng's vectorised CRC32 adds ~7% to the SHA-256's CPU; both
    release the GIL), and with `part_size` (a multiple of 8 MiB) the CRC32 of each part of that size too."""
    from zlib_ng.zlib_ng import crc32

    if part_size is not None and (part_size <= 0 or part_size % _BLOCK):
        raise ValueError(f"part_size {part_size} is not a positive multiple of {_BLOCK}")
    sha, crc, parts, part_crc, part_filled = hashlib.sha256(), 0, [], 0, 0
    for block in _blocks(path):
        sha.update(block)
        crc = crc32(block, crc)
        if part_size is not None:
            part_crc, part_filled = crc32(block, part_crc), part_filled + len(block)
            if part_filled == part_size:
                parts.append(part_crc)
                part_crc, part_filled = 0, 0
    if part_filled:
        parts.append(part_crc)
    return FileDigest(sha.hexdigest(), crc, tuple(parts))


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# --- local (file:// and pvc://) ---------------------------------------------------------------------------------


class LocalStorage(Storage):
    """The schemes that name a path in the Pod: file:// and pvc://<claim>/<path> (mounted at /mnt/pvc/<claim>)."""

    def path(self, uri: str) -> Path:
        parsed = Uri.parse(uri)
        if parsed.entry.local_path is None:
            local = " or ".join(sorted(s.prefix for s in schemes.REGISTRY if s.is_local))
            raise StorageError(f"{uri!r} is not a local URI ({local})")
        return parsed.entry.local_path(parsed.root, parsed.path)

    def local_path(self, uri: str) -> Path | None:
        return self.path(uri)

    def list(self, uri: str) -> ObjectList:
        path = self.path(uri)
        if path.is_file() and not uri.endswith("/"):
            return [ObjectInfo("", path.stat().st_size)]
        if not path.is_dir():
            return []
        return [ObjectInfo(name, (path / name).stat().st_size) for name in _files_under(path)]

    def read_bytes(self, uri: str) -> bytes | None:
        path = self.path(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc}") from exc

    def write_bytes(self, uri: str, data: bytes) -> None:
        try:
            replace_atomically(self.path(uri), lambda tmp: tmp.write_bytes(data))
        except OSError as exc:
            raise StorageError(f"cannot write {uri}: {exc}") from exc

    def upload_file(
        self,
        path: Path,
        uri: str,
        *,
        sha256: str | None = None,
        crc32: int | None = None,
        part_crc32s: Sequence[int] = (),
    ) -> None:
        try:  # a local copy crosses no network: the digests are not checked again
            replace_atomically(self.path(uri), lambda tmp: shutil.copyfile(path, tmp))
        except OSError as exc:
            raise StorageError(f"cannot upload {path} to {uri}: {exc}") from exc

    def open_writer(self, uri: str) -> ObjectWriter:
        return _LocalWriter(uri, self.path(uri))

    def delete_prefix(self, uri: str) -> int:
        path = self.path(uri)
        if not path.exists():
            return 0
        count = len(_files_under(path)) if path.is_dir() else 1
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as exc:
            raise StorageError(f"cannot delete {uri}: {exc}") from exc
        return count

    def abort_incomplete(self, uri: str) -> int:
        path = self.path(uri)
        if path.is_dir():
            left = [p for p in path.rglob(f".*{PARTIAL_SUFFIX}") if p.is_file()]
        else:  # the object `uri`: the temporary files beside it (see temporary_beside)
            left = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*{PARTIAL_SUFFIX}") if p.is_file()]
        try:
            for leftover in left:
                leftover.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete the unfinished writes under {uri}: {exc}") from exc
        return len(left)

    def delete(self, uri: str) -> bool:
        path = self.path(uri)
        if not path.is_file():
            return False
        try:
            path.unlink()
        except OSError as exc:
            raise StorageError(f"cannot delete {uri}: {exc}") from exc
        return True

    def download(self, uri: str, dest: Path, objects: ObjectList | None = None, *, durable: bool = True) -> ObjectList:
        src = self.path(uri)
        listed = objects if objects is not None else self.list(uri)
        if not listed:
            raise StorageError(f"nothing found at {uri}")
        for obj in listed:
            source = src / obj.key if obj.key else src
            target = dest / (obj.key or src.name)
            if target.is_file() and target.stat().st_size == obj.size:
                continue
            replace_atomically(target, functools.partial(shutil.copyfile, source), durable=durable)
        return listed


class _LocalWriter(ObjectWriter):
    """Writes a temporary file beside the destination and renames it over the destination at commit."""

    def __init__(self, uri: str, dest: Path) -> None:
        super().__init__(uri)
        self._dest = dest
        try:
            fd, self._tmp = temporary_beside(dest)
        except OSError as exc:
            raise StorageError(f"cannot write {uri}: {exc}") from exc
        self._file = os.fdopen(fd, "wb")

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            self._file.write(view)
        except OSError as exc:
            raise StorageError(f"cannot write {self.uri}: {exc}") from exc
        self._sha256.update(view)
        self.size += len(view)
        return len(view)

    def commit(self) -> dict[str, Any]:
        try:
            self._file.close()
            os.replace(self._tmp, self._dest)
        except OSError as exc:
            self.abort()
            raise StorageError(f"cannot write {self.uri}: {exc}") from exc
        return self._entry()

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


# --- S3 ---------------------------------------------------------------------------------------------------------


def s3_client(spec: StorageSpec, *, max_connections: int = 32, sign_payload: bool = True) -> Any:
    """A boto3 S3 client for `spec`: endpoint, region and addressing style from the spec, keys from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; without them boto3's default chain, e.g. IRSA web identity).
    `sign_payload=False`: request bodies are not hashed into the signature, even over plain HTTP (botocore's
    default there); only for requests whose body a signed checksum header covers instead."""
    import boto3
    from botocore.config import Config

    key_id = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    session = boto3.session.Session(
        aws_access_key_id=key_id or None,
        aws_secret_access_key=secret or None,
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        region_name=spec.region,
    )
    s3: dict[str, Any] = {"addressing_style": spec.addressing_style}
    if not sign_payload:
        s3["payload_signing_enabled"] = False
    config = Config(
        s3=s3,
        retries={"max_attempts": 8, "mode": "adaptive"},
        # Response checksums are checked where they are wanted: read_bytes asks botocore (ChecksumMode), the
        # downloader checks them itself with a faster CRC32 (finetune_trainer.transfer).
        response_checksum_validation="when_required",
        max_pool_connections=max_connections,
        connect_timeout=20,
        read_timeout=120,
        tcp_keepalive=True,
    )
    return session.client("s3", endpoint_url=spec.endpoint or None, config=config)


def _client_error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class _FileSlice(io.RawIOBase):
    """`length` bytes of a file from `offset` (fewer at its end) as a seekable, read-only stream: the body of one
    part, which botocore can rewind for a retry. Reads with pread, so parts of one file go up side by side."""

    def __init__(self, path: Path, offset: int, length: int) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self._offset = offset
        self._length = max(0, min(length, os.fstat(self._fd).st_size - offset))
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._length

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + pos), self._length)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        left = self._length - self._pos
        want = left if size is None or size < 0 else min(size, left)
        data = os.pread(self._fd, want, self._offset + self._pos) if want else b""
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


_DIGEST_MISMATCH = "the bytes the store received do not match the file's checksum (it changed after it was hashed)"


class S3Storage(Storage):
    """S3-compatible storage through boto3; prefix downloads go through the concurrent, resumable downloader.

    A file uploaded with its digests (up to `single_put_max` bytes) goes in one PUT that carries the caller's CRC32
    (else its sha256) as the object's checksum (`x-amz-checksum-crc32`, a signed header the store checks the body
    against and keeps): read once, by the caller. A larger file goes in PART_SIZE parts, each with the CRC32 the
    caller read with its sha256 (`upload_dir` does), or, without those, through boto3's transfer manager, each part
    with the CRC32 botocore computes. Bodies are never hashed into the signature (botocore's default over plain
    HTTP, a SHA-256 on both sides for every byte): a signed checksum header covers each of them instead."""

    single_put_max = 1024 * 1024 * 1024  # one PUT may be 5 GiB; past 1 GiB parts sent at once are worth more
    upload_part_workers = 8  # parts of one file in flight (the transfer manager's default is 10)
    stream_parts_in_flight = 2  # parts of a streamed object (open_writer) being sent while the next one fills

    def __init__(self, spec: StorageSpec, *, workers: int = 16, chunk_size: int = 16 * 1024 * 1024) -> None:
        self.spec = spec
        self.workers = workers
        self.chunk_size = chunk_size
        self._clients: dict[bool, Any] = {}
        self._lock = threading.Lock()
        self._spare_parts: list[bytearray] = []  # streamed objects' part buffers, kept from one object to the next
        self._listing_refused = False  # ListMultipartUploads was refused once (said once, then at debug level)

    def _client_for(self, sign_payload: bool) -> Any:
        with self._lock:
            if sign_payload not in self._clients:
                connections = max(10, self.workers + 4)
                self._clients[sign_payload] = s3_client(
                    self.spec, max_connections=connections, sign_payload=sign_payload
                )
            return self._clients[sign_payload]

    @property
    def client(self) -> Any:
        return self._client_for(True)

    @property
    def put_client(self) -> Any:
        """The client for PUTs whose body a signed checksum header covers (payload not signed)."""
        return self._client_for(False)

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        parsed = Uri.parse(uri)
        if parsed.entry.handler != "s3":
            raise StorageError(f"{uri!r} is not an s3:// URI")
        return parsed.root, parsed.path

    def _fail(self, action: str, uri: str, exc: Exception) -> StorageError:
        code = _client_error_code(exc)
        hint = {
            "NoSuchBucket": "the bucket does not exist",
            "AccessDenied": "access denied: check the storage secret's keys and the bucket policy",
            "InvalidAccessKeyId": "the access key id is not known to the endpoint",
            "SignatureDoesNotMatch": "the secret access key does not match the access key id",
            "BadDigest": _DIGEST_MISMATCH,
            "XAmzContentChecksumMismatch": _DIGEST_MISMATCH,
        }.get(code, str(exc))
        endpoint = self.spec.endpoint or "AWS"
        return StorageError(f"cannot {action} {uri} (endpoint {endpoint}): {hint}")

    def list(self, uri: str) -> ObjectList:
        bucket, key = self._split(uri)
        try:
            if key and not key.endswith("/"):
                # A single object, or a prefix written without its slash.
                try:
                    head = self.client.head_object(Bucket=bucket, Key=key)
                    return [ObjectInfo("", int(head["ContentLength"]), str(head.get("ETag", "")).strip('"') or None)]
                except Exception as exc:
                    if _client_error_code(exc) not in ("404", "NoSuchKey", "NotFound"):
                        raise
                key += "/"
            out = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(key) :]
                    if rel and not rel.endswith("/"):  # "directory" placeholder objects carry no data
                        out.append(ObjectInfo(rel, int(obj["Size"]), str(obj.get("ETag", "")).strip('"') or None))
            return sorted(out, key=lambda o: o.key)
        except StorageError:
            raise
        except Exception as exc:
            raise self._fail("list", uri, exc) from exc

    def read_bytes(self, uri: str) -> bytes | None:
        bucket, key = self._split(uri)
        try:
            body: bytes = self.client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")["Body"].read()
            return body
        except Exception as exc:
            if _client_error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail("read", uri, exc) from exc

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = self._split(uri)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:
            raise self._fail("write", uri, exc) from exc

    def upload_file(
        self,
        path: Path,
        uri: str,
        *,
        sha256: str | None = None,
        crc32: int | None = None,
        part_crc32s: Sequence[int] = (),
    ) -> None:
        from boto3.s3.transfer import TransferConfig

        from finetune_trainer.transfer import crc32_checksum

        bucket, key = self._split(uri)
        try:
            size = path.stat().st_size
            if (sha256 is not None or crc32 is not None) and size <= self.single_put_max:
                if crc32 is not None:
                    checksum = {"ChecksumCRC32": crc32_checksum(crc32)}
                else:
                    checksum = {"ChecksumSHA256": base64.b64encode(bytes.fromhex(str(sha256))).decode()}
                with open(path, "rb") as body:
                    self.put_client.put_object(Bucket=bucket, Key=key, Body=body, **checksum)
                return
            if part_crc32s:
                if len(part_crc32s) != -(-size // PART_SIZE):
                    raise ValueError(f"{len(part_crc32s)} part CRC32s for {size} bytes in parts of {PART_SIZE}")
                self._put_parts(path, bucket, key, part_crc32s)
                return
            # boto3's transfer manager does concurrent multipart uploads, botocore computing each part's CRC32.
            config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE)
            self.put_client.upload_file(str(path), bucket, key, Config=config, ExtraArgs={"ChecksumAlgorithm": "CRC32"})
        except Exception as exc:
            raise self._fail("upload to", uri, exc) from exc

    def part_size_for(self, size: int) -> int | None:
        return PART_SIZE if size > self.single_put_max else None

    def _put_parts(self, path: Path, bucket: str, key: str, part_crc32s: Sequence[int]) -> None:
        """A multipart upload of PART_SIZE parts, each with the CRC32 the caller read with the file's sha256: the
        store checks every part against the bytes that were hashed, and this side reads each part once, to send it
        (the transfer manager would compute each CRC32 again). A failed upload is aborted: no parts stay behind."""
        client = self.put_client
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")["UploadId"]

        def send(number: int) -> dict[str, Any]:
            with _FileSlice(path, (number - 1) * PART_SIZE, PART_SIZE) as body:
                return _upload_part(client, bucket, key, upload_id, number, body, part_crc32s[number - 1])

        try:
            with ThreadPoolExecutor(min(self.upload_part_workers, len(part_crc32s))) as pool:
                parts = list(pool.map(send, range(1, len(part_crc32s) + 1)))
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            _abort_upload(client, bucket, key, upload_id)
            raise
        self._abort_earlier_uploads(f"s3://{bucket}/{key}")

    def _abort_earlier_uploads(self, uri: str) -> None:
        """After an object went in parts: abort the uploads of it that an earlier writer left unfinished (killed
        while it sent the same checkpoint file or export), which only their key finds on every store."""
        try:
            aborted = self.abort_incomplete(uri)
        except StorageError as exc:  # a policy without s3:ListBucketMultipartUploads: say so once
            level, self._listing_refused = (logging.DEBUG if self._listing_refused else logging.WARNING), True
            log.log(level, "%s; unfinished uploads stay until the bucket's lifecycle rule removes them", exc)
            return
        if aborted:
            log.info("aborted %d unfinished upload(s) of %s left by an earlier writer", aborted, uri)

    def open_writer(self, uri: str) -> ObjectWriter:
        return _S3Writer(self, uri)

    def _part_buffer(self) -> bytearray:
        with self._lock:
            if self._spare_parts:
                return self._spare_parts.pop()
        return bytearray(PART_SIZE)

    def _spare_part(self, buffer: bytearray) -> None:
        with self._lock:
            if (
                len(buffer) == PART_SIZE and len(self._spare_parts) <= self.stream_parts_in_flight
            ):  # enough for one writer at a time
                self._spare_parts.append(buffer)

    def delete_prefix(self, uri: str) -> int:
        bucket, key = self._split(as_prefix(uri))
        count = 0
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
                    count += len(keys)
        except Exception as exc:
            raise self._fail("delete", uri, exc) from exc
        return count

    def abort_incomplete(self, uri: str) -> int:
        bucket, key = self._split(uri)
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            pages = paginator.paginate(Bucket=bucket, Prefix=key)
            uploads = [u for page in pages for u in page.get("Uploads", []) if key.endswith("/") or u["Key"] == key]
        except Exception as exc:
            raise self._fail("list the incomplete uploads under", uri, exc) from exc
        aborted = 0
        for upload in uploads:
            try:
                self.client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
            except Exception as exc:
                if _client_error_code(exc) != "NoSuchUpload":  # completed or aborted since the listing
                    raise self._fail("abort the incomplete upload of", f"s3://{bucket}/{upload['Key']}", exc) from exc
        return aborted

    def delete(self, uri: str) -> bool:
        bucket, key = self._split(uri)
        try:
            existed = bool(self.list(uri))
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise self._fail("delete", uri, exc) from exc
        return existed

    def download(self, uri: str, dest: Path, objects: ObjectList | None = None, *, durable: bool = True) -> ObjectList:
        from finetune_trainer.transfer import RangedDownloader, Transfer

        bucket, key = self._split(uri)
        listed = objects if objects is not None else self.list(uri)
        if not listed:
            raise StorageError(f"nothing found at {uri}")
        prefix = as_prefix(key) if key else ""
        transfers = []
        for obj in listed:
            # key "" means `uri` names one object: it keeps its base name under dest.
            object_key = prefix + obj.key if obj.key else key
            target = dest / (obj.key or PurePosixPath(key).name)
            transfers.append(Transfer(bucket, object_key, target, obj.size, obj.etag))
        downloader = RangedDownloader(self.client, workers=self.workers, chunk_size=self.chunk_size, durable=durable)
        downloader.run(transfers, label=uri)
        return listed


class _S3Writer(ObjectWriter):
    """A multipart upload fed as the bytes come: each PART_SIZE part is sent with its CRC32 (the store checks it;
    the body is not signed, as in `S3Storage.upload_file`) while the next one fills, at most
    `stream_parts_in_flight` at a time; an object smaller than a part goes in one PUT at commit. The part buffers
    are reused from object to object, so a checkpoint's optimizer state passes through ~200 MiB of memory that is
    already resident, where a local file would take gigabytes of fresh page cache, written and read back."""

    def __init__(self, storage: S3Storage, uri: str) -> None:
        super().__init__(uri)
        self._storage = storage
        self._bucket, self._key = storage._split(uri)
        self._part = storage._part_buffer()
        self._filled = 0
        self._upload_id: str | None = None
        self._sent: list[Future[dict[str, Any]]] = []
        self._slots = threading.Semaphore(storage.stream_parts_in_flight)
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = len(view)
        buffer = memoryview(self._part)
        while view:
            take = min(len(view), PART_SIZE - self._filled)
            buffer[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == PART_SIZE:
                buffer.release()
                self._guarded(self._ship)
                buffer = memoryview(self._part)
        buffer.release()
        self.size += written
        return written

    def commit(self) -> dict[str, Any]:
        from finetune_trainer.transfer import crc32_checksum

        def finish() -> None:
            if self._upload_id is None:  # all of it fits in one part: one PUT
                body = self._last_part()
                self._sha256.update(body)
                checksum = {"ChecksumCRC32": crc32_checksum(_crc32(body))}
                self._storage.put_client.put_object(Bucket=self._bucket, Key=self._key, Body=body, **checksum)
                return
            if self._filled:
                self._last_part()
                self._ship()
            parts = [future.result() for future in self._sent]
            self._storage.put_client.complete_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
            )

        self._guarded(finish)
        self._close()
        if self._upload_id is not None:
            self._storage._abort_earlier_uploads(self.uri)
        return self._entry()

    def abort(self) -> None:
        """Stop sending and abort the multipart upload (the store keeps no parts)."""
        for future in self._sent:
            future.cancel()
        self._close()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            _abort_upload(self._storage.put_client, self._bucket, self._key, upload_id)

    def _guarded(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:
            self.abort()
            raise self._storage._fail("upload to", self.uri, exc) from exc

    def _ship(self) -> None:
        """Send the filled part (waiting for a slot) and start the next one in another buffer."""
        for future in self._sent:  # a part already refused fails the object now, not at commit
            if future.done() and future.exception() is not None:
                future.result()
        client = self._storage.put_client
        if self._upload_id is None:
            created = client.create_multipart_upload(Bucket=self._bucket, Key=self._key, ChecksumAlgorithm="CRC32")
            self._upload_id = created["UploadId"]
            self._pool = ThreadPoolExecutor(self._storage.stream_parts_in_flight, thread_name_prefix="stream-part")
        assert self._pool is not None
        part, number, upload_id = self._part, len(self._sent) + 1, self._upload_id
        self._sha256.update(part)
        crc = _crc32(part)
        self._slots.acquire()

        def send() -> dict[str, Any]:
            try:  # botocore takes a bytearray as it is (not a memoryview): the buffer is sent without a copy
                return _upload_part(client, self._bucket, self._key, upload_id, number, part, crc)
            finally:
                self._storage._spare_part(part)
                self._slots.release()

        self._sent.append(self._pool.submit(send))
        self._part, self._filled = self._storage._part_buffer(), 0

    def _last_part(self) -> bytearray:
        """The part being filled, cut to what it holds (in place; that buffer is then not kept for reuse)."""
        del self._part[self._filled :]
        return self._part

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._storage._spare_part(self._part)


def _upload_part(
    client: Any, bucket: str, key: str, upload_id: str, number: int, body: Any, crc: int
) -> dict[str, Any]:
    """Send part `number` of a multipart upload with its CRC32 (checked by the store; the body is not signed);
    the part's entry for complete_multipart_upload."""
    from finetune_trainer.transfer import crc32_checksum

    checksum = crc32_checksum(crc)
    response = client.upload_part(
        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body, ChecksumCRC32=checksum
    )
    return {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": checksum}


def _abort_upload(client: Any, bucket: str, key: str, upload_id: str) -> None:
    """Abort a failed multipart upload, so that no parts stay behind; the failure being handled is the one to
    report (the store expires what an abort cannot remove)."""
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as exc:
        log.warning("cannot abort the multipart upload of s3://%s/%s: %s", bucket, key, exc)


def _crc32(data: Any) -> int:
    from zlib_ng.zlib_ng import crc32

    return int(crc32(data))


# --- selection --------------------------------------------------------------------------------------------------


# The I/O code for each handler that schemes.REGISTRY names; "hub" sources are read-only, fetched by cache.py.
_OPENERS: dict[str, Callable[[StorageSpec | None], Storage]] = {
    "s3": lambda spec: S3Storage(spec or StorageSpec()),
    "local": lambda spec: LocalStorage(),
}


def open_storage(uri: str, spec: StorageSpec | None = None) -> Storage:
    """The storage backend that serves `uri`."""
    parsed = Uri.parse(uri)
    opener = _OPENERS.get(parsed.entry.handler)
    if opener is None:
        raise StorageError(
            f"{uri!r}: {parsed.entry.prefix} sources are read-only and are fetched through the node cache"
        )
    return opener(spec)
