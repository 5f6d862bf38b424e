"""`python -m finetune_trainer merge`: what the merge Job runs (arguments are declared in finetune_trainer.cli).

--base/--adapter/--output default, with --config, to the run's model URI, output URI and output.merge.uri
(<output>/merged/); --dtype and --max-shard-size to output.merge's. Exit codes: 0 merged (or already merged),
3 a problem retrying cannot fix (MergeError, invalid configuration: the operator's merge Job fails at once on 3),
1 anything else, e.g. storage trouble (the Job retries). The reason and message also go to the container's
termination message. On success one JSON line `{"event": "merged", ...}` describes the result on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

from finetune_trainer.config import TrainerConfig
from finetune_trainer.distenv import Ranks
from finetune_trainer.errors import PERMANENT_EXIT_CODE, ConfigError, MergeError
from finetune_trainer.merge.remote import MergeRequest, merge_from_storage
from finetune_trainer.storage import join_uri

log = logging.getLogger("finetune_trainer")


def default_cache_dir(config: TrainerConfig | None) -> Path:
    if config is not None:
        return Path(config.cache_dir)
    env = os.environ.get("FTJ_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "finetune-trainer"


def request_from_args(args: argparse.Namespace, config: TrainerConfig | None) -> MergeRequest:
    """The MergeRequest the arguments (and the run's config, for defaults) describe."""
    merge = config.output.merge if config is not None else None
    base = args.base or (config.model.uri if config else None)
    adapter = args.adapter or (config.output.uri if config else None)
    output = args.output or (merge.uri if merge and merge.uri else None)
    if output is None and config is not None:
        output = join_uri(config.output.uri, "merged/")
    if not base or not adapter or not output:
        given = (("--base", base), ("--adapter", adapter), ("--output", output))
        missing = [flag for flag, value in given if not value]
        raise ConfigError(f"merge needs {', '.join(missing)} (or --config with the run's TrainerConfig)")
    return MergeRequest(
        base=base,
        adapter=adapter,
        output=output,
        dtype=args.dtype or (merge.dtype if merge else "bf16"),
        max_shard_size=args.max_shard_size or (merge.max_shard_size if merge else "5GB"),
        overwrite=bool(args.overwrite),
        config=config,
    )


def run(args: argparse.Namespace) -> int:
    from finetune_trainer.cli import failure_reason, load_config, setup_logging, write_termination_message

    setup_logging(Ranks(), args.log_level)
    try:
        config = load_config(args.config) if args.config else None
        request = request_from_args(args, config)
        cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(config)
        report = merge_from_storage(request, cache_dir=cache_dir)
    except Exception as exc:
        reason = failure_reason(exc)
        message = str(exc) or type(exc).__name__
        log.error("%s: %s", reason, message, exc_info=not hasattr(exc, "reason"))
        write_termination_message(reason, message)
        return PERMANENT_EXIT_CODE if isinstance(exc, MergeError | ConfigError) else 1
    log.info("%s", report.summary())
    print(json.dumps({"event": "merged", **dataclasses.asdict(report)}), flush=True)
    return 0
