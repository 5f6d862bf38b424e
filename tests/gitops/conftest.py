"""Fixtures for the GitOps tests: the real Helm CLI, to render the chart as the Argo CD Application configures it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from support.helm import Helm


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The pinned helm binary with an isolated home; a loud skip (a failure under FTJ_REQUIRE_REAL=1) if unbuilt."""
    from support.helm import available

    return available(tmp_path_factory.mktemp("helm-home"))
