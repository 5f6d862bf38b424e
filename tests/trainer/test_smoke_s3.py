"""Smoke tests proving the test S3 endpoint is a real S3 server: multipart upload, listing, ranged reads, and
requests refused for wrong keys, missing credentials, and valid credentials without a grant (AccessDenied)."""

from __future__ import annotations

import io
import json
import os

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from support.s3 import S3Bucket

MiB = 1024 * 1024


def test_uploaded_object_is_listed_and_read_back_with_ranged_gets(s3: S3Bucket) -> None:
    data = os.urandom(12 * MiB + 123)
    client = s3.client()
    # Small parts force a real multipart upload.
    client.upload_fileobj(
        io.BytesIO(data),
        s3.bucket,
        "runs/r1/adapter.safetensors",
        Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB),
    )
    client.put_object(Bucket=s3.bucket, Key="runs/r1/metrics.json", Body=b"{}")

    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix="runs/r1/")
    assert {o["Key"]: o["Size"] for o in listed["Contents"]} == {
        "runs/r1/adapter.safetensors": len(data),
        "runs/r1/metrics.json": 2,
    }
    head = client.head_object(Bucket=s3.bucket, Key="runs/r1/adapter.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: three parts

    for byte_range, expected in (
        ("bytes=0-99", data[:100]),
        (f"bytes={5 * MiB - 10}-{5 * MiB + 9}", data[5 * MiB - 10 : 5 * MiB + 10]),
        ("bytes=-123", data[-123:]),
    ):
        part = client.get_object(Bucket=s3.bucket, Key="runs/r1/adapter.safetensors", Range=byte_range)
        assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert part["Body"].read() == expected
    assert part["ContentRange"] == f"bytes {len(data) - 123}-{len(data) - 1}/{len(data)}"


@pytest.mark.parametrize(
    ("access_key", "secret_key", "expected_code"),
    [
        pytest.param(None, "not-the-secret", "SignatureDoesNotMatch", id="wrong-secret"),
        pytest.param("unknown-key", "not-the-secret", "InvalidAccessKeyId", id="unknown-access-key"),
    ],
)
def test_wrong_credentials_are_refused(
    s3: S3Bucket, access_key: str | None, secret_key: str, expected_code: str
) -> None:
    s3.client().put_object(Bucket=s3.bucket, Key="secret.txt", Body=b"x")
    intruder = s3.client(access_key=access_key, secret_key=secret_key)

    with pytest.raises(ClientError) as excinfo:
        intruder.get_object(Bucket=s3.bucket, Key="secret.txt")

    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert excinfo.value.response["Error"]["Code"] == expected_code


def test_request_without_credentials_is_access_denied(s3: S3Bucket) -> None:
    s3.client().put_object(Bucket=s3.bucket, Key="secret.txt", Body=b"x")
    anonymous = boto3.session.Session().client(
        "s3", endpoint_url=s3.endpoint_url, region_name=s3.region, config=Config(signature_version=UNSIGNED)
    )

    with pytest.raises(ClientError) as excinfo:
        anonymous.get_object(Bucket=s3.bucket, Key="secret.txt")

    assert excinfo.value.response["Error"]["Code"] == "AccessDenied"


def test_credentials_not_granted_an_object_get_access_denied(s3: S3Bucket) -> None:
    owner = s3.client()
    owner.put_object(Bucket=s3.bucket, Key="public/readme.txt", Body=b"hello")
    owner.put_object(Bucket=s3.bucket, Key="secret.txt", Body=b"x")
    # Valid temporary credentials whose session policy only grants reading public/ in this bucket.
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [f"arn:aws:s3:::{s3.bucket}/public/*"]}
        ],
    }
    sts = boto3.session.Session().client(
        "sts",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        region_name=s3.region,
    )
    credentials = sts.assume_role(
        RoleArn="arn:minio:iam:::role/ftj-test",
        RoleSessionName="ftj-test",
        Policy=json.dumps(policy),
        DurationSeconds=900,
    )["Credentials"]
    limited = boto3.session.Session().client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"],
        region_name=s3.region,
        config=Config(s3={"addressing_style": "path"}),
    )

    assert limited.get_object(Bucket=s3.bucket, Key="public/readme.txt")["Body"].read() == b"hello"
    with pytest.raises(ClientError) as excinfo:
        limited.get_object(Bucket=s3.bucket, Key="secret.txt")
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert excinfo.value.response["Error"]["Code"] == "AccessDenied"
