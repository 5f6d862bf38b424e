"""Benchmark: how fast the operator turns N FineTuneJobs into their children, against a bare client.

Starts a real etcd + kube-apiserver (tests/support), runs the operator as a subprocess, creates N FineTuneJobs
(Job backend, so no Kubeflow controller is needed), and prints:
  - seconds from the first create until every child object exists,
  - seconds a bare client takes to create the same child objects itself in the same run (no reconcile logic),
  - the ratio of the two, and the operator process's peak RSS.

Usage: python bench/bench_operator.py [N ...]   (default: 100 500). Not a test; it prints figures.
"""

from __future__ import annotations

import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kubernetes import client  # noqa: E402

from finetune_operator import k8s  # noqa: E402
from finetune_operator.api import FineTuneJobSpec  # noqa: E402
from finetune_operator.k8s import path  # noqa: E402
from finetune_operator.render import JobRef, children  # noqa: E402
from finetune_operator.settings import Settings  # noqa: E402
from support.controlplane import ControlPlane  # noqa: E402
from support.operator_runner import OperatorRunner  # noqa: E402
from support.processes import free_port  # noqa: E402

SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/base/"},
    "datasets": [{"uri": "s3://data/train.json"}],
    "output": {"uri": "s3://runs/bench/"},
    "storage": {"secretRef": {"name": "s3"}},
    "distribution": {"backend": "job", "nodes": 2},
}
KINDS_PER_JOB = 6  # ConfigMap, ServiceAccount, Role, RoleBinding, Service, Job


def _create_all(api: client.ApiClient, namespace: str, n: int) -> None:
    custom = client.CustomObjectsApi(api)
    for i in range(n):
        body = {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": f"job-{i:04d}"},
            "spec": SPEC,
        }
        custom.create_namespaced_custom_object("finetune.dev", "v1alpha1", namespace, "finetunejobs", body)


def _count_children(api: client.ApiClient, namespace: str) -> int:
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    sel = "finetune.dev/job"
    return min(
        len(batch.list_namespaced_job(namespace, label_selector=sel).items),
        len(core.list_namespaced_service(namespace, label_selector=sel).items),
        len(core.list_namespaced_config_map(namespace, label_selector=sel).items),
    )


def _jobs_with_children(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(r"^finetune_children_created_seconds_count (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else 0


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bare_client(api: client.ApiClient, namespace: str, n: int) -> float:
    """Create the children of N jobs directly, object by object, as the operator would."""
    spec = FineTuneJobSpec.model_validate(SPEC)
    objects = [o for i in range(n) for o in children(JobRef(f"job-{i:04d}", namespace, spec), Settings())]
    k8s._client = api  # path() asks this API server for each kind's resource name
    start = time.perf_counter()
    for obj in objects:
        api.call_api(
            path(obj["apiVersion"], obj["kind"], namespace),
            "POST",
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body=obj,
            auth_settings=["BearerToken"],
            response_type="object",
            _return_http_data_only=True,
        )
    return time.perf_counter() - start


def _requests(plane: ControlPlane) -> Counter[str]:
    """The API server's request counter (apiserver_request_total) summed by verb and resource."""
    with plane.api_client() as api:
        text = api.call_api("/metrics", "GET", auth_settings=["BearerToken"], _preload_content=False)[0].data.decode()
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out[f"{labels.get('verb')} {labels.get('resource')}"] += int(float(line.rsplit(" ", 1)[1]))
    return out


def run(plane: ControlPlane, workdir: Path, n: int) -> dict[str, float]:
    with plane.api_client() as api:
        core = client.CoreV1Api(api)
        ops_ns, bare_ns = f"bench-op-{n}", f"bench-bare-{n}"
        for ns in (ops_ns, bare_ns):
            core.create_namespace({"metadata": {"name": ns}})
        metrics_port = free_port()
        env = {
            "FTJ_WATCH_NAMESPACES": ops_ns,
            "FTJ_LEASE_NAMESPACE": ops_ns,
            "FTJ_RESYNC_SECONDS": "3600",
            "FTJ_METRICS_PORT": str(metrics_port),
        }
        runner = OperatorRunner(plane.kubeconfig, workdir / f"operator-{n}.log", namespaces=[ops_ns], env=env)
        with runner:
            pid = runner.pid
            before = _requests(plane)
            start = time.perf_counter()
            creator = threading.Thread(target=_create_all, args=(api, ops_ns, n))
            creator.start()
            # Polled on the operator's own metric (observed once a job's creates have all returned), not by listing
            # the children: lists of hundreds of objects every few hundred ms would slow the API server it measures.
            while _jobs_with_children(metrics_port) < n:
                time.sleep(0.05)
            operator_seconds = time.perf_counter() - start
            assert _count_children(api, ops_ns) == n, "the metric ran ahead of the objects"
            creator.join()
            rss = _peak_rss_mb(pid)
            used = _requests(plane) - before
        # What the operator asked of the API server per job (the bench's own creates and polling lists left out).
        calls = {k: v / n for k, v in used.items() if not k.startswith(("LIST", "WATCH")) and k != "POST finetunejobs"}
        detail = ", ".join(f"{k} {v:.1f}" for k, v in sorted(calls.items()))
        print(f"  N={n}: API requests per job: {sum(calls.values()):.1f} ({detail})", file=sys.stderr)
        bare_seconds = bare_client(api, bare_ns, n)
    return {"n": n, "operator_s": operator_seconds, "bare_s": bare_seconds, "rss_mb": rss}


def main(argv: list[str]) -> None:
    sizes = [int(a) for a in argv] or [100, 500]
    with tempfile.TemporaryDirectory(prefix="ftj-bench-") as tmp:
        plane = ControlPlane.start(Path(tmp) / "plane")
        try:
            plane.apply_crd_files([ROOT / "crds" / "finetune.dev_finetunejobs.yaml"])
            header = ("N", "objects", "operator s", "bare client s", "ratio", "operator peak RSS MB")
            print(" ".join(f"{h:>{w}}" for h, w in zip(header, (5, 8, 11, 14, 6, 21), strict=True)))
            for n in sizes:
                r = run(plane, Path(tmp), n)
                print(
                    f"{n:>5} {n * KINDS_PER_JOB:>8} {r['operator_s']:>11.1f} {r['bare_s']:>14.1f} "
                    f"{r['operator_s'] / r['bare_s']:>6.2f} {r['rss_mb']:>21.0f}",
                    flush=True,
                )
        finally:
            plane.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
