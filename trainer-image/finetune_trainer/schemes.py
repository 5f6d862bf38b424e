"""The storage URI schemes, in one table: how each is validated, split, resolved in a Pod, mounted and opened.

Every place that handles a URI goes through this table: config.py validates with it (and the CRD's `pattern` is the
join of its regexes), storage.py and cache.py pick their I/O code by an entry's `handler`, merge/remote.py asks it
what is local, and the operator's render.py mounts the volumes it names. A new scheme is one entry here plus, when
it needs new I/O, its handler in storage.py (or cache.py for read-only sources).

It imports nothing beyond the standard library: the operator image has neither torch nor boto3.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

# Which I/O code serves a scheme: S3Storage, LocalStorage (storage.py), or the Hugging Face Hub (cache.py, read-only).
Handler = Literal["s3", "local", "hub"]

PVC_ROOT_ENV = "FTJ_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"


def pvc_root() -> Path:
    """Where the claims are mounted in this Pod: FTJ_PVC_ROOT, else the operator's DEFAULT_PVC_ROOT."""
    return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))


@dataclass(frozen=True)
class Volume:
    """What the operator mounts for a scheme's URIs: one volume per root (claim), named `<scheme>-<root>`, at
    `<mount_root>/<root>`. Read-only when only inputs (model, datasets) use it and `inputs_read_only`; read-write
    when an output does."""

    mount_root: str
    source: Callable[[str, bool], dict[str, Any]]  # (root, read_only) -> the Pod volume's source
    inputs_read_only: bool = True


@dataclass(frozen=True)
class Scheme:
    """One URI scheme. `regex` matches a whole URI (without ^...$); `split` turns what follows "://" into the two
    parts named by `parts` (a root part named "" means the scheme has none: the rest is a path)."""

    name: str
    regex: str
    hint: str
    parts: tuple[str, str]
    split: Callable[[str], tuple[str, str]]
    handler: Handler
    # (root, path) of the URI's location -> the path inside the Pod; None when the scheme is not local.
    local_path: Callable[[str, str], Path] | None = None
    volume: Volume | None = None

    @property
    def prefix(self) -> str:
        return f"{self.name}://"

    @cached_property
    def compiled(self) -> re.Pattern[str]:
        return re.compile(f"^{self.regex}$")

    @property
    def rooted(self) -> bool:
        """Whether the first path segment names a bucket, claim or repository (s3, pvc, hf; not file)."""
        return bool(self.parts[0])

    @property
    def is_local(self) -> bool:
        """Whether the URI is a path in the Pod's file system (no download needed)."""
        return self.local_path is not None


def _first_segment(rest: str) -> tuple[str, str]:
    root, _, path = rest.partition("/")
    return root, path


def _repo_revision(rest: str) -> tuple[str, str]:
    repo, _, revision = rest.rstrip("/").partition("@")
    return repo, revision


def _whole_path(rest: str) -> tuple[str, str]:
    return "", rest


def _pvc_path(claim: str, path: str) -> Path:
    return pvc_root() / claim / path


def _file_path(_root: str, path: str) -> Path:
    return Path(path)


def _pvc_source(claim: str, read_only: bool) -> dict[str, Any]:
    return {"persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}


REGISTRY: tuple[Scheme, ...] = (
    Scheme(
        name="s3",
        regex=r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?",
        hint="s3://<bucket>/<key> with a valid bucket name",
        parts=("bucket", "key"),
        split=_first_segment,
        handler="s3",
    ),
    Scheme(
        name="pvc",
        # A DNS-1123 subdomain-ish claim name (at most 253 characters), then an optional path.
        regex=r"pvc://[a-z0-9]([a-z0-9\-]{0,251}[a-z0-9])?(/.*)?",
        hint="pvc://<claim>/<path> with a DNS-1123 claim name",
        parts=("claim", "path"),
        split=_first_segment,
        handler="local",
        local_path=_pvc_path,
        volume=Volume(mount_root=DEFAULT_PVC_ROOT, source=_pvc_source),
    ),
    Scheme(
        name="hf",
        regex=r"hf://[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9_.\-]+)?(@[A-Za-z0-9_.\-/]+)?/?",
        hint="hf://<org>/<name>[@revision]",
        parts=("repository", "revision"),
        split=_repo_revision,
        handler="hub",
    ),
    Scheme(
        name="file",
        regex=r"file://.+",
        hint="file://<path>",
        parts=("", "path"),
        split=_whole_path,
        handler="local",
        local_path=_file_path,
    ),
)

BY_NAME: dict[str, Scheme] = {s.name: s for s in REGISTRY}
NAMES: tuple[str, ...] = tuple(BY_NAME)
# The CRD's pattern: every entry's regex, so the API server and check_uri cannot disagree on what is accepted.
URI_PATTERN = "^(" + "|".join(s.regex for s in REGISTRY) + ")$"


def get(name: str) -> Scheme | None:
    """The entry for a scheme name ("s3"), or None."""
    return BY_NAME.get(name)


def scheme_of(uri: str) -> Scheme | None:
    """The entry for `uri`'s scheme, or None when it has no "://" or an unknown scheme."""
    name, sep, _ = uri.partition("://")
    return BY_NAME.get(name) if sep else None


def split(uri: str) -> tuple[str, str]:
    """`uri`'s two parts (bucket/key, claim/path, repository/revision, ""/path); ValueError for an unknown scheme."""
    scheme = scheme_of(uri)
    if scheme is None:
        raise ValueError(f"unsupported URI {uri!r}")
    return scheme.split(uri.partition("://")[2])


def check_uri(value: str) -> str:
    """Accept s3://bucket/key, pvc://claim/path, hf://org/name and file://path; name the bad value otherwise."""
    name, sep, _ = value.partition("://")
    if not sep:
        raise ValueError(f"must start with one of {', '.join(s.prefix for s in REGISTRY)}, got {value!r}")
    scheme = BY_NAME.get(name)
    if scheme is None:
        raise ValueError(f"unsupported scheme {name + '://'!r} in {value!r}; use one of {', '.join(NAMES)}")
    if not scheme.compiled.match(value):
        raise ValueError(f"malformed {name} URI {value!r}: expected {scheme.hint}")
    return value


def mount(scheme: Scheme, root: str, read_only: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Pod volume and the container's volumeMount for `root` (a claim) of a scheme that has a Volume."""
    if scheme.volume is None:
        raise ValueError(f"{scheme.prefix} URIs are not mounted")
    name = f"{scheme.name}-{root}"[:63]
    volume = {"name": name, **scheme.volume.source(root, read_only)}
    return volume, {"name": name, "mountPath": f"{scheme.volume.mount_root}/{root}", "readOnly": read_only}
