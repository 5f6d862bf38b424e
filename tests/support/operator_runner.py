"""Run a kopf operator as a subprocess against the test control plane, for the duration of one test.

``python -m kopf run --standalone -m <module> --namespace <ns>`` with ``KUBECONFIG`` pointing at the control
plane; the context manager waits for kopf's liveness endpoint, and stops the operator (SIGTERM, then SIGKILL) on
exit. Its output goes to a log file that the ``run_operator`` fixture attaches to a failing test's report.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .processes import ManagedProcess, free_port, log_tail, wait_until

DEFAULT_MODULE = "finetune_operator.handlers"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Where the operator package lives in this repository, so it runs without being installed.
DEFAULT_PYTHONPATH: tuple[Path, ...] = (REPO_ROOT / "operator",)


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as response:
        return bool(response.status == 200)


class OperatorRunner:
    """A kopf operator subprocess; use as a context manager, read :attr:`log_path` or :meth:`log`."""

    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        *,
        namespaces: Sequence[str] = (),
        module: str | None = DEFAULT_MODULE,
        paths: Sequence[Path] = (),
        pythonpath: Sequence[Path] = DEFAULT_PYTHONPATH,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        ready_timeout: float = 60,
    ) -> None:
        """Describe the operator: ``module`` (``-m``) and/or ``paths``, watching ``namespaces`` (all if empty)."""
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.liveness_url = f"http://127.0.0.1:{free_port()}/healthz"
        self._ready_timeout = ready_timeout
        argv: list[str] = [python, "-m", "kopf", "run", "--standalone", f"--liveness={self.liveness_url}", "--verbose"]
        if module:
            argv += ["-m", module]
        argv += [f"--namespace={ns}" for ns in namespaces] or ["--all-namespaces"]
        argv += [*extra_args, *(os.fspath(p) for p in paths)]
        merged_env = {**os.environ, **(env or {}), "KUBECONFIG": os.fspath(kubeconfig), "PYTHONUNBUFFERED": "1"}
        pythonpath_entries = [os.fspath(p) for p in pythonpath]
        if merged_env.get("PYTHONPATH"):
            pythonpath_entries.append(merged_env["PYTHONPATH"])
        merged_env["PYTHONPATH"] = os.pathsep.join(pythonpath_entries)
        self._process = ManagedProcess("kopf-operator", argv, log_path, env=merged_env, cwd=REPO_ROOT)

    def start(self, *, wait: bool = True) -> OperatorRunner:
        """Start the operator and wait until kopf reports itself alive (unless ``wait`` is false: a standby
        replica waiting for leadership has not finished kopf's startup and serves no liveness endpoint yet)."""
        self._process.start()
        if not wait:
            return self
        self.wait_alive()
        return self

    def wait_alive(self, timeout: float | None = None) -> None:
        """Wait until kopf's liveness endpoint answers."""
        try:
            wait_until(
                lambda: _healthy(self.liveness_url),
                timeout=timeout or self._ready_timeout,
                what=f"kopf operator liveness {self.liveness_url} (log {self.log_path})",
                watch=[self._process],
            )
        except BaseException:
            self._process.stop()
            raise

    def stop(self) -> None:
        self._process.stop(timeout=15)

    def running(self) -> bool:
        return self._process.running()

    @property
    def pid(self) -> int:
        return self._process.pid

    def log(self, max_bytes: int = 200_000) -> str:
        """The operator's output so far (its tail when larger than ``max_bytes``)."""
        return log_tail(self.log_path, max_bytes)

    def __enter__(self) -> OperatorRunner:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
