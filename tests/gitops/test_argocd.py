"""Argo CD: the FineTuneJob health check (Lua, run as Argo CD runs it) and the two example Applications.

Argo CD evaluates health checks with gopher-lua, a Lua 5.1: here the Lua runs in lupa's Lua 5.1 runtime with
the libraries Argo CD leaves out (io, os, require, ...) removed, gets the object as the global `obj`, and must
return {status=, message=}. The sample FineTuneJobs carry status exactly as the operator writes it
(finetune_operator.status.operator_status), one per phase of the API.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api import PHASES, validate_document
from finetune_operator.status import Observation, operator_status
from support.requirements import unavailable

ROOT = Path(__file__).resolve().parents[2]
ARGOCD = ROOT / "examples" / "argocd"
HEALTH_KEY = "resource.customizations.health.finetune.dev_FineTuneJob"
ARGO_HEALTH = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
EXPECTED = {
    "Pending": "Progressing",
    "Initializing": "Progressing",
    "Running": "Progressing",
    "Merging": "Progressing",
    "Succeeded": "Healthy",
    "Failed": "Degraded",
    "Suspended": "Suspended",
}


def health_lua() -> str:
    config = yaml.safe_load((ARGOCD / "argocd-cm-finetunejob-health.yaml").read_text())
    assert config["kind"] == "ConfigMap"
    assert config["metadata"]["name"] == "argocd-cm"
    lua: str = config["data"][HEALTH_KEY]
    return lua


@pytest.fixture(scope="module")
def lua51() -> Any:
    try:
        from lupa import lua51  # type: ignore[import-untyped]
    except ImportError:
        unavailable("lupa (with its Lua 5.1 runtime) is not installed: pip install 'lupa>=2.8' (the [dev] extra)")
    return lua51


def health(lua51: Any, obj: dict[str, Any]) -> dict[str, str]:
    """Run the health check on ``obj`` as Argo CD does; its {status, message}."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    sandbox = runtime.globals()
    for name in ("io", "os", "require", "package", "debug", "dofile", "loadfile", "load", "loadstring"):
        sandbox[name] = None  # not available to Argo CD health checks
    sandbox.obj = runtime.table_from(obj, recursive=True)
    result = runtime.execute(health_lua())
    out = {key: result[key] for key in ("status", "message")}
    assert out["status"] in ARGO_HEALTH, out
    assert isinstance(out["message"], str), out
    return out


def finetunejob(phase: str | None, message: str = "", generation: int = 1, **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "llm", "namespace": "ml-team", "generation": generation},
        "spec": {"model": {"uri": "s3://models/base/"}},
    }
    if phase is not None:
        written = operator_status(None, Observation(phase, "Reason", message or f"{phase} message"), generation)
        obj["status"] = {**written, **status}
    return obj


def test_every_phase_of_the_api_has_an_expected_health() -> None:
    assert set(EXPECTED) == set(PHASES)


@pytest.mark.parametrize("phase", PHASES)
def test_phase_maps_to_argo_cd_health(lua51: Any, phase: str) -> None:
    result = health(lua51, finetunejob(phase, message=f"the {phase} message"))
    assert result == {"status": EXPECTED[phase], "message": f"the {phase} message"}


def test_failed_job_is_degraded_with_the_operators_reason(lua51: Any) -> None:
    message = "container pytorch in pod llm-0-abcde ran out of memory (exit 137); raise resources.limits.memory"
    assert health(lua51, finetunejob("Failed", message)) == {"status": "Degraded", "message": message}


def test_job_without_status_is_progressing(lua51: Any) -> None:
    result = health(lua51, finetunejob(None))
    assert result["status"] == "Progressing"
    assert "finetune-operator" in result["message"]


def test_running_job_reports_step_and_loss(lua51: Any) -> None:
    progress = {"step": 120, "totalSteps": 1000, "loss": 1.234567, "epoch": 0.4}
    result = health(lua51, finetunejob("Running", "2 node(s) training", progress=progress))
    assert result == {"status": "Progressing", "message": "2 node(s) training (step 120/1000, loss 1.235)"}


def test_running_job_before_its_first_step_reports_only_the_message(lua51: Any) -> None:
    result = health(lua51, finetunejob("Running", "2 node(s) training", progress={"totalSteps": 1000}))
    assert result == {"status": "Progressing", "message": "2 node(s) training"}


def test_spec_change_the_operator_has_not_seen_is_progressing(lua51: Any) -> None:
    # Resumed in git (suspend: false), status still says Suspended from the previous generation.
    stale = finetunejob("Suspended", generation=2, observedGeneration=1)
    result = health(lua51, stale)
    assert result["status"] == "Progressing"
    assert "generation 2" in result["message"]


def test_finished_jobs_keep_their_health_after_a_spec_change(lua51: Any) -> None:
    # Terminal phases stick (the operator stops updating them); a later TTL edit must not make them Progressing.
    assert health(lua51, finetunejob("Succeeded", generation=3, observedGeneration=2))["status"] == "Healthy"
    assert health(lua51, finetunejob("Failed", generation=3, observedGeneration=2))["status"] == "Degraded"


def test_unknown_phase_is_unknown(lua51: Any) -> None:
    obj = finetunejob("Running")
    obj["status"]["phase"] = "Exploded"
    assert health(lua51, obj) == {"status": "Unknown", "message": "unknown phase Exploded"}


def test_install_docs_show_the_health_check_as_shipped() -> None:
    docs = (ROOT / "docs" / "install.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", docs, re.S) if HEALTH_KEY in b]
    assert blocks, f"docs/install.md shows no argocd-cm snippet with {HEALTH_KEY}"
    assert all(b["data"][HEALTH_KEY] == health_lua() for b in blocks)


def applications() -> dict[str, dict[str, Any]]:
    apps = {}
    for path in sorted(ARGOCD.glob("*.application.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert doc["apiVersion"] == "argoproj.io/v1alpha1"
        assert doc["kind"] == "Application"
        apps[doc["metadata"]["name"]] = doc
    return apps


def test_there_is_an_application_for_the_chart_and_one_for_finetunejobs() -> None:
    apps = applications()
    assert set(apps) == {"finetune-operator", "finetunejobs"}
    for app in apps.values():
        source = app["spec"]["source"]
        assert (ROOT / source["path"]).is_dir(), f"{app['metadata']['name']}: {source['path']} is not in this repo"
        assert app["spec"]["destination"]["namespace"]
        assert "CreateNamespace=true" in app["spec"]["syncPolicy"]["syncOptions"]


def test_chart_application_values_render_with_the_real_chart(helm: Any) -> None:
    app = applications()["finetune-operator"]
    source = app["spec"]["source"]
    objects = helm.template(
        ROOT / source["path"],
        release=source["helm"]["releaseName"],
        namespace=app["spec"]["destination"]["namespace"],
        values=source["helm"]["valuesObject"],
    )
    assert any(o["kind"] == "Deployment" for o in objects)


def test_finetunejobs_application_folder_holds_only_valid_finetunejobs() -> None:
    app = applications()["finetunejobs"]
    folder = ROOT / app["spec"]["source"]["path"]
    files = sorted(folder.rglob("*.yaml"))
    assert files
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] == "FineTuneJob", path
            assert "namespace" not in doc["metadata"], f"{path}: the Application's destination sets the namespace"
            run_policy = doc["spec"].get("runPolicy") or {}
            assert "ttlSecondsAfterFinished" not in run_policy, f"{path}: selfHeal would re-create and re-run it"
            job, errors = validate_document(doc)
            assert errors == [], path
            assert job is not None
