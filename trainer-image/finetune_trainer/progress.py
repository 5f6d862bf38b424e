"""Live progress: one JSON log line per logging step, and (in a cluster) the FineTuneJob's status.

Global rank 0 owns a ProgressReporter. In a cluster (KUBERNETES_SERVICE_HOST set) it writes its part of its own
FineTuneJob's status subresource with server-side apply (field manager `finetune-trainer`), using the Pod's
service-account token. The operator applies its own, disjoint part (phase, message, its conditions, children,
artifacts.adapter/model/merged, times) as `finetune-operator`; status.conditions is a map list keyed by `type`,
so each writer's conditions survive the other's applies. The trainer owns:
    status.progress         {step, totalSteps, epoch, loss, learningRate, evalLoss, tokensPerSecond, etaSeconds,
                             updatedAt, summary: "step/totalSteps"}
    status.checkpoints      [{step, uri, loss, time}], newest first, at most MAX_CHECKPOINT_RECORDS
    status.resumedFromStep  the step this run resumed from
    status.artifacts.lossPlot  once the loss plot has been written and uploaded
    status.artifacts.tensorboard  once TensorBoard's event files are uploaded (<output>/tensorboard/)
    status.artifacts.samples, status.sampleCount  once samples.jsonl is uploaded (output.samples)
    status.tracking         {wandb|mlflow|swanlab: link to the run} for the services that give one
    status.conditions[type=TrainerFailed]  when the trainer fails (reason = the error's reason, e.g. DataError)
An apply sets exactly the fields it carries for its manager (an owned field left out is removed), so the reporter
keeps all of them in memory and sends them all every time, seeded from the object when it starts: a restarted Pod
keeps the checkpoint list and progress of the attempts before it (an earlier attempt's TrainerFailed goes away).
The job is named by FTJ_JOB_NAME / FTJ_NAMESPACE (else the config's jobName / namespace, else the service account's
namespace) and FTJ_JOB_UID: every apply is conditional on the resourceVersion last seen, so nothing lands on a
FineTuneJob re-created under the same name (see StatusClient). Applies go out from a background thread, at most
one every few seconds with the newest values, and a failing API server never stops training.
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

from pydantic import ValidationError

from finetune_trainer.config import API_GROUP, API_VERSION, KIND, PLURAL, Progress
from finetune_trainer.kubeapi import request
from finetune_trainer.timefmt import now_rfc3339

log = logging.getLogger(__name__)

SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_CHECKPOINT_RECORDS = 10
FAILURE_CONDITION = "TrainerFailed"
# status.artifacts entries the trainer owns (the operator owns adapter, model and merged).
TRAINER_ARTIFACTS = ("lossPlot", "tensorboard", "samples")
FIELD_MANAGER = "finetune-trainer"
RETRY_SECONDS = 1.0  # after a failed apply
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"  # JSON is YAML: the body is sent as JSON


class JobReplacedError(Exception):
    """The FineTuneJob this run reports into was deleted and re-created under its name: the new object is another
    run's, and this run writes nothing into it."""


class StatusClient:
    """Reads one FineTuneJob's status subresource and server-side applies the trainer's part of it.

    Every apply carries the resourceVersion of the newest read or write as its precondition. On a conflict (the
    operator wrote in between) the object is read again and the apply redone, unless the object read is another one:
    a uid other than `uid` (FTJ_JOB_UID, else the uid of the first read) raises JobReplacedError, so an old run's Pod
    never writes its progress into the FineTuneJob that GitOps re-created under the same name."""

    def __init__(self, name: str, namespace: str, api_client: Any, uid: str | None = None) -> None:
        self.name = name
        self.namespace = namespace
        self.api_client = api_client
        self.uid = uid
        self.resource_version: str | None = None

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
        return cls(name, ns, client.ApiClient(configuration), uid=env.get("FTJ_JOB_UID") or None)

    @property
    def path(self) -> str:
        return f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{self.namespace}/{PLURAL}/{self.name}/status"

    def apply(self, status: dict[str, Any]) -> None:
        """Server-side apply `status` as the trainer's whole part of the status (force: the trainer alone writes
        these fields; forcing takes them over from an older trainer's merge patches)."""
        from kubernetes.client.rest import ApiException

        if self.resource_version is None:
            self.get()
        try:
            self._apply(status)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.get()  # raises JobReplacedError when the name now holds another object
            self._apply(status)

    def _apply(self, status: dict[str, Any]) -> None:
        metadata = {"name": self.name, "namespace": self.namespace, "resourceVersion": self.resource_version}
        body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": metadata, "status": status}
        # The generated patch_namespaced_custom_object_status always sends merge-patch; apply needs its own type.
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        headers = {"Content-Type": APPLY_CONTENT_TYPE, "Accept": "application/json"}
        self._track(request(self.api_client, "PATCH", self.path, query, headers, body))

    def get(self) -> dict[str, Any]:
        obj: dict[str, Any] = request(self.api_client, "GET", self.path, [], {"Accept": "application/json"})
        self._track(obj)
        return obj

    def _track(self, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        uid = meta.get("uid")
        if self.uid is None:
            self.uid = uid
        elif uid != self.uid:
            raise JobReplacedError(
                f"FineTuneJob {self.namespace}/{self.name} is now another object (uid {uid}; this run's is "
                f"{self.uid}): it was deleted and re-created, so this run reports no more status into it"
            )
        self.resource_version = meta.get("resourceVersion")


class ProgressReporter:
    """Rank 0's progress output: JSON lines on `stream` and, with a StatusClient, the trainer's part of the
    FineTuneJob status (kept whole in memory, see the module docstring)."""

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
        self.resumed_from: int | None = None
        self.trainer_artifacts: dict[str, str] = {}  # TRAINER_ARTIFACTS, camelCase
        self.sample_count: int | None = None
        self.tracking_links: dict[str, str] = {}
        self.conditions: dict[str, dict[str, Any]] = {}
        self._reported: set[str] = set()  # owned fields set by this process (seeding never overrides them)
        self._seeded = False
        self._dirty = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._last_sent = 0.0
        self._failing = False
        self._flush_until = 0.0
        self._warned = 0.0
        self._thread: threading.Thread | None = None
        if status is not None:
            self._thread = threading.Thread(target=self._send_loop, name="status-apply", daemon=True)
            self._thread.start()

    # -- what the training loop reports -------------------------------------------------------------------------

    def report(self, **fields: Any) -> Progress:
        """Update progress (Progress field names, snake_case), print one JSON line, queue a status apply."""
        with self._lock:
            data = self.progress.model_dump()
            data.update({k: v for k, v in fields.items() if v is not None})
            data["updated_at"] = now_rfc3339()
            total = data.get("total_steps")
            data["summary"] = f"{data['step']}/{total}" if total else str(data["step"])
            self.progress = Progress.model_validate(data)
            self._reported.add("progress")
            wire = self.progress.to_wire()
        self._print({"event": "progress", "job": self.job_name, **wire})
        self._changed()
        return self.progress

    def resumed(self, step: int) -> None:
        with self._lock:
            self.resumed_from = step
            self._reported.add("resumedFromStep")
        self._print({"event": "resumed", "job": self.job_name, "resumedFromStep": step})
        self._changed(urgent=True)

    def seed_checkpoints(self, records: list[dict[str, Any]]) -> None:
        """Start from the complete checkpoints in storage (after a restart): they replace whatever the status
        listed, since storage is the truth (retention may have deleted some since)."""
        with self._lock:
            self.checkpoints = {int(r["step"]): r for r in records}
            self._reported.add("checkpoints")
        self._changed()

    def checkpoint(self, step: int, uri: str, loss: float | None, deleted: list[int] | tuple[int, ...] = ()) -> None:
        """A checkpoint became complete (and retention deleted `deleted`)."""
        record: dict[str, Any] = {"step": step, "uri": uri, "time": now_rfc3339()}
        if loss is not None:
            record["loss"] = loss
        with self._lock:
            for old in deleted:
                self.checkpoints.pop(old, None)
            self.checkpoints[step] = record
            self._reported.add("checkpoints")
        self._print({"event": "checkpoint", "job": self.job_name, **record})
        self._changed(urgent=True)

    def already_complete(self, output_uri: str) -> None:
        """The final outputs of an earlier attempt are complete: this one trains nothing (log line only)."""
        self._print({"event": "already-complete", "job": self.job_name, "output": output_uri})

    def artifacts(self, **uris: str) -> None:
        """Outputs (adapter/model/lossPlot/tensorboard/samples URIs) for the log; of these the trainer's status part
        holds TRAINER_ARTIFACTS: the operator reports the adapter or model once the workload succeeded."""
        wire = {_camel(k): v for k, v in uris.items() if v}
        self._print({"event": "artifacts", "job": self.job_name, **wire})
        owned = {k: v for k, v in wire.items() if k in TRAINER_ARTIFACTS}
        if owned:
            with self._lock:
                self.trainer_artifacts.update(owned)
                self._reported.update(owned)
            self._changed(urgent=True)

    def samples(self, count: int) -> None:
        """The number of rows in samples.jsonl (status.sampleCount)."""
        with self._lock:
            self.sample_count = count
            self._reported.add("sampleCount")
        self._print({"event": "samples", "job": self.job_name, "sampleCount": count})
        self._changed(urgent=True)

    def tracking(self, links: dict[str, str]) -> None:
        """Links to this run in the tracking services (status.tracking)."""
        with self._lock:
            self.tracking_links.update(links)
            self._reported.add("tracking")
        self._print({"event": "tracking", "job": self.job_name, **links})
        self._changed(urgent=True)

    def failure(self, reason: str, message: str) -> None:
        """Report a failure as the TrainerFailed condition and wait (briefly) until it is applied."""
        self._print({"event": "failed", "job": self.job_name, "reason": reason, "message": message})
        condition = {
            "type": FAILURE_CONDITION,
            "status": "True",
            "reason": reason,
            "message": message[:30000],
            "lastTransitionTime": now_rfc3339(),
        }
        with self._lock:
            self.conditions[FAILURE_CONDITION] = condition
        self._changed(urgent=True)
        self.flush()

    def owned_status(self) -> dict[str, Any]:
        """Every status field the trainer owns, as applied (fields it has no value for are left out)."""
        with self._lock:
            status: dict[str, Any] = {}
            if "progress" in self._reported:
                status["progress"] = self.progress.to_wire()
            if self.checkpoints:
                newest = sorted(self.checkpoints, reverse=True)[:MAX_CHECKPOINT_RECORDS]
                status["checkpoints"] = [self.checkpoints[s] for s in newest]
            if self.resumed_from is not None:
                status["resumedFromStep"] = self.resumed_from
            if self.trainer_artifacts:
                status["artifacts"] = dict(self.trainer_artifacts)
            if self.sample_count is not None:
                status["sampleCount"] = self.sample_count
            if self.tracking_links:
                status["tracking"] = dict(self.tracking_links)
            if self.conditions:
                status["conditions"] = list(self.conditions.values())
            return status

    def seed(self, current: Mapping[str, Any]) -> None:
        """Take the trainer's fields from the object's current status (`current` = the object), except those this
        process has reported already and an earlier attempt's failure (this attempt is running again)."""
        found = current.get("status") or {}
        with self._lock:
            if "progress" not in self._reported and isinstance(found.get("progress"), dict):
                try:
                    self.progress = Progress.model_validate(found["progress"])
                    self._reported.add("progress")
                except ValidationError as exc:
                    log.info("not keeping the unreadable status.progress: %s", exc)
            if "checkpoints" not in self._reported and isinstance(found.get("checkpoints"), list):
                for record in found["checkpoints"]:
                    if isinstance(record, dict) and isinstance(record.get("step"), int):
                        self.checkpoints[record["step"]] = record
            if "resumedFromStep" not in self._reported and isinstance(found.get("resumedFromStep"), int):
                self.resumed_from = found["resumedFromStep"]
            artifacts = found.get("artifacts") or {}
            for name in TRAINER_ARTIFACTS:
                if name not in self._reported and isinstance(artifacts.get(name), str):
                    self.trainer_artifacts[name] = artifacts[name]
            if "sampleCount" not in self._reported and isinstance(found.get("sampleCount"), int):
                self.sample_count = found["sampleCount"]
            links = found.get("tracking")
            if "tracking" not in self._reported and isinstance(links, dict):
                self.tracking_links = {str(k): str(v) for k, v in links.items()}
            self._seeded = True

    def flush(self, timeout: float = 10.0) -> None:
        """Send what is pending now and wait for it (a failure, the end of training, before exit)."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        with self._lock:
            self._flush_until = deadline
        while time.monotonic() < deadline:
            with self._lock:
                if (not self._dirty or self._closed) and self._idle.is_set():
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

    def _changed(self, urgent: bool = False) -> None:
        if self.status is None:
            return
        with self._lock:
            self._dirty = True
            if urgent:
                self._last_sent = 0.0
        self._wake.set()

    def _due(self) -> bool:
        if not self._dirty:
            return False
        now = time.monotonic()
        wait = RETRY_SECONDS if self._failing else 0.0 if now < self._flush_until else self.min_interval
        return now - self._last_sent >= wait

    def _send_loop(self) -> None:
        assert self.status is not None
        while not self._closed:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            with self._lock:
                if not self._due():
                    continue
                self._dirty = False
                self._idle.clear()
            try:
                if not self._seeded:
                    # Before the first apply: an apply without the checkpoints an earlier Pod listed would drop them.
                    self.seed(self.status.get())
                self.status.apply(self.owned_status())
                self._failing = False
            except JobReplacedError as exc:
                log.warning("%s", exc)
                self._closed = True
            except Exception as exc:
                with self._lock:  # try again with the newest values
                    self._dirty = True
                    self._failing = True
                if time.monotonic() - self._warned > 60:
                    log.warning("status apply of FineTuneJob %s failed: %s", self.status.name, exc)
                    self._warned = time.monotonic()
            finally:
                with self._lock:
                    self._last_sent = time.monotonic()
                self._idle.set()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)
