"""The container entry point: run torchrun with the arguments the operator rendered, as a supervised child, and exit
with a code the workload can act on (see supervise).

    python -m finetune_trainer.launch --torchrun <torchrun arguments>

The arguments are finetune_operator.render.torchrun_args with $(VAR) references that the kubelet expands from the
container's environment: on a PyTorchJob the Kubeflow training operator sets PET_NODE_RANK, PET_NNODES,
PET_NPROC_PER_NODE, PET_MASTER_ADDR and PET_MASTER_PORT; on an Indexed Job Kubernetes sets JOB_COMPLETION_INDEX (the
node rank) and the operator the rest. `ftj run` passes the same arguments with local values. Importable without
torch: the launcher process only waits for torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from finetune_trainer.constants import ENV_NAME_PATTERN, SECRET_ENV_DIR_VAR, TERMINATION_LOG
from finetune_trainer.errors import PERMANENT_EXIT_CODE, PERMANENT_REASONS, RETRYABLE_EXIT_CODE


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_trainer.launch",
        description="Run torchrun for this replica of a FineTuneJob and exit with a code the workload acts on.",
    )
    parser.add_argument(
        "--torchrun",
        nargs=argparse.REMAINDER,
        required=True,
        help="torchrun's arguments, as the operator renders them (everything after --torchrun)",
    )
    args = parser.parse_args(argv)
    raise SystemExit(supervise(args.torchrun))


_ENV_NAME = re.compile(ENV_NAME_PATTERN)


def secret_env(base: Mapping[str, str]) -> dict[str, str]:
    """`base` plus one variable per key of the Secret mounted at $FTJ_SECRET_ENV_DIR: what `envFrom` gives on the
    other backends. A variable the Pod sets already wins, as an explicit env entry wins over envFrom."""
    env = dict(base)
    directory = env.get(SECRET_ENV_DIR_VAR)
    if not directory:
        return env
    for entry in sorted(Path(directory).iterdir()):
        # The kubelet's own entries (..data and the timestamped directory) start with dots; keys link into them.
        if entry.name.startswith("..") or not entry.is_file() or not _ENV_NAME.fullmatch(entry.name):
            continue
        env.setdefault(entry.name, entry.read_text())
    return env


def supervise(torchrun_args: Sequence[str]) -> int:
    """Run torchrun with `torchrun_args` as a child, forward SIGTERM/SIGINT to it, and return an exit code the
    workload can act on: 0, PERMANENT_EXIT_CODE or RETRYABLE_EXIT_CODE (finetune_trainer.errors).

    torchrun exits 1 whatever its workers exited with; the failing worker's termination message (JSON with a
    reason) tells whether a restart could help. A permanent reason becomes PERMANENT_EXIT_CODE; every other failure
    (a worker's transient error, a crash without a report, torchrun's own failure, a signal) becomes
    RETRYABLE_EXIT_CODE, which restartPolicy: ExitCode restarts, and which the Job backend counts against
    backoffLimit.
    """
    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args]
    print(f"finetune_trainer.launch: {' '.join(command)}", file=sys.stderr, flush=True)
    child = subprocess.Popen(command, env=secret_env(os.environ))

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()
    if code == 0:
        return 0
    path = os.environ.get("FTJ_TERMINATION_LOG", TERMINATION_LOG)
    try:
        with open(path) as handle:
            reason = json.loads(handle.read() or "{}").get("reason")
    except (OSError, ValueError, AttributeError):
        reason = None
    how = f"killed by signal {-code}" if code < 0 else f"exited {code}"
    if reason in PERMANENT_REASONS:
        result, kind = PERMANENT_EXIT_CODE, "permanent"
    else:
        result, kind = RETRYABLE_EXIT_CODE, "retryable"
    print(
        f"finetune_trainer.launch: torchrun {how}, reason {reason or 'unreported'}: exit {result} ({kind})",
        file=sys.stderr,
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
