"""The real ``kubectl`` (built by ``tests/testbin/build.sh kubectl``), run as a user would run it, with a kubeconfig.

The e2e tier drives the cluster with it: ``kubectl apply -f``, ``get ftj``, ``describe ftj``, ``wait``. Each call
is a process of its own with an empty HOME (no developer's config or cache leaks in) and the given kubeconfig.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import testbin


class KubectlError(RuntimeError):
    """kubectl exited non-zero; ``output`` holds what it printed."""

    def __init__(self, argv: list[str], returncode: int, output: str) -> None:
        super().__init__(f"kubectl {' '.join(argv)} exited {returncode}:\n{output}")
        self.returncode = returncode
        self.output = output


class Kubectl:
    """``kubectl`` bound to one kubeconfig (and optionally one namespace)."""

    def __init__(self, kubeconfig: Path, namespace: str | None = None, home: Path | None = None) -> None:
        self.binary = testbin.binary("kubectl")
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.home = home or Path(tempfile.mkdtemp(prefix="ftj-kubectl-"))
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "KUBECONFIG": str(kubeconfig),
            "KUBECACHEDIR": str(self.home / "cache"),
        }

    def argv(self, *args: str) -> list[str]:
        namespace = ["--namespace", self.namespace] if self.namespace else []
        return [str(self.binary), *namespace, *args]

    def run(self, *args: str, input: str | None = None, timeout: float = 120, check: bool = True) -> str:
        """Run kubectl; its stdout, or KubectlError with everything it printed."""
        proc = subprocess.run(
            self.argv(*args), input=input, capture_output=True, text=True, env=self.env, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise KubectlError(list(args), proc.returncode, proc.stdout + proc.stderr)
        return proc.stdout

    def json(self, *args: str) -> Any:
        """``kubectl <args> -o json``, decoded."""
        return json.loads(self.run(*args, "-o", "json"))

    def watch(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        """Start a long-running kubectl (``get -w``) writing to ``log``; the caller stops it."""
        with log.open("wb") as out:
            return subprocess.Popen(
                self.argv(*args), stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )


def json_stream(text: str) -> Iterator[Any]:
    """The JSON documents of ``kubectl get -w -o json`` output, one after the other (a partial last one is left)."""
    decoder = json.JSONDecoder()
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return
        try:
            doc, index = decoder.raw_decode(text, index)
        except ValueError:
            return
        yield doc
