"""Live progress: one JSON log line per logging step, and (in a cluster) the FineTuneJob's status.

Global rank 0 owns a ProgressReporter. In a cluster (KUBERNETES_SERVICE_HOST set) it merge-patches the status
subresource of its own FineTuneJob with the Pod's service-account token, touching only the fields the trainer owns:
    status.progress         {step, totalSteps, epoch, loss, learningRate, evalLoss, tokensPerSecond, etaSeconds,
                             updatedAt, summary: "step/totalSteps"}
    status.checkpoints      [{step, uri, loss, time}], newest first, at most MAX_CHECKPOINT_RECORDS
    status.resumedFromStep  the step this run resumed from
    status.artifacts        {adapter | model, lossPlot} once the final outputs are uploaded
and, when the trainer fails, one condition of type TrainerFailed (reason = the error's reason, e.g. DataError),
written with the object's resourceVersion so that the operator's own conditions are never lost.
The job is named by FTJ_JOB_NAME / FTJ_NAMESPACE (else the config's jobName / namespace, else the service account's
namespace). Patches go out from a background thread, at most one every few seconds with the newest values, and a
failing API server never stops training.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from finetune_trainer.config import API_GROUP, API_VERSION, Progress

log = logging.getLogger(__name__)

PLURAL = "finetunejobs"
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_CHECKPOINT_RECORDS = 10
FAILURE_CONDITION = "TrainerFailed"


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class StatusClient:
    """Reads and merge-patches one FineTuneJob's status subresource."""

    def __init__(self, name: str, namespace: str, api_client: Any) -> None:
        from kubernetes import client

        self.name = name
        self.namespace = namespace
        self.api = client.CustomObjectsApi(api_client)

    @classmethod
    def in_cluster(
        cls, job_name: str | None, namespace: str | None, env: Mapping[str, str] | None = None
    ) -> StatusClient | None:
        """A client from the Pod's service account, or None outside a cluster (no KUBERNETES_SERVICE_HOST)."""
        env = os.environ if env is None else env
        if not env.get("KUBERNETES_SERVICE_HOST"):
            return None
        from kubernetes import client
        from kubernetes.config.incluster_config import InClusterConfigLoader

        token_dir = Path(env.get("FTJ_SERVICEACCOUNT_DIR", SERVICEACCOUNT_DIR))
        name = env.get("FTJ_JOB_NAME") or job_name
        ns = env.get("FTJ_NAMESPACE") or namespace
        if not ns and (token_dir / "namespace").is_file():
            ns = (token_dir / "namespace").read_text().strip()
        if not name or not ns or name == "local":
            log.warning("in a cluster but the FineTuneJob is unknown (set FTJ_JOB_NAME/FTJ_NAMESPACE): no status")
            return None
        configuration = client.Configuration()
        loader = InClusterConfigLoader(
            token_filename=str(token_dir / "token"), cert_filename=str(token_dir / "ca.crt"), environ=dict(env)
        )
        try:
            loader.load_and_set(configuration)
        except Exception as exc:  # e.g. no token mounted: train anyway, just without status reports
            log.warning("cannot use the service account in %s (%s): progress goes to the log only", token_dir, exc)
            return None
        return cls(name, ns, client.ApiClient(configuration))

    def patch(self, status: dict[str, Any], resource_version: str | None = None) -> None:
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        self.api.patch_namespaced_custom_object_status(API_GROUP, API_VERSION, self.namespace, PLURAL, self.name, body)

    def get(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.api.get_namespaced_custom_object_status(
            API_GROUP, API_VERSION, self.namespace, PLURAL, self.name
        )
        return obj


class ProgressReporter:
    """Rank 0's progress output: JSON lines on `stream` and, with a StatusClient, the FineTuneJob status."""

    def __init__(
        self,
        job_name: str,
        status: StatusClient | None = None,
        *,
        min_interval: float = 5.0,
        stream: TextIO | None = None,
    ) -> None:
        self.job_name = job_name
        self.status = status
        self.min_interval = min_interval
        self.stream = stream or sys.stdout
        self.progress = Progress()
        self.checkpoints: dict[int, dict[str, Any]] = {}
        self._pending: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._last_sent = 0.0
        self._warned = 0.0
        self._thread: threading.Thread | None = None
        if status is not None:
            self._thread = threading.Thread(target=self._send_loop, name="status-patch", daemon=True)
            self._thread.start()

    # -- what the training loop reports -------------------------------------------------------------------------

    def report(self, **fields: Any) -> Progress:
        """Update progress (Progress field names, snake_case), print one JSON line, queue a status patch."""
        data = self.progress.model_dump()
        data.update({k: v for k, v in fields.items() if v is not None})
        data["updated_at"] = now_rfc3339()
        total = data.get("total_steps")
        data["summary"] = f"{data['step']}/{total}" if total else str(data["step"])
        self.progress = Progress.model_validate(data)
        wire = self.progress.to_wire()
        self._print({"event": "progress", "job": self.job_name, **wire})
        self._queue({"progress": wire})
        return self.progress

    def resumed(self, step: int) -> None:
        self._print({"event": "resumed", "job": self.job_name, "resumedFromStep": step})
        self._queue({"resumedFromStep": step}, urgent=True)

    def seed_checkpoints(self, records: list[dict[str, Any]]) -> None:
        """Start from the checkpoints already in storage (after a restart), without reporting yet."""
        for record in records:
            self.checkpoints[int(record["step"])] = record

    def checkpoint(self, step: int, uri: str, loss: float | None, deleted: list[int] | tuple[int, ...] = ()) -> None:
        """A checkpoint became complete (and retention deleted `deleted`)."""
        for old in deleted:
            self.checkpoints.pop(old, None)
        record: dict[str, Any] = {"step": step, "uri": uri, "time": now_rfc3339()}
        if loss is not None:
            record["loss"] = loss
        self.checkpoints[step] = record
        newest = [self.checkpoints[s] for s in sorted(self.checkpoints, reverse=True)][:MAX_CHECKPOINT_RECORDS]
        self._print({"event": "checkpoint", "job": self.job_name, **record})
        self._queue({"checkpoints": newest}, urgent=True)

    def already_complete(self, output_uri: str) -> None:
        """The final outputs of an earlier attempt are complete: this one trains nothing (log line only)."""
        self._print({"event": "already-complete", "job": self.job_name, "output": output_uri})

    def artifacts(self, **uris: str) -> None:
        """Final outputs: adapter/model/lossPlot URIs."""
        wire = {_camel(k): v for k, v in uris.items() if v}
        self._print({"event": "artifacts", "job": self.job_name, **wire})
        self._queue({"artifacts": wire}, urgent=True)

    def failure(self, reason: str, message: str) -> None:
        """Report a failure as a TrainerFailed condition (optimistic concurrency on resourceVersion)."""
        self._print({"event": "failed", "job": self.job_name, "reason": reason, "message": message})
        if self.status is None:
            return
        self.flush()
        for _ in range(5):
            try:
                current = self.status.get()
                existing = (current.get("status") or {}).get("conditions") or []
                conditions = [c for c in existing if c.get("type") != FAILURE_CONDITION]
                conditions.append(
                    {
                        "type": FAILURE_CONDITION,
                        "status": "True",
                        "reason": reason,
                        "message": message[:30000],
                        "lastTransitionTime": now_rfc3339(),
                    }
                )
                self.status.patch({"conditions": conditions}, current["metadata"]["resourceVersion"])
                return
            except Exception as exc:
                if getattr(exc, "status", None) != 409:
                    log.warning("could not report the failure to the FineTuneJob status: %s", exc)
                    return

    def flush(self, timeout: float = 10.0) -> None:
        """Send what is pending now and wait for it (end of training, before exit)."""
        if self._thread is None:
            return
        with self._lock:
            self._last_sent = 0.0
        self._wake.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending and self._idle.is_set():
                    return
            self._wake.set()
            time.sleep(0.05)

    def close(self) -> None:
        self.flush()
        self._closed = True
        self._wake.set()

    # -- internals ---------------------------------------------------------------------------------------------

    def _print(self, record: dict[str, Any]) -> None:
        record = {"time": now_rfc3339(), **record}
        self.stream.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.stream.flush()

    def _queue(self, patch: dict[str, Any], urgent: bool = False) -> None:
        if self.status is None:
            return
        with self._lock:
            self._pending.update(patch)
            if urgent:
                self._last_sent = 0.0
        self._wake.set()

    def _send_loop(self) -> None:
        assert self.status is not None
        while not self._closed:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            with self._lock:
                due = self._pending and time.monotonic() - self._last_sent >= self.min_interval
                if not due:
                    continue
                patch, self._pending = self._pending, {}
                self._idle.clear()
            try:
                self.status.patch(patch)
            except Exception as exc:
                with self._lock:  # keep the newest values for the next try
                    self._pending = {**patch, **self._pending}
                if time.monotonic() - self._warned > 60:
                    log.warning("status patch of FineTuneJob %s failed: %s", self.status.name, exc)
                    self._warned = time.monotonic()
            finally:
                with self._lock:
                    self._last_sent = time.monotonic()
                self._idle.set()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)
