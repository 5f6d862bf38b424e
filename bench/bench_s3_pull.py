"""S3 pull and push throughput: the trainer's transfers against what users would pick instead (not a test).

Starts a real MinIO (tests/support, built by `bash tests/testbin/build.sh minio`) on loopback and, best and median
of --repeat runs each, alternating (the order rotates every round), into an empty directory / a fresh prefix every
time, in the same process:

Pull: a model-shaped prefix of about --size-gb (4 safetensors-like shards plus config/tokenizer files) uploaded once
with boto3's default settings (8 MiB multipart parts with CRC32 checksums, as `aws s3 cp` does), downloaded by
  * ours:  `S3Storage.download` (finetune_trainer.transfer: one pool across all files and parts, every part
           verified against its CRC32 (zlib-ng) and the object's composite checksum), as the trainer runs it into
           an emptyDir cache (no fsync: the directory dies with its node);
  * ours, durable: the same with each file fsynced before its rename, as into a cache on a PVC or a local disk;
  * ours with verification off (sizes only, no fsync), to show what the checksums cost;
  * s5cmd (Go, `bash tests/testbin/build.sh s5cmd`): `s5cmd --endpoint-url URL cp 's3://bucket/model/*' dest/`,
           its defaults (256 workers, 5 parts of 50 MiB at once per file; no checksum check, no fsync);
  * boto3-tm: every object through ONE boto3 TransferManager (`create_transfer_manager`, TransferConfig with
           max_concurrency=--workers, 8 MiB ranges; ranged downloads are not verified, no fsync);
  * boto3 `download_file` for each object in turn (default TransferConfig), the baseline of the earlier figures;
  * the disk: the same file sizes written from memory in 256 KiB writes from a 1 MiB buffer (the CPU's caches
    hold it; 8 MiB writes from a 64 MiB buffer ran at a sixth of the speed some runs), once with an fsync per
    file: the disk's sequential write speed, the ceiling of the summary line; and once without: the page cache
    only (memory speed, what s5cmd and boto3 leave their data in).
--compare-write-kib N adds ours verified with the downloader's file writes set to N KiB (1024 before 2026-12-01).
Before every run the page cache is written back and, where this process may (root), dropped: on the development
VM, writing into a page cache that first has to evict gigabytes of other files cost 2-3 client CPU s/GiB instead of
1.1 and made the same method vary by 2x between runs.
Each pull row also shows "+fsync": the same run until an fsync of every file it wrote has returned, so writeback
that a method leaves to the kernel counts too (ours fsyncs each file itself before renaming it).
Push: a checkpoint-shaped directory of about --push-size-gb (a few large files and the small ones a Hugging Face
checkpoint has) uploaded by
  * ours: `CheckpointUploader` (finetune_trainer.checkpoints: the path the trainer takes, `S3Storage.upload_dir`:
           4 files at a time, each read once for its sha256 (the node record) and CRC32 and sent in one PUT with
           that CRC32 as its checked checksum; files over 1 GiB through boto3 upload_file with 64 MiB parts and
           CRC32; payloads unsigned; the record and manifest written after);
  * ours, files only: the same pool of `S3Storage.upload_file` without digests (all through boto3 upload_file,
           payloads unsigned);
  * s5cmd: `s5cmd --endpoint-url URL cp dir/ s3://bucket/prefix/` (defaults: 50 MiB parts, 5 at once per file);
  * boto3-tm: `upload` of every file through one TransferManager (max_concurrency=--workers, 8 MiB parts, CRC32).
CPU is user+system seconds per GiB of this process and its finished children (s5cmd runs as one), from
resource.getrusage; MinIO's own CPU is read from /proc. MinIO and the client share this machine's CPUs, so the
absolute figures are bound by them. The last two lines are the summary:
    s3 push: ours X MiB/s, s5cmd Y, boto3-tm Z; ours/best-other R
    s3 pull: ours X MiB/s, s5cmd Y, boto3-tm Z, disk D; ours/best-other R
(best runs; ours = verified pull / the CheckpointUploader push; D = the disk's sequential write, fsync per file).

    ~/.cache/finetune-operator/venv/bin/python bench/bench_s3_pull.py [--size-gb 2] [--repeat 3] [--workers 16]
        [--push-size-gb 1] [--no-push] [--compare-write-kib 1024]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# This checkout's trainer, not whichever one the venv's editable install points at (as tests/conftest.py does).
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "trainer-image")]

from benchutil import drop_page_cache, process_cpu_seconds  # noqa: E402
from boto3.s3.transfer import TransferConfig, create_transfer_manager  # noqa: E402
from botocore.config import Config  # noqa: E402

from finetune_trainer import transfer as transfer_module  # noqa: E402
from finetune_trainer.checkpoints import CheckpointUploader  # noqa: E402
from finetune_trainer.config import StorageSpec  # noqa: E402
from finetune_trainer.distenv import Ranks  # noqa: E402
from finetune_trainer.storage import S3Storage, join_uri  # noqa: E402
from finetune_trainer.transfer import RangedDownloader, Transfer  # noqa: E402
from support import testbin  # noqa: E402
from support.s3 import MinioServer, S3Bucket  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
_BLOCK = os.urandom(64 * MiB)  # incompressible; repeated, since content does not matter to the transfers


def write_file(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        left = size
        while left:
            n = min(left, len(_BLOCK))
            handle.write(_BLOCK[:n])
            left -= n


def make_model(directory: Path, size: int) -> list[Path]:
    """Four equal shards plus the small files a Hugging Face model directory has."""
    directory.mkdir(parents=True)
    files = []
    for i in range(4):
        path = directory / f"model-0000{i + 1}-of-00004.safetensors"
        write_file(path, size // 4)
        files.append(path)
    for name, n in (("config.json", 700), ("tokenizer.json", 7 * MiB), ("tokenizer_config.json", 5000)):
        (directory / name).write_bytes(os.urandom(n))
        files.append(directory / name)
    return files


def make_checkpoint(directory: Path, size: int) -> list[Path]:
    """A checkpoint-<N>/ as the Hugging Face Trainer saves it: optimizer state (half), weight shards, small files."""
    directory.mkdir(parents=True)
    large = {
        "optimizer.pt": size // 2,
        "model-00001-of-00002.safetensors": size * 3 // 10,
        "model-00002-of-00002.safetensors": size // 5 - 8 * MiB,
        "tokenizer.json": 7 * MiB,
    }
    small = {
        "config.json": 700,
        "generation_config.json": 200,
        "model.safetensors.index.json": 24_000,
        "rng_state.pth": 14_000,
        "scheduler.pt": 1_100,
        "special_tokens_map.json": 600,
        "tokenizer_config.json": 5_000,
        "trainer_state.json": 6_000,
        "training_args.bin": 5_500,
    }
    for name, n in large.items():
        write_file(directory / name, n)
    for name, n in small.items():
        (directory / name).write_bytes(os.urandom(n))
    return sorted(directory.iterdir())


Run = tuple[float, float, float, float, float]  # wall s, wall s incl. settle, CPU s, CPU s incl. settle, MinIO CPU s


class Meter:
    """Wall seconds, client CPU seconds (this process and its finished children) and MinIO's CPU seconds; each also
    with `settle` (the pull: fsync every file written, so writeback a method leaves to the kernel is counted too)."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def _server_cpu(self) -> float:
        return process_cpu_seconds(self.server_pid)

    def measure(self, run: Callable[[], None], settle: Callable[[], None] | None = None) -> Run:
        def cpu() -> float:
            own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

        cpu0, server0, start = cpu(), self._server_cpu(), time.perf_counter()
        run()
        wall, cpu1, server1 = time.perf_counter() - start, cpu(), self._server_cpu()
        if settle is not None:
            settle()
        return wall, time.perf_counter() - start, cpu1 - cpu0, cpu() - cpu0, server1 - server0


def s5cmd_env(bucket: S3Bucket) -> dict[str, str]:
    return {**os.environ, **bucket.env()}


def run_s5cmd(s5cmd: Path, bucket: S3Bucket, *args: str) -> None:
    cmd = [str(s5cmd), "--endpoint-url", bucket.endpoint_url, *args]
    done = subprocess.run(cmd, env=s5cmd_env(bucket), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}{done.stdout[-2000:]}")


def disk_writer(sizes: dict[str, int], *, fsync: bool) -> Callable[[Path], None]:
    """The same files written from memory, in turn, 256 KiB at a time from a 1 MiB buffer."""
    block = memoryview(_BLOCK)[:MiB]
    piece = 256 * 1024

    def write(dest: Path) -> None:
        for name, size in sizes.items():
            fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                left, at = size, 0
                while left:
                    n = os.write(fd, block[at : at + min(left, piece)])
                    left, at = left - n, (at + n) % MiB
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    return write


def run_rounds(
    methods: dict[str, Callable[[], None]],
    repeat: int,
    meter: Meter,
    before: Callable[[str], None],
    after: Callable[[str], None],
    settle: Callable[[], None] | None = None,
) -> dict[str, list[Run]]:
    """Every method `repeat` times, the order rotating each round; `before`/`after` run outside the timing."""
    results: dict[str, list[Run]] = {name: [] for name in methods}
    names = list(methods)
    for round_ in range(repeat):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            before(name)
            results[name].append(meter.measure(methods[name], settle))
            after(name)
    return results


def report(title: str, total: int, results: dict[str, list[Run]], settled: str = "") -> dict[str, float]:
    """Print the table (with the `settled` columns when a settle step ran); return each method's best MiB/s."""
    print(f"\n{title}")
    extra = f" {'best ' + settled:>16} {'CPU ' + settled:>14}" if settled else ""
    print(f"{'method':52} {'best MiB/s':>10} {'median':>7} {'CPU s/GiB':>9}{extra} {'MinIO CPU s/GiB':>15}")
    best: dict[str, float] = {}
    gib = total / GiB
    for name, runs in results.items():
        rates = [total / MiB / run[0] for run in runs]
        best[name] = max(rates)
        line = f"{name:52} {max(rates):10.0f} {statistics.median(rates):7.0f} "
        line += f"{statistics.median(run[2] for run in runs) / gib:9.2f}"
        if settled:
            line += f" {max(total / MiB / run[1] for run in runs):16.0f}"
            line += f" {statistics.median(run[3] for run in runs) / gib:14.2f}"
        line += f" {statistics.median(run[4] for run in runs) / gib:15.2f}"
        print(line)
    return best


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="model size for the pull (GiB)")
    parser.add_argument("--push-size-gb", type=float, default=1.0, help="checkpoint size for the push (GiB)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=16, help="threads of ours and of boto3's TransferManager")
    parser.add_argument("--chunk-mib", type=int, default=16)
    parser.add_argument("--no-push", action="store_true", help="measure the pull only")
    parser.add_argument(
        "--compare-write-kib",
        type=int,
        default=0,
        help="also pull (verified) with the downloader's file writes of this size (1024: before 2026-12-01)",
    )
    args = parser.parse_args()

    s5cmd = testbin.s5cmd()
    version = subprocess.run([str(s5cmd), "version"], capture_output=True, text=True, check=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, {load()}; s5cmd {version}")
    dropped = drop_page_cache()
    print("page cache dropped before every run" if dropped else "page cache NOT dropped (not root): runs may vary")
    print(f"trainer code from {Path(transfer_module.__file__).parent}; file writes of {transfer_module._WRITE} bytes")

    work = Path(tempfile.mkdtemp(prefix="ftj-bench-s3-"))
    server = MinioServer.start(work / "minio")
    meter = Meter(server.pid)
    try:
        bucket = server.new_bucket()
        client = bucket.client()
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = bucket.access_key, bucket.secret_key
        # What a user's TransferManager would get: botocore's default checksum settings, enough connections.
        tm_client = bucket.client(config=Config(s3={"addressing_style": "path"}, max_pool_connections=args.workers + 4))
        tm_config = TransferConfig(max_concurrency=args.workers)
        spec = StorageSpec(endpoint=bucket.endpoint_url, region=bucket.region, addressing_style="path")
        storage = S3Storage(spec, workers=args.workers, chunk_size=args.chunk_mib * MiB)

        # The pull first, in the fresh process; the push's line is printed before it all the same.
        pull_line = pull(args, work, bucket, client, storage, tm_client, tm_config, s5cmd, meter)
        push_line = ""
        if not args.no_push:
            push_line = push(args, work, bucket, storage, tm_client, tm_config, s5cmd, meter)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print()
    if push_line:
        print(push_line)
    print(pull_line)


def pull(
    args: argparse.Namespace,
    work: Path,
    bucket: S3Bucket,
    client: Any,
    storage: S3Storage,
    tm_client: Any,
    tm_config: TransferConfig,
    s5cmd: Path,
    meter: Meter,
) -> str:
    files = make_model(work / "src", int(args.size_gb * GiB))
    total = sum(f.stat().st_size for f in files)

    def upload_model() -> None:
        for f in files:
            client.upload_file(str(f), bucket.bucket, f"model/{f.name}")

    wall = meter.measure(upload_model)[0]
    print(f"\npull: uploaded {len(files)} files, {total / MiB:.0f} MiB in {wall:.1f}s (boto3 defaults: 8 MiB parts)")
    shutil.rmtree(work / "src")

    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket.bucket, Prefix="model/")["Contents"]]
    listed = storage.list(bucket.uri("model/"))  # client and connection pool set up outside the timing
    sizes = {o.key: o.size for o in listed}
    # The same pool without verification (a client that leaves response checksums alone): what verifying costs.
    bare_client = bucket.client(
        config=Config(
            s3={"addressing_style": "path"},
            response_checksum_validation="when_required",
            max_pool_connections=args.workers + 4,
        )
    )
    dest = work / "dest"

    def ours() -> None:
        storage.download(bucket.uri("model/"), dest, durable=False)

    def ours_durable() -> None:
        storage.download(bucket.uri("model/"), dest, durable=True)

    def ours_unverified() -> None:
        transfers = [Transfer(bucket.bucket, f"model/{o.key}", dest / o.key, o.size, o.etag) for o in listed]
        downloader = RangedDownloader(
            bare_client, workers=args.workers, chunk_size=args.chunk_mib * MiB, verify=False, durable=False
        )
        downloader.run(transfers)

    def s5cmd_cp() -> None:
        run_s5cmd(s5cmd, bucket, "cp", f"s3://{bucket.bucket}/model/*", f"{dest}/")

    def boto3_tm() -> None:
        with create_transfer_manager(tm_client, tm_config) as manager:
            futures = [manager.download(bucket.bucket, k, str(dest / k.removeprefix("model/"))) for k in keys]
            for future in futures:
                future.result()

    def boto3_sequential() -> None:
        for key in keys:
            client.download_file(bucket.bucket, key, str(dest / key.removeprefix("model/")))

    methods: dict[str, Callable[[], None]] = {
        "ours (parts verified; emptyDir: no fsync)": ours,
        "ours, verification off": ours_unverified,
        "s5cmd cp (no checksum check)": s5cmd_cp,
        f"boto3-tm: one TransferManager, {args.workers} threads": boto3_tm,
        "boto3 download_file, file after file": boto3_sequential,
        "page cache: same files, 256 KiB writes, no fsync": lambda: disk_writer(sizes, fsync=False)(dest),
        "disk: same files, 256 KiB writes, fsync per file": lambda: disk_writer(sizes, fsync=True)(dest),
        "ours, durable (parts verified, fsync per file)": ours_durable,
    }
    if args.compare_write_kib:

        def ours_other_writes() -> None:
            saved = transfer_module._WRITE
            transfer_module._WRITE = args.compare_write_kib * 1024
            try:
                ours()
            finally:
                transfer_module._WRITE = saved

        methods[f"ours, parts verified, {args.compare_write_kib} KiB writes"] = ours_other_writes

    def before(name: str) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        drop_page_cache()  # nothing of the previous method's left to write back during this one

    def after(name: str) -> None:
        got = {p.name: p.stat().st_size for p in dest.rglob("*") if p.is_file()}
        assert got == sizes, f"{name}: got {got}, expected {sizes}"

    def fsync_all() -> None:
        for path in dest.iterdir():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    print(f"pull rounds start, {load()}")
    results = run_rounds(methods, args.repeat, meter, before, after, settle=fsync_all)
    shutil.rmtree(dest, ignore_errors=True)
    client.delete_objects(Bucket=bucket.bucket, Delete={"Objects": [{"Key": k} for k in keys]})
    best = report(
        f"pull: {total / MiB:.0f} MiB in {len(keys)} objects, {args.repeat} runs each, workers={args.workers}, "
        f"{load()}; '+fsync': the same run until an fsync of every file it wrote returned",
        total,
        results,
        settled="+fsync",
    )
    names = list(methods)
    ours_rate, s5, tm = best[names[0]], best[names[2]], best[names[3]]
    page_cache, disk = best[names[5]], best[names[6]]
    other = max(s5, tm, best[names[4]])
    print(
        f"ours verified: {ours_rate / disk:.0%} of the disk's sequential write (fsync per file), "
        f"{ours_rate / page_cache:.0%} of the page cache's"
    )
    durable = {name: max(total / MiB / run[1] for run in runs) for name, runs in results.items()}
    others = max(durable[n] for n in names[2:5])
    durable_rate = durable[names[7]]
    print(
        f"durable (until every file is on disk, '+fsync'): ours durable {durable_rate:.0f} MiB/s, "
        f"best other {others:.0f}; {durable_rate / others:.2f}x"
    )
    return (
        f"s3 pull: ours {ours_rate:.0f} MiB/s, s5cmd {s5:.0f}, boto3-tm {tm:.0f}, disk {disk:.0f}; "
        f"ours/best-other {ours_rate / other:.2f}"
    )


def push(
    args: argparse.Namespace,
    work: Path,
    bucket: S3Bucket,
    storage: S3Storage,
    tm_client: Any,
    tm_config: TransferConfig,
    s5cmd: Path,
    meter: Meter,
) -> str:
    local = work / "ckpt" / "checkpoint-1"
    files = make_checkpoint(local, int(args.push_size_gb * GiB))
    sizes = {f.name: f.stat().st_size for f in files}
    total = sum(sizes.values())
    print(f"\npush: checkpoint of {len(files)} files, {total / MiB:.0f} MiB")
    counter = iter(range(1_000_000))
    prefix = ""

    def ours() -> None:
        uploader = CheckpointUploader(storage, bucket.uri(prefix), Ranks(), keep=1000, keep_local=1000)
        try:
            uploader.submit(local, step=1)
            uploader.drain()
        finally:
            uploader.close()

    def ours_files_only() -> None:
        # The uploader's own pool (checkpoints.CheckpointUploader._upload) without the sha256 record.
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda n: storage.upload_file(local / n, join_uri(bucket.uri(prefix), n)), sizes))

    def s5cmd_cp() -> None:
        run_s5cmd(s5cmd, bucket, "cp", f"{local}/", bucket.uri(prefix))

    def boto3_tm() -> None:
        with create_transfer_manager(tm_client, tm_config) as manager:
            futures = [manager.upload(str(local / n), bucket.bucket, prefix + n) for n in sizes]
            for future in futures:
                future.result()

    methods: dict[str, Callable[[], None]] = {
        "ours: CheckpointUploader (CRC32 read with the sha256 record sent as the checksum)": ours,
        "ours, files only (S3Storage.upload_file, 4 at once)": ours_files_only,
        "s5cmd cp dir/ (50 MiB parts)": s5cmd_cp,
        f"boto3-tm: one TransferManager, {args.workers} threads": boto3_tm,
    }
    layout = {"ours": "checkpoints/step-1/"}

    def before(name: str) -> None:
        nonlocal prefix
        prefix = f"push/{next(counter)}/"
        os.sync()

    def after(name: str) -> None:
        where = prefix + (layout["ours"] if name.startswith("ours:") else "")
        got = {o.key: o.size for o in storage.list(bucket.uri(where)) if not o.key.startswith(".nodes/")}
        got.pop("manifest.json", None)
        assert got == sizes, f"{name}: got {got}, expected {sizes}"
        storage.delete_prefix(bucket.uri(prefix))

    print(f"push rounds start, {load()}")
    results = run_rounds(methods, args.repeat, meter, before, after)
    shutil.rmtree(local.parent, ignore_errors=True)
    best = report(
        f"push: {total / MiB:.0f} MiB in {len(files)} files, {args.repeat} runs each, {load()}", total, results
    )
    names = list(methods)
    ours_rate, s5, tm = best[names[0]], best[names[2]], best[names[3]]
    return (
        f"s3 push: ours {ours_rate:.0f} MiB/s, s5cmd {s5:.0f}, boto3-tm {tm:.0f}; "
        f"ours/best-other {ours_rate / max(s5, tm):.2f}"
    )


if __name__ == "__main__":
    main()
