"""One place that decides what happens when a real server the test needs is not available.

Every fixture calls :func:`unavailable` instead of ``pytest.skip``, so that a missing binary is a loud skip on a
developer machine and a failure in CI (``FTJ_REQUIRE_REAL=1``), where the real tier must never silently vanish.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_REAL_ENV = "FTJ_REQUIRE_REAL"


def real_tier_required() -> bool:
    """True when the environment demands that every real-server test actually runs."""
    return os.environ.get(REQUIRE_REAL_ENV, "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> NoReturn:
    """Skip the current test with ``reason``, or fail it when ``FTJ_REQUIRE_REAL=1``."""
    if real_tier_required():
        pytest.fail(f"{reason} ({REQUIRE_REAL_ENV}=1 turns this skip into a failure)", pytrace=False)
    pytest.skip(reason)
