"""Scenario 6 of issue 11: a dataset with a malformed line fails the run at once, naming the file and the line,
without a retry, on both backends."""

from __future__ import annotations

import json

import pytest
from e2etest import E2E


@pytest.mark.parametrize("backend", ["job", "pytorchjob"])
def test_a_malformed_dataset_line_fails_with_data_error_and_no_retry(e2e: E2E, backend: str) -> None:
    rows = [json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}"}) for i in range(8)]
    rows[4] = '{"instruction": "Say 4.", "input": "", "output": '  # line 5 is cut short
    e2e.s3.client().put_object(Bucket=e2e.s3.bucket, Key="data/broken.jsonl", Body="\n".join(rows) + "\n")
    name = f"broken-{backend}"
    manifest = e2e.finetunejob(
        name, backend=backend, datasets=[{"uri": e2e.s3.uri("data/broken.jsonl"), "format": "alpaca"}]
    )
    with e2e.operator():
        e2e.apply(manifest)
        status = e2e.wait_phase(name, "Failed", timeout=240)

    text = json.dumps(status)
    assert "DataError" in text, status
    assert "broken.jsonl" in text, status
    assert "line 5" in text, status
    # No retry: the node ran one Pod per node rank, each container once (the agent keeps a log per container run,
    # also of Pods the workload has deleted since) ...
    # (The training operator's init container in the PyTorchJob worker is not a training run.)
    runs = sorted(run for run in e2e.agent.container_logs(e2e.ns, name) if "/pytorch-" in run)
    assert len(runs) == 2, runs
    assert all(run.endswith("/pytorch-0") for run in runs), runs
    # ... and the trainer's permanent exit code is what the workload saw.
    codes = [
        c.state.terminated.exit_code
        for pod in e2e.pods(name)
        for c in pod.status.container_statuses or []
        if c.state.terminated is not None
    ]
    assert 3 in codes, codes
