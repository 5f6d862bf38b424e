"""The one table of URI schemes: validation and its messages, the CRD pattern derived from it, splitting, local paths,
mounts and which I/O code opens each scheme."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.crd import custom_resource_definition
from finetune_trainer import config, schemes
from finetune_trainer.storage import LocalStorage, S3Storage, StorageError, Uri, open_storage

ACCEPTED = {
    "s3": ["s3://models/qwen/", "s3://data.bucket-1/train.json", "s3://abc", "s3://runs/demo/checkpoints/step-10/"],
    "pvc": ["pvc://models", "pvc://models/qwen/", "pvc://a/x.json", "pvc://shared-data/runs/", "pvc://" + "a" * 253],
    "hf": ["hf://gpt2", "hf://Qwen/Qwen2.5-0.5B", "hf://org/name@v1.0", "hf://org/name@refs/pr/1", "hf://org/name/"],
    "file": ["file:///abs/path", "file:///data/train.jsonl", "file://relative/dir"],
}

# (scheme, URI): malformed URIs of a known scheme.
REFUSED = [
    ("s3", "s3://B/x.json"),
    ("s3", "s3://ab"),
    ("s3", "s3://-bucket/x"),
    ("s3", "s3://bucket_name/x"),
    ("pvc", "pvc://Models/x"),
    ("pvc", "pvc://claim-/x"),
    ("pvc", "pvc:///x"),
    ("pvc", "pvc://"),
    ("pvc", "pvc://my_claim/x"),
    ("pvc", "pvc://" + "a" * 254),
    ("hf", "hf://org/name/extra"),
    ("hf", "hf://-org/name"),
    ("hf", "hf://org/name@"),
    ("hf", "hf://org name"),
    ("hf", "hf://"),
    ("file", "file://"),
]


def _accepted() -> list[tuple[str, str]]:
    return [(scheme, uri) for scheme, uris in ACCEPTED.items() for uri in uris]


def _crd_patterns() -> set[str]:
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("pattern", "").startswith("^(s3://"):
                found.add(node["pattern"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(custom_resource_definition())
    return found


def test_every_scheme_has_examples() -> None:
    assert set(ACCEPTED) == set(schemes.NAMES) == {s for s, _ in REFUSED}
    assert schemes.NAMES == ("s3", "pvc", "hf", "file")
    assert config.SCHEMES == schemes.NAMES


@pytest.mark.parametrize(("scheme", "uri"), _accepted())
def test_accepted(scheme: str, uri: str) -> None:
    assert schemes.check_uri(uri) == uri
    assert config.check_uri(uri) == uri
    assert schemes.scheme_of(uri) is schemes.BY_NAME[scheme]


@pytest.mark.parametrize(("scheme", "uri"), REFUSED)
def test_refused_with_a_message_naming_the_value(scheme: str, uri: str) -> None:
    hint = schemes.BY_NAME[scheme].hint
    with pytest.raises(ValueError, match=re.escape(f"malformed {scheme} URI {uri!r}: expected {hint}")):
        schemes.check_uri(uri)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3:/x", "must start with one of s3://, pvc://, hf://, file://, got 's3:/x'"),
        ("models/qwen", "must start with one of s3://, pvc://, hf://, file://, got 'models/qwen'"),
        ("ftp://host/model", "unsupported scheme 'ftp://' in 'ftp://host/model'; use one of s3, pvc, hf, file"),
    ],
)
def test_no_or_unknown_scheme(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        schemes.check_uri(uri)


def test_the_hints_are_the_documented_ones() -> None:
    assert {s.name: s.hint for s in schemes.REGISTRY} == {
        "s3": "s3://<bucket>/<key> with a valid bucket name",
        "pvc": "pvc://<claim>/<path> with a DNS-1123 claim name",
        "hf": "hf://<org>/<name>[@revision]",
        "file": "file://<path>",
    }


def test_the_crd_pattern_is_the_join_of_the_table() -> None:
    assert _crd_patterns() == {schemes.URI_PATTERN}
    assert config.URI_PATTERN == schemes.URI_PATTERN
    joined = "|".join(s.regex for s in schemes.REGISTRY)
    assert f"^({joined})$" == schemes.URI_PATTERN


def test_the_committed_crd_carries_the_tables_pattern() -> None:
    crd_file = Path(__file__).resolve().parents[2] / "crds" / "finetune.dev_finetunejobs.yaml"
    lines = [line.strip() for line in crd_file.read_text().splitlines() if "pattern: ^(s3://" in line]
    assert lines
    assert {line.removeprefix("pattern: ") for line in lines} == {schemes.URI_PATTERN}


@pytest.mark.parametrize(("scheme", "uri"), _accepted())
def test_the_crd_pattern_accepts_what_check_uri_accepts(scheme: str, uri: str) -> None:
    (pattern,) = _crd_patterns()
    assert re.match(pattern, uri)
    assert config.URI_RE.match(uri)


@pytest.mark.parametrize(
    "uri", [uri for _, uri in REFUSED] + ["s3:/x", "ftp://host/model", "models/qwen", "S3://bucket/x"]
)
def test_the_crd_pattern_refuses_what_check_uri_refuses(uri: str) -> None:
    (pattern,) = _crd_patterns()
    assert not re.match(pattern, uri)
    with pytest.raises(ValueError, match=re.escape(repr(uri))):
        schemes.check_uri(uri)


@pytest.mark.parametrize(
    ("uri", "parts"),
    [
        ("s3://bucket/a/b.json", ("bucket", "a/b.json")),
        ("s3://bucket", ("bucket", "")),
        ("pvc://models/qwen/", ("models", "qwen/")),
        ("hf://Qwen/Qwen2.5-0.5B", ("Qwen/Qwen2.5-0.5B", "")),
        ("hf://org/name@refs/pr/1", ("org/name", "refs/pr/1")),
        ("hf://org/name/", ("org/name", "")),
        ("hf://gpt2", ("gpt2", "")),
        ("file:///abs/path", ("", "/abs/path")),
    ],
)
def test_split(uri: str, parts: tuple[str, str]) -> None:
    assert schemes.split(uri) == parts


def test_part_names() -> None:
    assert {s.name: s.parts for s in schemes.REGISTRY} == {
        "s3": ("bucket", "key"),
        "pvc": ("claim", "path"),
        "hf": ("repository", "revision"),
        "file": ("", "path"),
    }


def test_local_paths_in_the_pod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(schemes.PVC_ROOT_ENV, raising=False)
    assert LocalStorage().path("pvc://models/qwen/config.json") == Path("/mnt/pvc/models/qwen/config.json")
    assert LocalStorage().path("file:///data/x.json") == Path("/data/x.json")
    monkeypatch.setenv(schemes.PVC_ROOT_ENV, str(tmp_path))
    assert LocalStorage().path("pvc://models/qwen") == tmp_path / "models" / "qwen"
    assert [s.name for s in schemes.REGISTRY if s.is_local] == ["pvc", "file"]


def test_handlers_and_mounts() -> None:
    assert {s.name: s.handler for s in schemes.REGISTRY} == {"s3": "s3", "pvc": "local", "hf": "hub", "file": "local"}
    assert [s.name for s in schemes.REGISTRY if s.volume is not None] == ["pvc"]
    pvc = schemes.BY_NAME["pvc"]
    assert schemes.mount(pvc, "models", True) == (
        {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
        {"name": "pvc-models", "mountPath": "/mnt/pvc/models", "readOnly": True},
    )
    assert schemes.mount(pvc, "x" * 100, False)[0]["name"] == ("pvc-" + "x" * 100)[:63]
    with pytest.raises(ValueError, match="s3:// URIs are not mounted"):
        schemes.mount(schemes.BY_NAME["s3"], "bucket", True)


def test_open_storage_follows_the_handler() -> None:
    assert isinstance(open_storage("s3://bucket/x"), S3Storage)
    assert isinstance(open_storage("pvc://claim/x"), LocalStorage)
    assert isinstance(open_storage("file:///x"), LocalStorage)
    with pytest.raises(StorageError, match=re.escape("'hf://org/name': hf:// sources are read-only")):
        open_storage("hf://org/name")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://x/y", "unsupported storage URI 'ftp://x/y': expected s3://, pvc://, file:// or hf://"),
        ("no-scheme", "unsupported storage URI 'no-scheme': expected s3://, pvc://, file:// or hf://"),
        ("file://rel/x", "file URI must hold an absolute path (file:///...), got 'file://rel/x'"),
        ("s3:///key", "storage URI 's3:///key' has no bucket/claim/repository name"),
        ("pvc://", "storage URI 'pvc://' has no bucket/claim/repository name"),
    ],
)
def test_storage_messages(uri: str, message: str) -> None:
    with pytest.raises(StorageError, match=re.escape(message)):
        Uri.parse(uri)


def test_local_and_s3_refuse_each_others_uris() -> None:
    with pytest.raises(StorageError, match=re.escape("'s3://b/x' is not a local URI (file:// or pvc://)")):
        LocalStorage().path("s3://b/x")
    with pytest.raises(StorageError, match=re.escape("'pvc://c/x' is not an s3:// URI")):
        S3Storage._split("pvc://c/x")


def test_the_registry_imports_without_the_training_stack() -> None:
    code = (
        "import sys; import finetune_trainer.schemes; "
        "bad = {'torch', 'boto3', 'pydantic'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
