"""Find the server binaries that ``tests/testbin/build.sh`` builds, and the Go module cache they came from.

The pinned versions live in ``tests/testbin/versions.env``; binaries live outside the repository in
``${FTJ_TESTBIN_DIR:-~/.cache/finetune-operator/testbin}/<component>-<version>/``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

TESTBIN_DIR_ENV = "FTJ_TESTBIN_DIR"
SOURCE_DIR = Path(__file__).resolve().parent.parent / "testbin"
BUILD_HINT = "bash tests/testbin/build.sh"

_VERSION_KEYS = {
    "etcd": "ETCD_VERSION",
    "kubernetes": "KUBERNETES_VERSION",
    "kubectl": "KUBECTL_VERSION",
    "kwok": "KWOK_VERSION",
    "training-operator": "TRAINING_OPERATOR_VERSION",
    "minio": "MINIO_VERSION",
    "helm": "HELM_VERSION",
    "trainer-v2": "TRAINER_V2_VERSION",
    "jobset": "JOBSET_VERSION",
}


class MissingBinaryError(RuntimeError):
    """A component is not built; the message says which and how to build it."""


@functools.cache
def versions() -> dict[str, str]:
    """The pinned version of each component, read from versions.env (``KEY=VALUE`` lines)."""
    values: dict[str, str] = {}
    for line in (SOURCE_DIR / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return {component: values[key] for component, key in _VERSION_KEYS.items()}


def cache_dir() -> Path:
    """Root of the binary cache (``FTJ_TESTBIN_DIR`` or the default under ``~/.cache``)."""
    configured = os.environ.get(TESTBIN_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "finetune-operator" / "testbin"


def component_dir(component: str) -> Path:
    """Directory holding one component at its pinned version."""
    return cache_dir() / f"{component}-{versions()[component]}"


def binary(component: str, name: str | None = None) -> Path:
    """Path of an executable of ``component`` (named ``name``, default the component), or MissingBinaryError."""
    directory = component_dir(component)
    path = directory / (name or component)
    if not (directory / ".complete").is_file() or not os.access(path, os.X_OK):
        go = "" if shutil.which("go") else " (and 'go' is not on PATH, which that needs)"
        raise MissingBinaryError(
            f"{component} {versions()[component]} is not built: {path} missing; run `{BUILD_HINT} {component}`{go}"
        )
    return path


def s5cmd() -> Path:
    """The s5cmd binary (``build.sh s5cmd``; the S3 benchmark's competitor, no test needs it), or MissingBinaryError.

    Its pin, ``S5CMD_VERSION``, is read from versions.env when that carries it, else from build.sh's default.
    """
    pattern = re.compile(r'^S5CMD_VERSION=(?:"\$\{S5CMD_VERSION:-)?([^"}\s]+)', re.MULTILINE)
    for source in ("versions.env", "build.sh"):
        found = pattern.search((SOURCE_DIR / source).read_text())
        if found:
            break
    if found is None:
        raise MissingBinaryError(f"no S5CMD_VERSION in {SOURCE_DIR}/versions.env or build.sh")
    path = cache_dir() / f"s5cmd-{found.group(1)}" / "s5cmd"
    if not (path.parent / ".complete").is_file() or not os.access(path, os.X_OK):
        raise MissingBinaryError(f"s5cmd {found.group(1)} is not built: {path} missing; run `{BUILD_HINT} s5cmd`")
    return path


def go_module_cache() -> Path:
    """The Go module cache (``go env GOMODCACHE``; the usual defaults when Go itself is not on PATH)."""
    go = shutil.which("go")
    if go:
        out = subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip())
    if os.environ.get("GOMODCACHE"):
        return Path(os.environ["GOMODCACHE"])
    gopath = os.environ.get("GOPATH", "").split(os.pathsep)[0] or str(Path.home() / "go")
    return Path(gopath) / "pkg" / "mod"


def training_operator_crd(kind_plural: str = "pytorchjobs") -> Path:
    """The upstream CRD manifest of a Kubeflow training operator job kind, read from the module cache."""
    return _module_file(
        "github.com/kubeflow/training-operator",
        "training-operator",
        f"manifests/base/crds/kubeflow.org_{kind_plural}.yaml",
    )


def _module_file(module: str, component: str, relative: str) -> Path:
    path = go_module_cache() / f"{module}@{versions()[component]}" / relative
    if not path.is_file():
        raise MissingBinaryError(f"{path} is not in the Go module cache; run `{BUILD_HINT} {component}`")
    return path


def trainer_v2_crds() -> list[Path]:
    """Kubeflow Trainer v2's CRDs (TrainJob, TrainingRuntime, ClusterTrainingRuntime) from the module cache."""
    return [
        _module_file(
            "github.com/kubeflow/trainer/v2", "trainer-v2", f"manifests/base/crds/trainer.kubeflow.org_{name}.yaml"
        )
        for name in ("trainjobs", "trainingruntimes", "clustertrainingruntimes")
    ]


def trainer_v2_runtime(name: str = "torch_distributed") -> Path:
    """An upstream ClusterTrainingRuntime manifest (manifests/base/runtimes/<name>.yaml)."""
    return _module_file("github.com/kubeflow/trainer/v2", "trainer-v2", f"manifests/base/runtimes/{name}.yaml")


def jobset_crd() -> Path:
    """JobSet's CRD from the module cache."""
    return _module_file("sigs.k8s.io/jobset", "jobset", "config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml")


def trainer_v2_webhooks() -> Path:
    """Trainer v2's webhook configurations (their services are replaced by URLs in the test control plane)."""
    return _module_file("github.com/kubeflow/trainer/v2", "trainer-v2", "manifests/base/webhook/manifests.yaml")


def jobset_webhooks() -> Path:
    """JobSet's webhook configurations."""
    return _module_file("sigs.k8s.io/jobset", "jobset", "config/components/webhook/manifests.yaml")
