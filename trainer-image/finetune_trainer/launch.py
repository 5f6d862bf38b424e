"""The container entry point: turn the workload's environment into one torchrun command and exec it.

Importable without torch (the operator's tests render and check the command). Both workload backends run the same
command, `python -m finetune_trainer.launch`; only the environment differs:

PyTorchJob (Kubeflow training operator v1 sets these itself in every replica):
    PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT, PET_NPROC_PER_NODE
    (MASTER_ADDR / MASTER_PORT are read when the PET_ forms are absent)
Indexed Job (Kubernetes sets JOB_COMPLETION_INDEX, the operator the rest, in the same PET_ names):
    JOB_COMPLETION_INDEX (the node rank), PET_NNODES, PET_NPROC_PER_NODE,
    PET_MASTER_ADDR (<name>-0.<headless service>), PET_MASTER_PORT (FTJ_ names are accepted too)
Both:
    FTJ_CONFIG                 path of the TrainerConfig JSON (default /etc/finetune/config.json)
    FTJ_NNODES, FTJ_NPROC_PER_NODE, FTJ_MASTER_PORT
                               fill in whatever the backend did not set
    FTJ_SHUTDOWN_TIMEOUT       seconds torchrun waits for workers after forwarding SIGTERM before it kills them
                               (default 300); keep it below the Pod's terminationGracePeriodSeconds so that a
                               preempted run can save and upload its checkpoint

The resulting command is
    python -m torch.distributed.run --nnodes N --nproc-per-node M --node-rank R --master-addr A --master-port P
        --max-restarts 0 --shutdown-timeout T -m finetune_trainer train --config <FTJ_CONFIG>
or, for one node, `--standalone` instead of the rank/master flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

DEFAULT_CONFIG_PATH = "/etc/finetune/config.json"
DEFAULT_MASTER_PORT = 29500
DEFAULT_SHUTDOWN_TIMEOUT = 300

Backend = Literal["pytorchjob", "job", "local"]


class LaunchError(ValueError):
    """The environment does not describe a runnable torchrun job; the message names the variable."""

    reason = "InvalidConfig"


@dataclass(frozen=True)
class LaunchPlan:
    """Where this replica sits in the job, as torchrun needs it."""

    backend: Backend
    nnodes: int
    nproc_per_node: str
    node_rank: int
    master_addr: str | None
    master_port: int


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def _int(env: Mapping[str, str], names: Sequence[str], default: int | None, *, minimum: int = 0) -> int:
    found = _first(env, *names)
    if found is None:
        if default is None:
            raise LaunchError(f"{' or '.join(names)} must be set")
        return default
    name, value = found
    try:
        number = int(value)
    except ValueError:
        raise LaunchError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise LaunchError(f"{name} must be >= {minimum}, got {number}")
    return number


def detect_backend(env: Mapping[str, str]) -> Backend:
    """Indexed Job when Kubernetes set JOB_COMPLETION_INDEX (PyTorchJob Pods never have it), PyTorchJob when the
    training operator's PET_ variables are present, otherwise a single local node."""
    if "JOB_COMPLETION_INDEX" in env:
        return "job"
    if "PET_NODE_RANK" in env or "PET_NNODES" in env:
        return "pytorchjob"
    return "local"


def plan_from_env(env: Mapping[str, str] | None = None, backend: Backend | None = None) -> LaunchPlan:
    """Read the replica's position from the environment the rendered workload provides (see the module docstring)."""
    env = os.environ if env is None else env
    backend = backend or detect_backend(env)
    nproc_found = _first(env, "PET_NPROC_PER_NODE", "FTJ_NPROC_PER_NODE")
    nproc = nproc_found[1] if nproc_found else "1"
    # torchrun also accepts auto/gpu/cpu here; anything else must be a positive count.
    if nproc not in ("auto", "gpu", "cpu") and (not nproc.isdigit() or int(nproc) < 1):
        raise LaunchError(f"{nproc_found[0] if nproc_found else 'nproc'} must be a positive integer, got {nproc!r}")

    if backend == "pytorchjob":
        nnodes = _int(env, ("PET_NNODES", "FTJ_NNODES"), None, minimum=1)
        node_rank = _int(env, ("PET_NODE_RANK",), 0 if nnodes == 1 else None)
        addr = _first(env, "PET_MASTER_ADDR", "MASTER_ADDR")
        port = _int(env, ("PET_MASTER_PORT", "MASTER_PORT", "FTJ_MASTER_PORT"), DEFAULT_MASTER_PORT, minimum=1)
    elif backend == "job":
        nnodes = _int(env, ("PET_NNODES", "FTJ_NNODES"), None, minimum=1)
        node_rank = _int(env, ("JOB_COMPLETION_INDEX",), None)
        addr = _first(env, "PET_MASTER_ADDR", "FTJ_MASTER_ADDR")
        port = _int(env, ("PET_MASTER_PORT", "FTJ_MASTER_PORT"), DEFAULT_MASTER_PORT, minimum=1)
    else:
        nnodes = _int(env, ("FTJ_NNODES",), 1, minimum=1)
        node_rank = _int(env, ("FTJ_NODE_RANK",), 0)
        addr = _first(env, "FTJ_MASTER_ADDR", "MASTER_ADDR")
        port = _int(env, ("FTJ_MASTER_PORT", "MASTER_PORT"), DEFAULT_MASTER_PORT, minimum=1)

    if node_rank >= nnodes:
        raise LaunchError(f"node rank {node_rank} is out of range for {nnodes} node(s)")
    if nnodes > 1 and addr is None:
        names = {"pytorchjob": "PET_MASTER_ADDR or MASTER_ADDR", "job": "PET_MASTER_ADDR or FTJ_MASTER_ADDR"}
        raise LaunchError(f"{names.get(backend, 'FTJ_MASTER_ADDR')} must be set when there are {nnodes} nodes")
    if port > 65535:
        raise LaunchError(f"master port must be <= 65535, got {port}")
    return LaunchPlan(backend, nnodes, nproc, node_rank, addr[1] if addr else None, port)


def torchrun_argv(
    plan: LaunchPlan,
    config_path: str,
    *,
    python: str | None = None,
    shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT,
    extra: Sequence[str] = (),
) -> list[str]:
    """The torchrun command line for this replica (the program: `-m finetune_trainer train --config PATH`)."""
    argv = [python or sys.executable, "-m", "torch.distributed.run"]
    if plan.nnodes == 1:
        # One node: a private rendezvous on a free local port, nothing to agree on with other replicas.
        argv += ["--standalone", "--nnodes", "1", "--nproc-per-node", plan.nproc_per_node]
    else:
        argv += [
            "--nnodes",
            str(plan.nnodes),
            "--nproc-per-node",
            plan.nproc_per_node,
            "--node-rank",
            str(plan.node_rank),
            "--master-addr",
            str(plan.master_addr),
            "--master-port",
            str(plan.master_port),
        ]
    # Restarts are the workload's business (backoffLimit): a new Pod resumes from the newest checkpoint.
    argv += ["--max-restarts", "0", "--shutdown-timeout", str(shutdown_timeout)]
    argv += ["-m", "finetune_trainer", "train", "--config", config_path, *extra]
    return argv


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_trainer.launch", description="Start torchrun for this replica of a FineTuneJob."
    )
    parser.add_argument("--config", default=os.environ.get("FTJ_CONFIG", DEFAULT_CONFIG_PATH))
    parser.add_argument("--backend", choices=["pytorchjob", "job", "local"], default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the command as JSON instead of running it")
    parser.add_argument(
        "--torchrun",
        nargs=argparse.REMAINDER,
        help="run torchrun with exactly these arguments (the operator renders them) instead of deriving them",
    )
    args, extra = parser.parse_known_args(argv)
    if args.torchrun is not None:
        command = [sys.executable, "-m", "torch.distributed.run", *args.torchrun]
        print(f"finetune_trainer.launch: {' '.join(command)}", file=sys.stderr, flush=True)
        raise SystemExit(supervise(command))
    try:
        plan = plan_from_env(backend=args.backend)
        timeout = _int(os.environ, ("FTJ_SHUTDOWN_TIMEOUT",), DEFAULT_SHUTDOWN_TIMEOUT)
    except LaunchError as exc:
        print(f"finetune_trainer.launch: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    command = torchrun_argv(plan, args.config, shutdown_timeout=timeout, extra=[e for e in extra if e != "--"])
    if args.dry_run:
        print(json.dumps(command))
        return
    print(f"finetune_trainer.launch: {plan} -> {' '.join(command)}", file=sys.stderr, flush=True)
    raise SystemExit(supervise(command))


def supervise(command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run torchrun as a child, forward SIGTERM/SIGINT to it, and return an exit code the workload can act on.

    torchrun exits 1 whatever its workers exited with; the failing worker's termination message (JSON with a
    reason) tells whether a restart could help. A permanent reason becomes PERMANENT_EXIT_CODE, which the Job
    backend's podFailurePolicy turns into an immediate failure instead of retries.
    """
    import signal
    import subprocess

    from finetune_trainer.errors import PERMANENT_EXIT_CODE, PERMANENT_REASONS

    child = subprocess.Popen(list(command), env=dict(env) if env is not None else None)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()
    if code == 0:
        return 0
    path = os.environ.get("FTJ_TERMINATION_LOG", "/dev/termination-log")
    try:
        with open(path) as handle:
            reason = json.loads(handle.read() or "{}").get("reason")
    except (OSError, ValueError, AttributeError):
        reason = None
    if reason in PERMANENT_REASONS:
        return PERMANENT_EXIT_CODE
    return code if code > 0 else 128 - code  # killed by a signal: the shell's 128+N convention


if __name__ == "__main__":
    main()
