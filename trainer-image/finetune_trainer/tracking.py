"""Experiment tracking: TensorBoard always, and the services spec.tracking.reportTo names (wandb, mlflow, swanlab).

The metrics reach every service through the Hugging Face Trainer's integrations (report_to; SwanLab's own callback
for it), which log only on global rank 0: train loss, learning rate, grad norm, tokens/s (added to each training log
by callbacks.ResumableTrainer) and eval loss. This module turns the spec into what those integrations read (their
environment variables, the run name, TensorBoard's directory) and reads back the link to the run where the service
gives one. Credentials reach the trainer only as environment variables from tracking.secretRef (rendered as
envFrom): nothing here writes or logs them.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from finetune_trainer.config import TrackingSpec, TrainerConfig

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "finetune"
TENSORBOARD_DIR = "tensorboard"  # under the run's output prefix and its local work directory


def local_dir(work_dir: Path) -> Path:
    """The services' local files (wandb's run directory, SwanLab's logs) under the run's scratch work directory: the
    container's root file system is read-only."""
    return work_dir / "tracking"


def spec_of(config: TrainerConfig) -> TrackingSpec:
    return config.tracking or TrackingSpec()


def services(config: TrainerConfig) -> list[str]:
    return list(spec_of(config).report_to or [])


def report_to(config: TrainerConfig) -> list[str]:
    """The Trainer's report_to on global rank 0: TensorBoard and the services asked for whose integration
    transformers maintains (SwanLab's is its own: see callbacks())."""
    return ["tensorboard", *(name for name in services(config) if name != "swanlab")]


def callbacks(config: TrainerConfig, work_dir: Path) -> list[Any]:
    """Trainer callbacks for the services whose integration ships with their client: SwanLab's own
    SwanLabCallback (transformers' copy lags behind the client's API)."""
    if "swanlab" not in services(config):
        return []
    from swanlab.integration.transformers import SwanLabCallback

    spec = spec_of(config)
    return [
        SwanLabCallback(
            project=spec.project or DEFAULT_PROJECT,
            experiment_name=run_name(config),
            log_dir=str(local_dir(work_dir) / "swanlog"),
        )
    ]


def run_name(config: TrainerConfig) -> str:
    return spec_of(config).run_name or config.job_name


def environment(config: TrainerConfig, work_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """What the integrations read from the environment, as (from the spec, defaults): the spec's project, run name
    and tracking URI override the environment; the defaults (project, local directory) give way to values the job's
    env sets."""
    spec = spec_of(config)
    explicit = {"WANDB_NAME": run_name(config)}
    defaults = {"WANDB_DIR": str(local_dir(work_dir))}
    for name in ("WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        (explicit if spec.project else defaults)[name] = spec.project or DEFAULT_PROJECT
    if spec.mlflow_tracking_uri:
        explicit["MLFLOW_TRACKING_URI"] = spec.mlflow_tracking_uri
    return explicit, defaults


def configure(config: TrainerConfig, work_dir: Path, tensorboard_dir: Path) -> dict[str, str | None]:
    """Set the integrations' environment and TensorBoard's directory; returns the previous values, for restore()."""
    local_dir(work_dir).mkdir(parents=True, exist_ok=True)
    explicit, defaults = environment(config, work_dir)
    explicit["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir)
    changes = {**{k: v for k, v in defaults.items() if k not in os.environ}, **explicit}
    previous = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    return previous


def restore(previous: dict[str, str | None]) -> None:
    """Undo configure() (a process that runs several recipes, such as a test session, must not carry one run's
    settings into the next)."""
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def run_links(names: list[str], mlflow_uri: str | None = None) -> dict[str, str]:
    """Links to the current runs of the services in `names` that give one (offline modes give none)."""
    links: dict[str, str] = {}
    if "wandb" in names and "wandb" in sys.modules:
        run = getattr(sys.modules["wandb"], "run", None)
        url = getattr(run, "url", None) if run is not None else None
        if url:
            links["wandb"] = str(url)
    if "mlflow" in names and "mlflow" in sys.modules:
        import mlflow

        active = mlflow.active_run()
        uri = mlflow_uri or mlflow.get_tracking_uri()
        if active is not None and uri.startswith(("http://", "https://")):
            info = active.info
            links["mlflow"] = f"{uri.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{info.run_id}"
    if "swanlab" in names and "swanlab" in sys.modules:
        swanlab = sys.modules["swanlab"]
        try:
            url = swanlab.get_run().url if swanlab.has_run() else None
        except (RuntimeError, ValueError) as exc:  # no run, or not online: no link
            log.debug("swanlab gave no run link: %s", exc)
            url = None
        if url:
            links["swanlab"] = str(url)
    return links
