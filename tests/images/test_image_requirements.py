"""The images' pinned requirement files agree with pyproject.toml, and (opt-in, slow) install into a clean
virtual environment where the packages import and the entry points run.

The install tests create a fresh venv from exactly the files the Dockerfiles install (`pip install --no-deps -r`,
then the project itself), so a pin missing from the closure, a conflicting pin or an import-time dependency on
torch in the operator shows up here, not in an image build. They run with FTJ_TEST_IMAGE_REQUIREMENTS=1 (`make
image-requirements`); the trainer one downloads and unpacks the whole CUDA torch stack (several GB).
"""

from __future__ import annotations

import os
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_REQUIREMENTS = ROOT / "operator" / "requirements.txt"
TRAINER_REQUIREMENTS = ROOT / "trainer-image" / "requirements.txt"
OPT_IN = "FTJ_TEST_IMAGE_REQUIREMENTS"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(path: Path) -> dict[str, str]:
    """{canonical name: version} from a file of `name==version` lines; AssertionError on anything else."""
    out: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}:{number}: not an exact pin: {raw}"
        assert req.marker is None, f"{path.name}:{number}: markers are resolved when pinning: {raw}"
        assert not req.extras, f"{path.name}:{number}: extras are resolved when pinning: {raw}"
        name = canonicalize_name(req.name)
        assert name not in out, f"{path.name}:{number}: {req.name} pinned twice"
        out[name] = spec.version
    return out


@pytest.mark.parametrize(
    ("path", "extras"),
    [(OPERATOR_REQUIREMENTS, ()), (TRAINER_REQUIREMENTS, ("trainer",))],
    ids=["operator", "trainer"],
)
def test_every_pyproject_dependency_is_pinned_within_its_range(path: Path, extras: tuple[str, ...]) -> None:
    pinned = pins(path)
    wanted = [*PROJECT["dependencies"], *(d for extra in extras for d in PROJECT["optional-dependencies"][extra])]
    for line in wanted:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{path.relative_to(ROOT)} does not pin {req.name}; run python tests/images/pins.py"
        assert req.specifier.contains(Version(pinned[name]), prereleases=True), (
            f"{path.relative_to(ROOT)} pins {req.name}=={pinned[name]}, outside pyproject's {req}"
        )


def test_operator_pins_are_the_trainer_pins_of_the_shared_packages() -> None:
    # One environment was tested; the two images must not carry different versions of the same package.
    operator, trainer = pins(OPERATOR_REQUIREMENTS), pins(TRAINER_REQUIREMENTS)
    assert operator.keys() <= trainer.keys()
    assert {n: v for n, v in operator.items() if trainer[n] != v} == {}


def test_operator_pins_carry_nothing_only_the_trainer_needs() -> None:
    trainer_only = {canonicalize_name(Requirement(d).name) for d in PROJECT["optional-dependencies"]["trainer"]}
    base = {canonicalize_name(Requirement(d).name) for d in PROJECT["dependencies"]}
    assert (trainer_only - base) & pins(OPERATOR_REQUIREMENTS).keys() == set()


# -- opt-in: a clean install of each image's requirements -------------------------------------------------------


def _clean_venv(tmp_path: Path) -> Path:
    if os.environ.get(OPT_IN, "").strip().lower() not in {"1", "true", "yes"}:
        pytest.skip(f"installs an image's requirements into a fresh venv; set {OPT_IN}=1 (make image-requirements)")
    directory = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(directory)
    return directory / "bin" / "python"


def _run(python: Path, *args: str, timeout: float = 1800) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "FTJ_"))}
    proc = subprocess.run(
        [str(python), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout, check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}{proc.stderr[-8000:]}"
    )
    return proc.stdout


def _install_like_the_dockerfile(python: Path, requirements: Path) -> None:
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--requirement", str(requirements))
    # A non-editable build of the project (wheel), as `pip install --no-deps .` in the Dockerfile does.
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", str(ROOT))
    _run(python, "-m", "pip", "check")


def test_operator_requirements_install_in_a_clean_venv_without_torch(tmp_path: Path) -> None:
    python = _clean_venv(tmp_path)
    _install_like_the_dockerfile(python, OPERATOR_REQUIREMENTS)
    probe = (
        "import importlib.util, finetune_operator.handlers, finetune_operator.cli;"
        "assert importlib.util.find_spec('torch') is None, 'torch is installed'"
    )
    _run(python, "-c", probe)
    crd = _run(python, "-m", "finetune_operator", "crd")
    assert crd == (ROOT / "crds" / "finetune.dev_finetunejobs.yaml").read_text()


def test_trainer_requirements_install_in_a_clean_venv(tmp_path: Path) -> None:
    python = _clean_venv(tmp_path)
    _install_like_the_dockerfile(python, TRAINER_REQUIREMENTS)
    modules = [
        "torch",
        "transformers",
        "peft",
        "datasets",
        "accelerate",
        "bitsandbytes",
        "deepspeed",
        "safetensors",
        "boto3",
        "matplotlib",
        "pyarrow",
        "finetune_trainer.recipe",
        "finetune_trainer.launch",
        # The subpackages: a wheel carries only the packages pyproject lists (data and merge were once missing).
        "finetune_trainer.data",
        "finetune_trainer.merge",
    ]
    out = _run(python, "-c", f"import {', '.join(modules)}, torch; print(torch.__version__, torch.version.cuda)")
    torch_version, cuda = out.strip().splitlines()[-1].split()  # DeepSpeed prints its own notes first
    assert torch_version.split("+")[0] == pins(TRAINER_REQUIREMENTS)["torch"]
    assert cuda.split(".")[:2] == pins(TRAINER_REQUIREMENTS)["nvidia-cuda-runtime"].split(".")[:2]
    _run(python, "-m", "finetune_trainer", "--help")
    assert Path(python).with_name("torchrun").exists()  # the rendered pods' command
