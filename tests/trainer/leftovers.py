"""What a writer killed half way leaves in storage, made the way it happens: a real process killed while it streams
into local storage, and an S3 multipart upload created with a part sent and never completed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import finetune_trainer

_KILLED_WRITER = (
    "import os, sys\n"
    "from finetune_trainer.storage import LocalStorage\n"
    "writer = LocalStorage().open_writer(sys.argv[1])\n"
    "writer.write(b'half of it')\n"
    "os.kill(os.getpid(), 9)\n"
)


def kill_while_writing(uri: str) -> None:
    """Run a process that opens a writer of `uri` on local storage, writes into it and is SIGKILLed before the
    commit: its temporary file stays beside the destination."""
    package_root = Path(finetune_trainer.__file__).resolve().parent.parent
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, uri],
        env={**os.environ, "PYTHONPATH": str(package_root)},
        check=False,
    )
    assert killed.returncode == -9, f"the writer was meant to be killed, it exited {killed.returncode}"


def leave_upload(client: Any, bucket: str, key: str) -> str:
    """A multipart upload of `key` with one 1 MiB part sent, never completed nor aborted (no listing of objects
    shows it, yet the store keeps its parts); its upload id."""
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")["UploadId"]
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=os.urandom(1 << 20))
    return str(upload_id)


def uploads_of(client: Any, bucket: str, key: str) -> list[str]:
    """The unfinished multipart uploads of the object `key` (MinIO lists them per object: the prefix must be the
    key itself)."""
    listed = client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
    return [str(u["UploadId"]) for u in listed if u["Key"] == key]
