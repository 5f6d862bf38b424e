"""Fixtures for the chart tests: the real Helm CLI (from tests/testbin) and operator logs in failure reports.

The chart's RBAC tests reuse the operator lifecycle scenarios of tests/controlplane (test_operator_lifecycle.py and
its helpers in ftjtest.py), so that directory is importable from here as it is from its own tests.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from support.helm import Helm

ROOT = Path(__file__).resolve().parents[2]
_CONTROLPLANE_TESTS = str(ROOT / "tests" / "controlplane")
if _CONTROLPLANE_TESTS not in sys.path:
    sys.path.append(_CONTROLPLANE_TESTS)


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The pinned helm binary with an isolated home; a loud skip (a failure under FTJ_REQUIRE_REAL=1) if unbuilt."""
    from support.helm import available

    return available(tmp_path_factory.mktemp("helm-home"))


@pytest.fixture
def attach_log(request: pytest.FixtureRequest) -> Callable[[str, Path], None]:
    """Show a file (an operator log) in this test's report if it fails, via tests/conftest.py's mechanism."""
    root = request.config.pluginmanager.get_plugin(str(ROOT / "tests" / "conftest.py"))

    def attach(title: str, path: Path) -> None:
        if root is not None:
            root.attach_log(request, title, path)

    return attach
