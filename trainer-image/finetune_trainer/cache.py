"""The node-local download cache: one process per node fetches a URI, the others wait for it on the file system.

Local rank 0 downloads into `<cache_dir>/<scheme>/<bucket>/<key>` and then writes a completion marker; the other
local ranks poll for that marker with a bounded wait. Waiting on the file system rather than on a
torch.distributed barrier keeps a long download (tens of GB) clear of NCCL/gloo collective timeouts, and works
before any process group exists. The marker records what was fetched (keys, sizes, ETags), so a restarted container
on the same node re-lists the source and fetches only what is missing or changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from finetune_trainer import schemes
from finetune_trainer.distenv import Ranks
from finetune_trainer.storage import LocalStorage, ObjectInfo, Storage, StorageError, Uri, replace_atomically

log = logging.getLogger(__name__)

DEFAULT_WAIT_SECONDS = 6 * 3600.0
_POLL_SECONDS = 1.0


class NodeCache:
    """Resolve URIs to local paths, downloading remote ones once per node."""

    def __init__(
        self,
        root: Path,
        storage_for: Callable[[str], Storage],
        ranks: Ranks | None = None,
        *,
        wait_seconds: float | None = None,
        durable: bool = True,
    ) -> None:
        self.root = root
        self.durable = durable  # fsync downloads (a cache that outlives its node)
        self.storage_for = storage_for
        self.ranks = ranks or Ranks.from_env()
        env_wait = os.environ.get("FTJ_DOWNLOAD_WAIT_SECONDS")
        self.wait_seconds = wait_seconds if wait_seconds is not None else float(env_wait or DEFAULT_WAIT_SECONDS)
        # Markers older than this job's launch belong to an earlier container: a waiter must not take an old
        # "done" (rank 0 may be re-fetching a changed source) nor report an old failure.
        self._launched = launch_time()

    def path_for(self, uri: str) -> Path:
        parsed = Uri.parse(uri)
        return self.root / parsed.scheme / parsed.root / parsed.path.strip("/")

    def _marker(self, uri: str, kind: str) -> Path:
        digest = hashlib.sha256(uri.encode()).hexdigest()[:24]
        return self.root / ".markers" / f"{digest}.{kind}"

    def fetch(self, uri: str) -> Path:
        """A local path holding `uri`: the path itself for a local scheme (file://, pvc://), else a node-local copy.
        For a single object the path of the file, for a prefix the directory."""
        parsed = Uri.parse(uri)
        if parsed.entry.is_local:
            path = LocalStorage().path(uri)
            if not path.exists():
                raise StorageError(f"{uri} does not exist (looked at {path})")
            return path
        if self.ranks.is_local_main:
            return self._download(uri)
        return self._wait(uri)

    # -- local rank 0 ------------------------------------------------------------------------------------------

    def _download(self, uri: str) -> Path:
        done, failed = self._marker(uri, "done"), self._marker(uri, "failed")
        done.parent.mkdir(parents=True, exist_ok=True)
        failed.unlink(missing_ok=True)
        try:
            if Uri.parse(uri).entry.handler == "hub":
                path, objects = self._download_hf(uri), list[ObjectInfo]()
            else:
                path, objects = self._download_storage(uri, done)
        except Exception as exc:
            _write_json(failed, {"uri": uri, "error": str(exc)})
            raise
        record = {"uri": uri, "path": str(path), "time": time.time(), "objects": [_info(o) for o in objects]}
        _write_json(done, record)
        return path

    def _download_storage(self, uri: str, done: Path) -> tuple[Path, list[ObjectInfo]]:
        storage = self.storage_for(uri)
        dest = self.path_for(uri)
        objects = storage.list(uri)
        if not objects:
            raise StorageError(f"nothing found at {uri}")
        single = len(objects) == 1 and objects[0].key == ""
        target_dir = dest.parent if single else dest
        previous = _read_json(done) or {}
        recorded = previous.get("objects")
        previous_etags = {
            str(o["key"]): o.get("etag")
            for o in (recorded if isinstance(recorded, list) else [])
            if isinstance(o, dict)
        }
        for obj in objects:
            # The source changed since the last download: drop the stale copy so it is fetched again.
            local = target_dir / (obj.key or dest.name)
            if obj.key in previous_etags and previous_etags[obj.key] != obj.etag:
                local.unlink(missing_ok=True)
        done.unlink(missing_ok=True)
        storage.download(uri, target_dir, objects, durable=self.durable)
        return dest, objects

    def _download_hf(self, uri: str) -> Path:
        # hf://org/name[@revision]: needs internet access from the Pod; not reachable from the test machine.
        from huggingface_hub import snapshot_download

        repo, revision = schemes.split(uri)
        try:
            local = snapshot_download(repo_id=repo, revision=revision or None, cache_dir=str(self.root / "hf"))
        except Exception as exc:
            raise StorageError(f"cannot download {uri} from the Hugging Face Hub: {exc}") from exc
        return Path(local)

    # -- other local ranks -------------------------------------------------------------------------------------

    def _wait(self, uri: str) -> Path:
        done, failed = self._marker(uri, "done"), self._marker(uri, "failed")
        deadline = time.monotonic() + self.wait_seconds
        announced = False
        while True:
            record = _read_json(done)
            if record is not None and "path" in record and float(str(record.get("time", 0))) >= self._launched:
                return Path(str(record["path"]))
            if failed.exists() and failed.stat().st_mtime >= self._launched:
                error = (_read_json(failed) or {}).get("error", "unknown error")
                raise StorageError(f"local rank 0 failed to download {uri}: {error}")
            if time.monotonic() > deadline:
                raise StorageError(
                    f"gave up after {self.wait_seconds:.0f}s waiting for local rank 0 to download {uri} "
                    f"(FTJ_DOWNLOAD_WAIT_SECONDS)"
                )
            if not announced:
                log.info("local rank %d waiting for local rank 0 to download %s", self.ranks.local_rank, uri)
                announced = True
            time.sleep(_POLL_SECONDS)


def launch_time() -> float:
    """When the torchrun agent (this process's parent) started, from /proc; all local ranks share it."""
    try:
        stat = Path(f"/proc/{os.getppid()}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime in clock ticks after boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line[:5] == "btime")
        return boot + ticks / os.sysconf("SC_CLK_TCK") - 1.0
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time() - 60.0


def _info(obj: ObjectInfo) -> dict[str, object]:
    return {"key": obj.key, "size": obj.size, "etag": obj.etag}


def _write_json(path: Path, data: dict[str, object]) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(data)))


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
