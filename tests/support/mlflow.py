"""A real MLflow tracking server for tests: PyPI mlflow from its own venv (tests/tracking/mlflow_venv.sh), on a
random loopback port, with a SQLite store in a scratch directory."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

from .processes import ManagedProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
VENV_SCRIPT = ROOT / "tests" / "tracking" / "mlflow_venv.sh"


def mlflow_bin() -> Path:
    """The server venv's bin directory, created (pip install mlflow) the first time."""
    out = subprocess.run(["bash", str(VENV_SCRIPT)], check=True, capture_output=True, text=True, timeout=1200)
    return Path(out.stdout.strip().splitlines()[-1])


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=3) as response:
        return bool(response.status == 200)


class MlflowServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_seconds = 0.0
        self._process: ManagedProcess | None = None

    @classmethod
    def start(cls, workdir: Path, timeout: float = 120) -> MlflowServer:
        server = cls(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        server._process = ManagedProcess(
            "mlflow",
            [
                mlflow_bin() / "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(server.port),
                "--backend-store-uri",
                f"sqlite:///{workdir / 'mlflow.db'}",
                "--default-artifact-root",
                (workdir / "artifacts").as_uri(),
                "--workers",
                "1",
            ],
            workdir / "mlflow.log",
            cwd=workdir,
        ).start()
        try:
            wait_until(lambda: _healthy(server.url), timeout=timeout, what="MLflow /health", watch=[server._process])
        except BaseException:
            server.stop()
            raise
        server.start_seconds = time.monotonic() - started
        return server

    @property
    def log_path(self) -> Path:
        return self.workdir / "mlflow.log"

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
