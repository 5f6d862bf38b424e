"""Command line of the trainer image: `python -m finetune_trainer train --config config.json`.

`train` runs the recipe on this rank (standalone, or as one process of torchrun; see finetune_trainer.launch for
the container entry point). The config path defaults to $FTJ_CONFIG, else to the operator's mount
(finetune_trainer.constants.TRAINER_CONFIG). Exit codes: 0 done, 143 preempted after a
checkpoint was saved, PERMANENT_EXIT_CODE (3) for a failure no restart can fix (invalid config, bad data, an
output that belongs to another run), RETRYABLE_EXIT_CODE (200) for any other failure; the reason goes to the
FineTuneJob status and to the container's termination message. `merge` runs the adapter merge Job (see
finetune_trainer.merge.command).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from finetune_trainer.config import TrainerConfig, format_validation_error
from finetune_trainer.constants import TERMINATION_LOG, TRAINER_CONFIG
from finetune_trainer.distenv import Ranks
from finetune_trainer.errors import PERMANENT_EXIT_CODE, PERMANENT_REASONS, RETRYABLE_EXIT_CODE, ConfigError

log = logging.getLogger("finetune_trainer")


def load_config(path: str) -> TrainerConfig:
    """Read and validate a TrainerConfig JSON file; every problem is listed in the error."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"the config file {path} is not valid JSON: {exc}") from exc
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as exc:
        lines = format_validation_error(exc)
        raise ConfigError(f"invalid config {path}:\n  " + "\n  ".join(lines)) from exc


def setup_logging(ranks: Ranks, level: str) -> None:
    prefix = f"[rank {ranks.rank}/{ranks.world_size}] " if ranks.distributed else ""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    if not ranks.is_main:
        # One copy of the library chatter is enough.
        for name in ("transformers", "peft", "accelerate", "datasets", "DeepSpeed"):
            logging.getLogger(name).setLevel(logging.WARNING)


def failure_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    if type(exc).__name__ == "OutOfMemoryError":
        return "OutOfMemory"
    return "TrainerError"


def write_termination_message(reason: str, message: str) -> None:
    """Kubernetes shows this file as the container's termination message; the first failing rank wins."""
    path = Path(os.environ.get("FTJ_TERMINATION_LOG", TERMINATION_LOG))
    try:
        if path.exists() and path.stat().st_size > 0:
            return
        path.write_text(json.dumps({"reason": reason, "message": message[:3500]}))
    except OSError:
        pass


def cmd_train(args: argparse.Namespace) -> int:
    from finetune_trainer.progress import ProgressReporter, StatusClient

    ranks = Ranks.from_env()
    setup_logging(ranks, args.log_level)
    reporter = None
    try:
        config = load_config(args.config)
        if ranks.is_main:
            reporter = ProgressReporter(config.job_name, StatusClient.in_cluster(config.job_name, config.namespace))
        from finetune_trainer.recipe import run

        result = run(config, ranks=ranks, reporter=reporter)
        log.info("run %s at step %d", result.status, result.step)
        return result.exit_code
    except Exception as exc:
        reason = failure_reason(exc)
        message = str(exc) or type(exc).__name__
        known = hasattr(exc, "reason")
        log.error("%s: %s", reason, message, exc_info=not known)
        write_termination_message(reason, message)
        if reporter is not None:
            reporter.failure(reason, message)
        return PERMANENT_EXIT_CODE if reason in PERMANENT_REASONS else RETRYABLE_EXIT_CODE
    finally:
        if reporter is not None:
            reporter.close()


def cmd_merge(args: argparse.Namespace) -> int:
    from finetune_trainer.merge.command import run  # the merge stack imports torch; `train --help` need not

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a model as described by a TrainerConfig JSON")
    train.add_argument(
        "--config",
        default=os.environ.get("FTJ_CONFIG", TRAINER_CONFIG),
        help=f"the run's TrainerConfig JSON (default: $FTJ_CONFIG, else {TRAINER_CONFIG}, the operator's mount)",
    )
    train.add_argument("--log-level", default=os.environ.get("FTJ_LOG_LEVEL", "INFO"))
    train.set_defaults(func=cmd_train)
    merge = sub.add_parser("merge", help="merge a trained LoRA/DoRA adapter into its full-precision base model")
    merge.add_argument("--base", help="base model URI (default with --config: model.uri)")
    merge.add_argument("--adapter", help="adapter URI, usually the run's output (default: output.uri)")
    merge.add_argument("--output", help="merged model URI (default: output.merge.uri or <output>/merged/)")
    merge.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="merged weights' dtype (default bf16)")
    merge.add_argument("--max-shard-size", help="largest shard file, e.g. 5GB (default 5GB)")
    merge.add_argument("--config", default=os.environ.get("FTJ_CONFIG"), help="the run's TrainerConfig JSON")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing, different merged model")
    merge.add_argument("--cache-dir", help="download/scratch directory (default: the config's cacheDir)")
    merge.add_argument("--log-level", default=os.environ.get("FTJ_LOG_LEVEL", "INFO"))
    merge.set_defaults(func=cmd_merge)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def exit_process(code: int) -> NoReturn:
    """End the process with `code`. A rank of a distributed run ends without the interpreter's finalization: the
    atexit handlers run (logging's flush among them) and the standard streams are flushed, then os._exit. Its work is
    done by then (the process group destroyed, uploads drained), but gloo's C++ threads can still hold objects that
    the finalization frees after the interpreter has gone, and that aborts the process ("terminate called without an
    active exception", SIGABRT): torchrun then reports a finished rank as failed and its peer waits out the exit
    barrier. A single process exits normally."""
    if not Ranks.from_env().distributed:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or gone: nothing left to keep
            stream.flush()
    os._exit(code)
