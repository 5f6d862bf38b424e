"""Times as the Kubernetes API and the project's manifests write them: RFC 3339, UTC, whole seconds."""

from __future__ import annotations

import time


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
