"""Run identity: which run an output location belongs to, so that a job never resumes, or reports as its own, the
checkpoints or final outputs of another run that used the same output.uri.

Every checkpoint manifest, node record and final manifest carries a `run` record: the run fingerprint
(finetune_trainer.config.run_fingerprint, over the run-defining part of the TrainerConfig) and, for the message a
person reads, the FineTuneJob's namespace, name and uid. Before training, the output is checked: a record with
another fingerprint fails the job at once (OutputInUseError, a permanent failure). The same fingerprint under another
name or uid is the same run (a FineTuneJob deleted and re-applied by GitOps resumes). Records of trainers older than
run identity have no fingerprint; they count as this run's, as they did before.

The FineTuneJob is named by FTJ_JOB_NAME / FTJ_NAMESPACE / FTJ_JOB_UID (else the config's jobName / namespace; the
uid is optional).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_trainer.checkpoints import MANIFEST, NODES_DIR, list_checkpoints, step_uri
from finetune_trainer.config import TrainerConfig, run_fingerprint
from finetune_trainer.errors import OutputInUseError
from finetune_trainer.storage import Storage, join_uri

log = logging.getLogger(__name__)

SHORT = 12  # fingerprint characters shown in messages


@dataclass(frozen=True)
class RunIdentity:
    """This run's fingerprint and the FineTuneJob that runs it."""

    fingerprint: str
    job: str
    namespace: str | None = None
    uid: str | None = None

    @classmethod
    def of(cls, config: TrainerConfig, env: Mapping[str, str] | None = None) -> RunIdentity:
        env = os.environ if env is None else env
        return cls(
            fingerprint=run_fingerprint(config),
            job=env.get("FTJ_JOB_NAME") or config.job_name,
            namespace=env.get("FTJ_NAMESPACE") or config.namespace,
            uid=env.get("FTJ_JOB_UID") or None,
        )

    def record(self) -> dict[str, Any]:
        """The `run` entry of a manifest."""
        out: dict[str, Any] = {"fingerprint": self.fingerprint, "job": self.job}
        if self.namespace:
            out["namespace"] = self.namespace
        if self.uid:
            out["uid"] = self.uid
        return out


def describe(record: Mapping[str, Any]) -> str:
    """`FineTuneJob ns/name (uid …), run fingerprint abcdef012345`, from a manifest's `run` record."""
    name = "/".join(str(p) for p in (record.get("namespace"), record.get("job")) if p) or "an unnamed job"
    uid = f" (uid {record['uid']})" if record.get("uid") else ""
    return f"FineTuneJob {name}{uid}, run fingerprint {str(record.get('fingerprint', ''))[:SHORT]}"


def _read(storage: Storage, uri: str) -> dict[str, Any] | None:
    raw = storage.read_bytes(uri)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def check_record(identity: RunIdentity, output_uri: str, where: str, document: Mapping[str, Any] | None) -> None:
    """Raise OutputInUseError if `document` (a manifest or node record found at `where`) belongs to another run."""
    if document is None:
        return
    record = document.get("run")
    if not isinstance(record, dict) or not record.get("fingerprint"):
        log.info("%s has no run fingerprint (written by an older trainer): taking it as this run's", where)
        return
    if record["fingerprint"] == identity.fingerprint:
        return
    this = describe(identity.record())
    raise OutputInUseError(
        f"output.uri {output_uri} already holds another run: {where} was written by {describe(record)}; this is "
        f"{this}, and its run-defining spec differs. Set another output.uri, or delete that run's outputs under "
        f"{output_uri} (checkpoints/ and manifest.json) if they are no longer needed."
    )


def check_checkpoints(storage: Storage, output_uri: str, identity: RunIdentity) -> None:
    """Every checkpoint under <output>/checkpoints/ belongs to this run: the manifest of each complete one, and one
    node record of each incomplete one (a run that stopped before its first checkpoint completed)."""
    listing = list_checkpoints(storage, output_uri)
    for step in sorted(listing.files, reverse=True):
        uri = step_uri(output_uri, step)
        if step in listing.complete:
            check_record(identity, output_uri, join_uri(uri, MANIFEST), _read(storage, join_uri(uri, MANIFEST)))
            continue
        records = sorted(p for p in listing.files[step] if p.startswith(NODES_DIR + "/"))
        if records:
            check_record(identity, output_uri, join_uri(uri, records[0]), _read(storage, join_uri(uri, records[0])))
