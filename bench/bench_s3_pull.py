"""S3 pull throughput: the trainer's downloader against boto3 `download_file` file after file (not a test).

Starts a real MinIO (tests/support, built by `bash tests/testbin/build.sh minio`), uploads a model-shaped prefix of
about --size-gb (safetensors-like shards plus config/tokenizer files) with boto3's default upload settings (8 MiB
multipart parts, as `aws s3 cp` does), then downloads it alternately with
  * boto3: `client.download_file` for each object in turn, default TransferConfig (10 threads, 8 MiB ranges);
  * ours:  `S3Storage.download` (finetune_trainer.transfer: one pool across all files and parts, every part
           verified against its CRC32 and the object's composite checksum);
  * ours with verification off, to show what the checksums cost;
best and median of --repeat runs each, into a fresh directory every time. Both read what MinIO has in the page
cache, on the same loopback, in the same process, so the comparison is like for like; absolute numbers are bound by
this machine's CPUs (MinIO and the client share them).

    ~/.cache/finetune-operator/venv/bin/python bench/bench_s3_pull.py [--size-gb 2] [--repeat 3] [--workers 16]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402

from finetune_trainer.config import StorageSpec  # noqa: E402
from finetune_trainer.storage import S3Storage  # noqa: E402
from finetune_trainer.transfer import RangedDownloader, Transfer  # noqa: E402
from support.s3 import MinioServer  # noqa: E402

MiB = 1024 * 1024


def make_model(directory: Path, size: int) -> list[Path]:
    """Four equal shards plus the small files a Hugging Face model directory has."""
    directory.mkdir(parents=True)
    block = os.urandom(64 * MiB)  # incompressible; repeated, since content does not matter to the transfer
    shard = size // 4
    files = []
    for i in range(4):
        path = directory / f"model-0000{i + 1}-of-00004.safetensors"
        with open(path, "wb") as handle:
            left = shard
            while left:
                n = min(left, len(block))
                handle.write(block[:n])
                left -= n
        files.append(path)
    for name, n in (("config.json", 700), ("tokenizer.json", 7 * MiB), ("tokenizer_config.json", 5000)):
        (directory / name).write_bytes(os.urandom(n))
        files.append(directory / name)
    return files


def timed(run: Callable[[], None]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process, all threads) of `run`."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--chunk-mib", type=int, default=16)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ftj-bench-s3-"))
    server = MinioServer.start(work / "minio")
    try:
        bucket = server.new_bucket()
        client = bucket.client()
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = bucket.access_key, bucket.secret_key
        files = make_model(work / "src", int(args.size_gb * 1024 * MiB))
        total = sum(f.stat().st_size for f in files)
        wall, _ = timed(lambda: [client.upload_file(str(f), bucket.bucket, f"model/{f.name}") for f in files])
        print(f"uploaded {len(files)} files, {total / MiB:.0f} MiB in {wall:.1f}s (boto3 defaults: 8 MiB parts)")
        shutil.rmtree(work / "src")

        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket.bucket, Prefix="model/")["Contents"]]
        spec = StorageSpec(endpoint=bucket.endpoint_url, region=bucket.region, addressing_style="path")
        storage = S3Storage(spec, workers=args.workers, chunk_size=args.chunk_mib * MiB)
        storage.list(bucket.uri("model/"))  # client and connection pool set up outside the timing

        def boto3_sequential(dest: Path) -> None:
            for key in keys:
                target = dest / key.removeprefix("model/")
                client.download_file(bucket.bucket, key, str(target))

        def ours(dest: Path) -> None:
            storage.download(bucket.uri("model/"), dest)

        # The same pool without verification (a client that leaves response checksums alone): what verifying costs.
        bare_client = boto3.session.Session().client(
            "s3",
            endpoint_url=bucket.endpoint_url,
            aws_access_key_id=bucket.access_key,
            aws_secret_access_key=bucket.secret_key,
            region_name=bucket.region,
            config=Config(
                s3={"addressing_style": "path"},
                response_checksum_validation="when_required",
                max_pool_connections=args.workers + 4,
            ),
        )
        listed = storage.list(bucket.uri("model/"))

        def ours_unverified(dest: Path) -> None:
            transfers = [Transfer(bucket.bucket, f"model/{o.key}", dest / o.key, o.size, o.etag) for o in listed]
            RangedDownloader(bare_client, workers=args.workers, chunk_size=args.chunk_mib * MiB, verify=False).run(
                transfers
            )

        methods: dict[str, Callable[[Path], None]] = {
            "ours (parts verified)": ours,
            "ours, verification off": ours_unverified,
            "boto3 download_file, file after file": boto3_sequential,
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
        for _ in range(args.repeat):
            for name, fn in methods.items():
                dest = work / "dest"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir()
                results[name].append(timed(lambda fn=fn, dest=dest: fn(dest)))  # type: ignore[misc]
                got = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
                assert got == total, f"{name}: {got} of {total} bytes"

        print(f"\n{total / MiB:.0f} MiB in {len(keys)} objects, {args.repeat} runs each, workers={args.workers}")
        print(f"{'method':40} {'best MiB/s':>11} {'median MiB/s':>13} {'CPU s/GiB':>10}")
        for name, runs in results.items():
            rates = [total / MiB / wall for wall, _ in runs]
            cpu = statistics.median(c for _, c in runs) / (total / 1024 / MiB)
            print(f"{name:40} {max(rates):11.0f} {statistics.median(rates):13.0f} {cpu:10.2f}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
