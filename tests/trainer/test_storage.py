"""Storage against a real S3 server (MinIO): concurrent part/range downloads verified against ETags, resume of an
interrupted download, corruption detected, one download per node with the other ranks waiting on the file system,
errors that name the URI, and a whole training run reading from and writing to S3."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from trainer.leftovers import kill_while_writing, leave_upload, uploads_of
from trainer.tinymodels import losses_by_step, make_config, progress_lines, write_dataset, write_model

from finetune_trainer.cache import NodeCache
from finetune_trainer.config import StorageSpec
from finetune_trainer.distenv import Ranks
from finetune_trainer.progress import ProgressReporter
from finetune_trainer.recipe import run
from finetune_trainer.storage import PART_SIZE, LocalStorage, S3Storage, StorageError, digest_file
from finetune_trainer.transfer import RangedDownloader, Transfer, TransferError

MiB = 1024 * 1024


@pytest.fixture
def s3_env(s3: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The bucket's keys in the environment, the only place the trainer takes them from."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    return s3


def _spec(s3: Any) -> StorageSpec:
    return StorageSpec(endpoint=s3.endpoint_url, region=s3.region, addressing_style="path")


class GetCounter:
    """Records the GetObject calls a boto3 client makes (part numbers and ranges), via botocore's event hooks."""

    def __init__(self, client: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        client.meta.events.register("before-parameter-build.s3.GetObject", self._record)

    def _record(self, params: dict[str, Any], **kwargs: Any) -> None:
        with self._lock:
            self.calls.append({k: params.get(k) for k in ("Key", "Range", "PartNumber")})

    def keys(self) -> list[str]:
        return [str(c["Key"]) for c in self.calls]


def _blob(size: int, seed: int) -> bytes:
    return hashlib.shake_256(f"blob-{seed}".encode()).digest(size)


def _uploader(s3: Any, checksums: bool) -> Any:
    """A boto3 client that stores S3 additional checksums (CRC32, today's SDK default) or, like older tools, none,
    so that only the MD5 ETag can verify a download."""
    from botocore.config import Config

    if checksums:
        return s3.client()
    return boto3.session.Session().client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        region_name=s3.region,
        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"),
    )


def _upload_model_like(s3: Any, prefix: str, checksums: bool = True) -> dict[str, bytes]:
    """Objects shaped like a model directory: a multipart shard, a big single-part shard, small files."""
    client = _uploader(s3, checksums)
    files = {
        "model-00001-of-00002.safetensors": _blob(13 * MiB + 123, 1),  # multipart, 5 MiB parts -> 3 parts
        "model-00002-of-00002.safetensors": _blob(3 * MiB + 7, 2),  # one PUT, fetched in 1 MiB ranges
        "config.json": b'{"model_type": "llama"}',
        "tokenizer/tokenizer.json": _blob(2000, 3),
        "empty.txt": b"",
    }
    multipart = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    single = TransferConfig(multipart_threshold=64 * MiB)
    for name, data in files.items():
        config = multipart if name.startswith("model-00001") else single
        client.upload_fileobj(io.BytesIO(data), s3.bucket, f"{prefix}/{name}", Config=config)
    return files


@pytest.mark.parametrize("checksums", [True, False], ids=["crc32-checksums", "md5-etag-only"])
def test_prefix_download_fetches_parts_and_ranges_concurrently_and_verifies_them(
    s3_env: Any, tmp_path: Path, checksums: bool
) -> None:
    files = _upload_model_like(s3_env, "models/tiny", checksums)
    head = s3_env.client().head_object(
        Bucket=s3_env.bucket, Key="models/tiny/model-00001-of-00002.safetensors", ChecksumMode="ENABLED"
    )
    assert ("ChecksumCRC32" in head) == checksums
    storage = S3Storage(_spec(s3_env), workers=6, chunk_size=MiB)
    listed = storage.list(s3_env.uri("models/tiny/"))
    assert sorted(o.key for o in listed) == sorted(files)
    assert next(o for o in listed if o.key.startswith("model-00001")).etag.endswith("-3")  # type: ignore[union-attr]
    counter = GetCounter(storage.client)

    storage.download(s3_env.uri("models/tiny/"), tmp_path / "dl", listed)

    for name, data in files.items():
        assert (tmp_path / "dl" / name).read_bytes() == data, name
    assert not list((tmp_path / "dl").rglob("*.part*")), "partial files left behind"
    big = [c for c in counter.calls if str(c["Key"]).endswith("model-00001-of-00002.safetensors")]
    if checksums:  # the parts' checksums are listed: all three parts in one ranged GET, each checked
        assert [(c["PartNumber"], c["Range"]) for c in big] == [(None, f"bytes=0-{13 * MiB + 122}")]
    else:  # only the part GETs give each part's MD5
        assert sorted(c["PartNumber"] for c in big) == [1, 2, 3], "a multipart object is fetched part by part"
    ranged = [c["Range"] for c in counter.calls if str(c["Key"]).endswith("model-00002-of-00002.safetensors")]
    assert len(ranged) == 4
    assert "bytes=0-1048575" in ranged
    assert f"bytes={3 * MiB}-{3 * MiB + 6}" in ranged

    # Everything is already here: a second download of the same prefix fetches nothing.
    again = GetCounter(storage.client)
    storage.download(s3_env.uri("models/tiny/"), tmp_path / "dl", listed)
    assert again.calls == []
    # The same client still reads single objects (with botocore checking their checksums).
    assert storage.read_bytes(s3_env.uri("models/tiny/config.json")) == files["config.json"]


def test_a_part_list_longer_than_one_page_is_read_page_by_page(
    s3_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_trainer import transfer as transfer_module

    data = _blob(16 * MiB + 5, 11)  # 4 parts of 5 MiB (the last 1 MiB + 5)
    multipart = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    s3_env.client().upload_fileobj(io.BytesIO(data), s3_env.bucket, "four.bin", Config=multipart)
    monkeypatch.setattr(transfer_module, "_PARTS_PER_CALL", 3)
    storage = S3Storage(_spec(s3_env))
    pages: list[Any] = []
    storage.client.meta.events.register(
        "before-parameter-build.s3.GetObjectAttributes",
        lambda params, **_: pages.append(params.get("PartNumberMarker")),
    )
    gets = GetCounter(storage.client)
    storage.download(s3_env.uri("four.bin"), tmp_path)
    assert (tmp_path / "four.bin").read_bytes() == data
    assert pages == [None, 3]
    assert [c["Range"] for c in gets.calls] == [f"bytes=0-{16 * MiB + 4}"], "the four parts in one ranged GET"


def test_an_interrupted_download_resumes_with_only_the_missing_chunks(s3_env: Any, tmp_path: Path) -> None:
    data = _blob(6 * MiB + 99, 7)
    s3_env.client().put_object(Bucket=s3_env.bucket, Key="big.bin", Body=data)
    storage = S3Storage(_spec(s3_env))
    (obj,) = storage.list(s3_env.uri("big.bin"))
    transfer = Transfer(s3_env.bucket, "big.bin", tmp_path / "big.bin", obj.size, obj.etag)
    done: list[int] = []

    def crash_after_three(t: Transfer, index: int) -> None:
        done.append(index)
        if len(done) == 3:
            raise ConnectionError("the Pod was killed here")

    with pytest.raises(ConnectionError):
        RangedDownloader(storage.client, workers=1, chunk_size=MiB, on_chunk=crash_after_three).run([transfer])
    assert not transfer.dest.exists()
    assert (tmp_path / "big.bin.part").exists()
    assert (tmp_path / "big.bin.part.state").exists()

    recorded = len((tmp_path / "big.bin.part.state").read_text().splitlines()) - 1  # header + one line per chunk
    assert recorded >= 3

    counter = GetCounter(storage.client)
    RangedDownloader(storage.client, workers=4, chunk_size=MiB).run([transfer])
    assert transfer.dest.read_bytes() == data
    assert len(counter.calls) == 7 - recorded, "chunks finished before the crash were fetched again"
    assert not (tmp_path / "big.bin.part").exists()


@pytest.mark.parametrize(("checksums", "check"), [(True, "CRC32"), (False, "ETag")], ids=["crc32", "md5-etag"])
def test_a_corrupted_partial_file_fails_verification_and_is_fetched_again(
    s3_env: Any, tmp_path: Path, checksums: bool, check: str
) -> None:
    data = _blob(3 * MiB, 8)
    _uploader(s3_env, checksums).put_object(Bucket=s3_env.bucket, Key="w.bin", Body=data)
    storage = S3Storage(_spec(s3_env))
    (obj,) = storage.list(s3_env.uri("w.bin"))
    transfer = Transfer(s3_env.bucket, "w.bin", tmp_path / "w.bin", obj.size, obj.etag)

    def stop_after_one(t: Transfer, index: int) -> None:
        raise ConnectionError("interrupted")

    with pytest.raises(ConnectionError):
        RangedDownloader(storage.client, workers=1, chunk_size=MiB, on_chunk=stop_after_one).run([transfer])
    with open(tmp_path / "w.bin.part", "r+b") as handle:  # a flipped byte in a chunk recorded as done
        handle.seek(10)
        handle.write(b"\xff" if data[10:11] != b"\xff" else b"\x00")
    with pytest.raises(TransferError, match=rf"s3://{s3_env.bucket}/w.bin did not verify: {check} "):
        RangedDownloader(storage.client, chunk_size=MiB).run([transfer])
    assert not (tmp_path / "w.bin.part").exists(), "a partial file that failed verification must be dropped"
    RangedDownloader(storage.client, chunk_size=MiB).run([transfer])
    assert transfer.dest.read_bytes() == data


class CorruptingProxy:
    """A TCP proxy in front of the S3 server that flips the first body byte of the first `budget` partial
    responses (HTTP 206: a part or a range): what a faulty network path or middlebox would deliver."""

    def __init__(self, endpoint_url: str, budget: int) -> None:
        host, port = endpoint_url.split("//", 1)[1].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.budget = budget
        self.corrupted = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    @staticmethod
    def _part(head: bytes) -> bool:
        return head.startswith(b"HTTP/1.1 206")

    def _take(self) -> bool:
        with self._lock:
            if self.corrupted >= self.budget:
                return False
            self.corrupted += 1
            return True

    def _pipe(self, src: socket.socket, dst: socket.socket, responses: bool) -> None:
        pending = b""  # a response's start, held until its first body byte has arrived
        try:
            while data := src.recv(1 << 16):
                if responses and (pending or data.startswith(b"HTTP/")):
                    pending += data
                    end = pending.find(b"\r\n\r\n")
                    part = end >= 0 and self._part(pending[:end])
                    if end < 0 or (part and len(pending) <= end + 4):
                        continue
                    data, pending = bytearray(pending), b""
                    if part and self._take():
                        data[end + 4] ^= 0xFF
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for end in (src, dst):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)


def refuse(client: Any, operation: str) -> None:
    """Make the server's answer to `operation` an AccessDenied, as under an IAM policy that does not grant it
    (MinIO here has no such user to create): GetObjectAttributes where a policy grants s3:GetObject alone,
    ListMultipartUploads without s3:ListBucketMultipartUploads."""
    from botocore.awsrequest import AWSResponse

    class Body(io.BytesIO):
        def stream(self, amt: int = 2**16, decode_content: bool | None = None) -> Iterator[bytes]:
            yield self.read()  # what botocore reads an error's body with

    body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"

    def deny(request: Any, **kwargs: Any) -> AWSResponse:
        return AWSResponse(request.url, 403, {"Content-Type": "application/xml"}, Body(body))  # type: ignore[arg-type]

    client.meta.events.register(f"before-send.s3.{operation}", deny)


@pytest.mark.parametrize("part_list", [True, False], ids=["parts-in-ranges", "part-by-part"])
def test_a_part_whose_bytes_do_not_match_its_checksum_is_fetched_again(
    s3_env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, part_list: bool
) -> None:
    data = _blob(11 * MiB, 9)
    multipart = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    s3_env.client().upload_fileobj(io.BytesIO(data), s3_env.bucket, "parts.bin", Config=multipart)
    proxy = CorruptingProxy(s3_env.endpoint_url, budget=1)
    try:
        spec = StorageSpec(endpoint=proxy.url, region=s3_env.region, addressing_style="path")
        storage = S3Storage(spec, workers=2)
        if not part_list:
            refuse(storage.client, "GetObjectAttributes")
        counter = GetCounter(storage.client)
        with caplog.at_level(logging.WARNING, logger="finetune_trainer.transfer"):
            storage.download(s3_env.uri("parts.bin"), tmp_path)
    finally:
        proxy.close()
    assert proxy.corrupted == 1
    # parts-in-ranges: one GET of all three parts, then again; part-by-part: three part GETs and one again.
    assert len(counter.calls) == (2 if part_list else 4)
    assert all((c["Range"] is not None) == part_list for c in counter.calls)
    assert (tmp_path / "parts.bin").read_bytes() == data
    assert "CRC32" in caplog.text
    assert "the bytes give" in caplog.text
    assert "retrying" in caplog.text


def test_one_process_per_node_downloads_and_the_others_wait_for_its_marker(s3_env: Any, tmp_path: Path) -> None:
    files = _upload_model_like(s3_env, "m")
    uri = s3_env.uri("m/")
    storages = {rank: S3Storage(_spec(s3_env), chunk_size=4 * MiB) for rank in (0, 1)}
    counters = {rank: GetCounter(storages[rank].client) for rank in (0, 1)}

    def cache(local_rank: int) -> NodeCache:
        ranks = Ranks(rank=local_rank, local_rank=local_rank, world_size=2, local_world_size=2)
        return NodeCache(tmp_path / "cache", lambda _uri: storages[local_rank], ranks, wait_seconds=60)

    results: dict[int, Path] = {}
    waiter = threading.Thread(target=lambda: results.__setitem__(1, cache(1).fetch(uri)))
    waiter.start()  # local rank 1 starts first and has to wait
    results[0] = cache(0).fetch(uri)
    waiter.join(timeout=60)
    assert results[0] == results[1] == tmp_path / "cache" / "s3" / s3_env.bucket / "m"
    assert (results[1] / "tokenizer" / "tokenizer.json").read_bytes() == files["tokenizer/tokenizer.json"]
    assert counters[1].calls == [], "only local rank 0 downloads"
    assert counters[0].calls

    # A restarted container on the same node: the cache is complete, nothing is fetched again.
    restarted = GetCounter(storages[0].client)
    assert cache(0).fetch(uri) == results[0]
    assert restarted.calls == []

    # The source changed: only the changed object is fetched.
    s3_env.client().put_object(Bucket=s3_env.bucket, Key="m/config.json", Body=b'{"model_type": "qwen2"}')
    changed = GetCounter(storages[0].client)
    cache(0).fetch(uri)
    assert changed.keys() == ["m/config.json"]
    assert (results[0] / "config.json").read_bytes() == b'{"model_type": "qwen2"}'


def test_a_failed_download_on_local_rank_0_fails_the_waiting_ranks_with_its_error(s3_env: Any, tmp_path: Path) -> None:
    storage = S3Storage(_spec(s3_env))
    uri = s3_env.uri("no/such/model/")

    def cache(local_rank: int) -> NodeCache:
        ranks = Ranks(rank=local_rank, local_rank=local_rank, world_size=2, local_world_size=2)
        return NodeCache(tmp_path / "cache", lambda _uri: storage, ranks, wait_seconds=60)

    errors: dict[int, Exception] = {}

    def wait() -> None:
        try:
            cache(1).fetch(uri)
        except StorageError as exc:
            errors[1] = exc

    waiter = threading.Thread(target=wait)
    waiter.start()
    with pytest.raises(StorageError, match=f"nothing found at {uri}"):
        cache(0).fetch(uri)
    waiter.join(timeout=30)
    assert f"local rank 0 failed to download {uri}: nothing found at {uri}" in str(errors[1])


def test_storage_errors_name_the_uri_and_the_cause(s3_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = S3Storage(_spec(s3_env))
    with pytest.raises(StorageError, match=r"cannot list s3://no-such-bucket-x1/model/ .*the bucket does not exist"):
        storage.list("s3://no-such-bucket-x1/model/")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    wrong = S3Storage(_spec(s3_env))
    with pytest.raises(StorageError, match=rf"s3://{s3_env.bucket}/x/ .*secret access key does not match"):
        wrong.list(s3_env.uri("x/"))


def _stored_checksums(s3: Any, key: str) -> dict[str, str]:
    """The additional checksums the store keeps for `key` (algorithm -> base64 value; composite ones end "-<parts>")."""
    head = s3.client().head_object(Bucket=s3.bucket, Key=key, ChecksumMode="ENABLED")
    return {
        name[len("Checksum") :]: v for name, v in head.items() if name.startswith("Checksum") and name[8:].isupper()
    }


def _b64_crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


class SentHeaders:
    """The headers of every request `client` sends for `operation` (before-send hook), names lower-cased."""

    def __init__(self, client: Any, operation: str) -> None:
        self.requests: list[dict[str, str]] = []
        client.meta.events.register(f"before-send.s3.{operation}", self._record)

    def _record(self, request: Any, **_: Any) -> None:
        items = request.headers.items()
        self.requests.append({k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in items})


def _signed(headers: dict[str, str]) -> list[str]:
    return headers["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")


def test_a_file_sent_with_its_digests_is_checked_by_the_store_against_its_crc32(s3_env: Any, tmp_path: Path) -> None:
    storage = S3Storage(_spec(s3_env))
    sent = SentHeaders(storage.put_client, "PutObject")
    data = _blob(3 * MiB + 5, 7)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(data)
    digest = digest_file(path)
    assert (digest.sha256, digest.crc32) == (hashlib.sha256(data).hexdigest(), zlib.crc32(data))
    uri = s3_env.uri("runs/y/adapter_model.safetensors")

    storage.upload_file(path, uri, sha256=digest.sha256, crc32=digest.crc32)

    assert _stored_checksums(s3_env, "runs/y/adapter_model.safetensors") == {"CRC32": _b64_crc32(data)}
    # The body is read once for both digests (by the caller): it is covered by the signed x-amz-checksum-crc32
    # header, which the store checks, not by a SHA-256 in the signature (botocore's default over plain HTTP).
    headers = sent.requests[-1]
    assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert headers["x-amz-checksum-crc32"] == _b64_crc32(data)
    assert "x-amz-checksum-crc32" in _signed(headers)

    # Bytes that do not match the digests (the file changed after it was hashed) are refused; what was there stays.
    path.write_bytes(_blob(3 * MiB + 5, 8))
    with pytest.raises(StorageError, match=rf"cannot upload to {re.escape(uri)} .*do not match the file's checksum"):
        storage.upload_file(path, uri, sha256=digest.sha256, crc32=digest.crc32)
    assert storage.read_bytes(uri) == data

    # A caller with only the sha256 (the merge's shard writer) gets it checked and kept instead.
    merged = s3_env.uri("runs/y/merged.safetensors")
    storage.upload_file(
        tmp_path / "adapter_model.safetensors", merged, sha256=hashlib.sha256(_blob(3 * MiB + 5, 8)).hexdigest()
    )
    stored = _stored_checksums(s3_env, "runs/y/merged.safetensors")
    assert base64.b64decode(stored["SHA256"]).hex() == hashlib.sha256(_blob(3 * MiB + 5, 8)).hexdigest()
    assert sent.requests[-1]["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"


def test_a_file_over_the_single_put_limit_goes_in_parts_checked_against_crc32s_read_with_its_sha256(
    s3_env: Any, tmp_path: Path
) -> None:
    """Checkpoint weights and optimizer state over 1 GiB: each part carries the CRC32 of its slice, read in the same
    pass as the record's sha256, so the store checks every part against the bytes that were hashed and this side
    reads the file once more only to send it."""
    storage = S3Storage(_spec(s3_env))
    storage.single_put_max = 4 * MiB
    parts = SentHeaders(storage.put_client, "UploadPart")
    data = _blob(PART_SIZE + 6 * MiB + 3, 5)
    path = tmp_path / "optimizer.pt"
    path.write_bytes(data)
    digest = digest_file(path, part_size=PART_SIZE)
    assert (digest.sha256, digest.crc32) == (hashlib.sha256(data).hexdigest(), zlib.crc32(data))
    assert digest.part_crc32s == (zlib.crc32(data[:PART_SIZE]), zlib.crc32(data[PART_SIZE:]))
    assert digest_file(path).part_crc32s == ()
    uri = s3_env.uri("runs/z/optimizer.pt")

    storage.upload_file(path, uri, sha256=digest.sha256, crc32=digest.crc32, part_crc32s=digest.part_crc32s)

    assert sorted(p["x-amz-checksum-crc32"] for p in parts.requests) == sorted(
        [_b64_crc32(data[:PART_SIZE]), _b64_crc32(data[PART_SIZE:])]
    )
    assert {p["x-amz-content-sha256"] for p in parts.requests} == {"UNSIGNED-PAYLOAD"}
    assert all("x-amz-checksum-crc32" in _signed(p) for p in parts.requests)
    assert _stored_checksums(s3_env, "runs/z/optimizer.pt")["CRC32"].endswith("-2")
    assert storage.read_bytes(uri) == data

    # A byte changed after the file was hashed: its part is refused, the upload is aborted (no parts left in the
    # store), and the object already there stays.
    changed = bytearray(data)
    changed[PART_SIZE + 1] ^= 1
    path.write_bytes(changed)
    with pytest.raises(StorageError, match=rf"cannot upload to {re.escape(uri)} .*do not match the file's checksum"):
        storage.upload_file(path, uri, sha256=digest.sha256, crc32=digest.crc32, part_crc32s=digest.part_crc32s)
    assert storage.read_bytes(uri) == data
    assert s3_env.client().list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads", []) == []


def _stream(writer: Any, data: bytes, chunks: tuple[int, ...]) -> None:
    """Write `data` into `writer` the way torch.save does: pieces of uneven sizes, as memoryviews."""
    view, offset = memoryview(data), 0
    for size in chunks:
        writer.write(view[offset : offset + size])
        offset += size
    writer.write(view[offset:])


def test_a_file_streamed_into_the_store_goes_in_parts_with_their_crc32s_and_appears_only_once_complete(
    s3_env: Any, tmp_path: Path
) -> None:
    """A checkpoint's optimizer state serialized straight into the store: cut into parts as it is written (a part
    spans several writes and one write several parts), each part sent with its CRC32 while the next fills, the
    record's sha256 computed on the way; nothing is visible at the key before `commit()`."""
    storage = S3Storage(_spec(s3_env))
    parts = SentHeaders(storage.put_client, "UploadPart")
    data = _blob(2 * PART_SIZE + 5 * MiB + 11, 9)
    uri = s3_env.uri("runs/s/checkpoints/step-4/optimizer.pt")

    writer = storage.open_writer(uri)
    _stream(writer, data, (100, 3 * MiB, PART_SIZE, 7, PART_SIZE - 2 * MiB))
    assert storage.list(uri) == []  # parts sent so far are not an object yet
    entry = writer.commit()

    assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    slices = [data[:PART_SIZE], data[PART_SIZE : 2 * PART_SIZE], data[2 * PART_SIZE :]]
    assert sorted(p["x-amz-checksum-crc32"] for p in parts.requests) == sorted(_b64_crc32(s) for s in slices)
    assert {p["x-amz-content-sha256"] for p in parts.requests} == {"UNSIGNED-PAYLOAD"}
    assert all("x-amz-checksum-crc32" in _signed(p) for p in parts.requests)
    assert _stored_checksums(s3_env, "runs/s/checkpoints/step-4/optimizer.pt")["CRC32"].endswith("-3")
    assert storage.read_bytes(uri) == data
    # A resume downloads it part by part, each part checked against the CRC32 it was sent with.
    storage.download(uri, tmp_path / "back")
    assert (tmp_path / "back" / "optimizer.pt").read_bytes() == data

    # Less than a part goes in one PUT checked against its CRC32.
    small = _blob(3 * MiB + 1, 10)
    writer = storage.open_writer(s3_env.uri("runs/s/small.pt"))
    _stream(writer, small, (5, MiB))
    assert writer.commit() == {"size": len(small), "sha256": hashlib.sha256(small).hexdigest()}
    assert _stored_checksums(s3_env, "runs/s/small.pt") == {"CRC32": _b64_crc32(small)}
    assert storage.read_bytes(s3_env.uri("runs/s/small.pt")) == small

    # A stream abandoned half way (the serialization failed) leaves nothing: no object, no parts in the store, and
    # the object already at the key stays.
    writer = storage.open_writer(uri)
    _stream(writer, _blob(PART_SIZE + MiB, 11), (MiB,))
    writer.abort()
    assert storage.read_bytes(uri) == data
    assert s3_env.client().list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads", []) == []


def test_a_stream_the_store_refuses_fails_with_the_uri_and_leaves_no_parts(s3_env: Any) -> None:
    storage = S3Storage(_spec(s3_env))
    uri = f"s3://no-such-bucket-{os.getpid()}/runs/optimizer.pt"
    writer = storage.open_writer(uri)
    with pytest.raises(StorageError, match=rf"cannot upload to {re.escape(uri)} .*the bucket does not exist"):
        _stream(writer, _blob(PART_SIZE + MiB, 12), (MiB,))  # refused when the first part is full
    writer.abort()  # the caller's clean-up after a failure is harmless


def test_a_file_streamed_into_local_storage_takes_its_name_only_once_complete(tmp_path: Path) -> None:
    storage = LocalStorage()
    data = _blob(3 * MiB + 3, 13)
    uri = f"file://{tmp_path}/out/checkpoints/step-2/optimizer.pt"
    writer = storage.open_writer(uri)
    _stream(writer, data, (7, MiB))
    assert not (tmp_path / "out/checkpoints/step-2/optimizer.pt").exists()
    assert writer.commit() == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert (tmp_path / "out/checkpoints/step-2/optimizer.pt").read_bytes() == data

    writer = storage.open_writer(uri)
    _stream(writer, b"half", ())
    writer.abort()
    assert (tmp_path / "out/checkpoints/step-2/optimizer.pt").read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "out/checkpoints/step-2").iterdir()) == ["optimizer.pt"]


def test_a_file_sent_in_parts_aborts_the_unfinished_uploads_an_earlier_writer_left_at_its_key(
    s3_env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A writer killed half way through a multipart upload leaves it in the store; the next complete upload of the
    # same object (the checkpoint saved again, the export run again) aborts it. Other objects' uploads stay.
    storage = S3Storage(_spec(s3_env))
    storage.single_put_max = 4 * MiB
    client, bucket = s3_env.client(), s3_env.bucket
    streamed, sent, other = "run/checkpoints/step-6/optimizer.pt", "run/model.safetensors", "run/other.bin"
    for key in (streamed, streamed, sent, other):
        leave_upload(client, bucket, key)

    data = _blob(PART_SIZE + MiB, 15)
    writer = storage.open_writer(s3_env.uri(streamed))
    _stream(writer, data, (MiB,))
    with caplog.at_level(logging.INFO, logger="finetune_trainer.storage"):
        writer.commit()
    assert uploads_of(client, bucket, streamed) == []
    assert f"aborted 2 unfinished upload(s) of {s3_env.uri(streamed)}" in caplog.text
    assert storage.read_bytes(s3_env.uri(streamed)) == data

    path = tmp_path / "model.safetensors"
    path.write_bytes(_blob(5 * MiB, 16))
    digest = digest_file(path, part_size=storage.part_size_for(path.stat().st_size))
    storage.upload_file(
        path, s3_env.uri(sent), sha256=digest.sha256, crc32=digest.crc32, part_crc32s=digest.part_crc32s
    )
    assert uploads_of(client, bucket, sent) == []
    assert len(uploads_of(client, bucket, other)) == 1


def test_the_unfinished_uploads_of_an_object_are_aborted_on_request_and_a_refused_listing_names_the_uri(
    s3_env: Any,
) -> None:
    storage = S3Storage(_spec(s3_env))
    client, bucket = s3_env.client(), s3_env.bucket
    leave_upload(client, bucket, "run/model.safetensors")
    assert storage.abort_incomplete(s3_env.uri("run/model.safetensors")) == 1
    assert uploads_of(client, bucket, "run/model.safetensors") == []
    assert storage.abort_incomplete(s3_env.uri("run/model.safetensors")) == 0

    refuse(storage.client, "ListMultipartUploads")  # a policy without s3:ListBucketMultipartUploads
    uri = s3_env.uri("run/")
    refused = rf"cannot list the incomplete uploads under {re.escape(uri)} .*access denied"
    with pytest.raises(StorageError, match=refused):
        storage.abort_incomplete(uri)


def test_the_temporary_files_a_killed_local_writer_left_are_removed_and_nothing_else(tmp_path: Path) -> None:
    storage = LocalStorage()
    out = tmp_path / "out"
    kill_while_writing(f"file://{out}/checkpoints/step-6/optimizer.pt")
    kill_while_writing(f"file://{out}/model.safetensors")
    storage.write_bytes(f"file://{out}/checkpoints/step-4/optimizer.pt", b"kept")
    (out / "checkpoints/step-4/.keep").write_text("not ours")
    assert len(list((out / "checkpoints/step-6").iterdir())) == 1
    kill_while_writing(f"file://{out}/checkpoints/step-4/optimizer.pt")
    assert storage.abort_incomplete(f"file://{out}/checkpoints/step-4/optimizer.pt") == 1  # the one object's
    assert storage.abort_incomplete(f"file://{out}/") == 2
    assert list((out / "checkpoints/step-6").iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]
    assert sorted(p.name for p in (out / "checkpoints/step-4").iterdir()) == [".keep", "optimizer.pt"]
    assert storage.abort_incomplete(f"file://{tmp_path}/nothing-here/") == 0


def test_upload_dir_read_write_and_delete_round_trip_on_s3(s3_env: Any, tmp_path: Path) -> None:
    storage = S3Storage(_spec(s3_env))
    storage.single_put_max = 4 * MiB  # larger files go in parts through the transfer manager
    parts = SentHeaders(storage.put_client, "UploadPart")
    (tmp_path / "ckpt" / "global_step2").mkdir(parents=True)
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(_blob(70 * MiB, 4))
    (tmp_path / "ckpt" / "global_step2" / "zero_pp_rank_0.pt").write_bytes(b"shard")
    prefix = s3_env.uri("runs/x/checkpoints/step-2/")
    described = storage.upload_dir(tmp_path / "ckpt", prefix)
    assert described == [
        {"path": "global_step2/zero_pp_rank_0.pt", "size": 5, "sha256": hashlib.sha256(b"shard").hexdigest()},
        {"path": "optimizer.pt", "size": 70 * MiB, "sha256": hashlib.sha256(_blob(70 * MiB, 4)).hexdigest()},
    ]
    # The store checked the small file against the CRC32 read with the record's digest; the large one, in 64 MiB
    # parts, against each part's CRC32 (a signed header; no part's body hashed into its signature).
    stored = _stored_checksums(s3_env, "runs/x/checkpoints/step-2/global_step2/zero_pp_rank_0.pt")
    assert stored == {"CRC32": _b64_crc32(b"shard")}
    optimizer = _blob(70 * MiB, 4)
    part_crcs = [_b64_crc32(optimizer[: 64 * MiB]), _b64_crc32(optimizer[64 * MiB :])]
    assert sorted(p["x-amz-checksum-crc32"] for p in parts.requests) == sorted(part_crcs)
    assert {p["x-amz-content-sha256"] for p in parts.requests} == {"UNSIGNED-PAYLOAD"}
    assert all("x-amz-checksum-crc32" in _signed(p) for p in parts.requests)
    assert _stored_checksums(s3_env, "runs/x/checkpoints/step-2/optimizer.pt")["CRC32"].endswith("-2")
    assert {o.key: o.size for o in storage.list(prefix)} == {
        "global_step2/zero_pp_rank_0.pt": 5,
        "optimizer.pt": 70 * MiB,
    }
    # What went up comes back down byte for byte, its checksums verified by the downloader.
    storage.download(prefix, tmp_path / "back")
    assert (tmp_path / "back" / "optimizer.pt").read_bytes() == optimizer
    assert storage.read_bytes(prefix + "missing.json") is None
    storage.write_bytes(prefix + "manifest.json", b'{"step": 2}')
    assert storage.read_bytes(prefix + "manifest.json") == b'{"step": 2}'
    assert storage.exists(prefix + "manifest.json")
    # Retention deletes a checkpoint's manifest alone first (what is left is then merely incomplete).
    assert storage.delete(prefix + "manifest.json") is True
    assert storage.read_bytes(prefix + "manifest.json") is None
    assert storage.delete(prefix + "manifest.json") is False
    assert len(storage.list(prefix)) == 2
    storage.write_bytes(prefix + "manifest.json", b'{"step": 2}')
    assert storage.delete_prefix(prefix) == 3
    assert storage.list(prefix) == []


def test_pvc_uris_map_to_the_claim_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTJ_PVC_ROOT", str(tmp_path))
    storage = LocalStorage()
    storage.write_bytes("pvc://models/qwen/config.json", b"{}")
    assert (tmp_path / "models" / "qwen" / "config.json").read_bytes() == b"{}"
    assert [o.key for o in storage.list("pvc://models/qwen/")] == ["config.json"]
    assert storage.delete_prefix("pvc://models/qwen/") == 1
    assert storage.list("pvc://models/qwen/") == []


def test_a_training_run_reads_model_and_data_from_s3_and_resumes_from_s3_checkpoints(
    s3_env: Any, tmp_path: Path
) -> None:
    client = s3_env.client()
    model = write_model(tmp_path / "model")
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3_env.bucket, f"models/tiny/{path.relative_to(model).as_posix()}")
    client.upload_file(str(write_dataset(tmp_path / "train.jsonl")), s3_env.bucket, "data/train.jsonl")
    config = make_config(
        tmp_path,
        model_uri=s3_env.uri("models/tiny/"),
        data_uri=s3_env.uri("data/train.jsonl"),
        output_uri=s3_env.uri("runs/tiny/"),
        training={"maxSteps": 4, "saveSteps": 2},
        storage={"endpoint": s3_env.endpoint_url, "region": s3_env.region},
    )
    first = io.StringIO()
    assert run(config, reporter=ProgressReporter("tiny", stream=first)).status == "finished"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_env.bucket, Prefix="runs/tiny/")["Contents"]}
    for key in ("manifest.json", "adapter_model.safetensors", "loss.png", "checkpoints/step-2/manifest.json"):
        assert f"runs/tiny/{key}" in keys
    assert "runs/tiny/checkpoints/step-4/optimizer.pt" in keys
    # Every file a checkpoint or the final outputs list holds the bytes its sha256 names, and the store checked them
    # against the CRC32 read with that digest (and keeps it).
    for manifest_key in ("runs/tiny/manifest.json", "runs/tiny/checkpoints/step-2/manifest.json"):
        listed = json.loads(client.get_object(Bucket=s3_env.bucket, Key=manifest_key)["Body"].read())["files"]
        base = manifest_key.rsplit("/", 1)[0]
        for f in listed:
            body = client.get_object(Bucket=s3_env.bucket, Key=f"{base}/{f['path']}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == f["sha256"], f["path"]
            assert _stored_checksums(s3_env, f"{base}/{f['path']}") == {"CRC32": _b64_crc32(body)}, f["path"]

    # A Pod that starts after success does not train again.
    assert run(config, reporter=ProgressReporter("tiny", stream=io.StringIO())).status == "already-complete"

    # Lose the final outputs' manifest and the newest checkpoint's manifest (an upload that never finished), and
    # use a fresh node (empty cache): the run resumes from step 2, downloaded from S3.
    client.delete_object(Bucket=s3_env.bucket, Key="runs/tiny/manifest.json")
    client.delete_object(Bucket=s3_env.bucket, Key="runs/tiny/checkpoints/step-4/manifest.json")
    fresh = config.model_copy(update={"cache_dir": str(tmp_path / "other-node")})
    second = io.StringIO()
    result = run(fresh, reporter=ProgressReporter("tiny", stream=second))
    assert result.status == "finished"
    assert result.resumed_from == 2
    assert sorted(losses_by_step(progress_lines(second.getvalue()))) == [3, 4]
    assert losses_by_step(progress_lines(second.getvalue()))[4] == pytest.approx(
        losses_by_step(progress_lines(first.getvalue()))[4], rel=1e-5
    )
    assert (
        json.loads(client.get_object(Bucket=s3_env.bucket, Key="runs/tiny/manifest.json")["Body"].read())["step"] == 4
    )
    assert os.path.isdir(tmp_path / "other-node" / "downloads" / "s3" / s3_env.bucket / "runs/tiny/checkpoints/step-2")
