"""A real S3 endpoint for tests: a MinIO server with random root credentials on a random loopback port."""

from __future__ import annotations

import os
import secrets
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from . import testbin
from .processes import ManagedProcess, free_port, wait_until

REGION = "us-east-1"


def _ready(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as response:
        return bool(response.status == 200)


@dataclass(frozen=True)
class S3Bucket:
    """One bucket on the test S3 endpoint, described the way the trainer receives it (endpoint URL and keys)."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    bucket: str

    def client(
        self, *, access_key: str | None = None, secret_key: str | None = None, config: Config | None = None
    ) -> Any:
        """A boto3 S3 client for this endpoint (path-style addressing); override keys to test bad credentials, or
        the botocore config (default: path-style, 2 attempts)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key if access_key is not None else self.access_key,
            aws_secret_access_key=secret_key if secret_key is not None else self.secret_key,
            region_name=self.region,
            config=config or Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def uri(self, key: str = "") -> str:
        """``s3://bucket/key`` for this bucket."""
        return f"s3://{self.bucket}/{key}"

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables a process needs to reach this bucket's endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }


class MinioServer:
    """A MinIO server process over a scratch directory; creates and removes buckets for tests."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.access_key = "ftj" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(24)
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.start_seconds = 0.0
        self._process: ManagedProcess | None = None

    @classmethod
    def start(cls, workdir: Path, timeout: float = 60) -> MinioServer:
        binary = testbin.binary("minio")
        server = cls(workdir)
        started = time.monotonic()
        env = {
            **os.environ,
            "MINIO_ROOT_USER": server.access_key,
            "MINIO_ROOT_PASSWORD": server.secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_REGION": REGION,
        }
        server._process = ManagedProcess(
            "minio",
            [
                binary,
                "server",
                workdir / "data",
                f"--address=127.0.0.1:{server.port}",
                f"--console-address=127.0.0.1:{free_port()}",
                f"--certs-dir={workdir / 'certs'}",
                "--quiet",
            ],
            workdir / "minio.log",
            env=env,
            cwd=workdir,
        ).start()
        try:
            wait_until(
                lambda: _ready(f"{server.endpoint_url}/minio/health/ready"),
                timeout=timeout,
                what="MinIO /minio/health/ready",
                watch=[server._process],
            )
        except BaseException:
            server.stop()
            raise
        server.start_seconds = time.monotonic() - started
        return server

    @property
    def pid(self) -> int:
        """The MinIO process's id (the benchmarks read its CPU time)."""
        assert self._process is not None, "MinIO was never started"
        return self._process.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "minio.log"

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()

    def new_bucket(self) -> S3Bucket:
        """Create an empty bucket with a random name."""
        bucket = S3Bucket(
            endpoint_url=self.endpoint_url,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=REGION,
            bucket=f"ftj-test-{secrets.token_hex(6)}",
        )
        bucket.client().create_bucket(Bucket=bucket.bucket)
        return bucket

    def remove_bucket(self, bucket: S3Bucket) -> None:
        """Delete every object in the bucket, then the bucket."""
        s3 = bucket.client()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket.bucket):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=bucket.bucket, Delete={"Objects": keys})
        s3.delete_bucket(Bucket=bucket.bucket)
