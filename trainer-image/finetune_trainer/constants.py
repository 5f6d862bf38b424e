"""Values the operator renders into every Pod and the trainer relies on, defined once (finetune_operator.render
imports them). Importable without torch."""

from __future__ import annotations

# The run's ConfigMap (TrainerConfig JSON, and the rendered DeepSpeed JSON next to it) is mounted here; FTJ_CONFIG
# names TRAINER_CONFIG, and `train --config` falls back to it.
CONFIG_DIR = "/etc/finetune"
TRAINER_CONFIG = f"{CONFIG_DIR}/trainer.json"

# torchrun's wait for its workers after forwarding a SIGTERM (torchrun's default is 30 s), in seconds: time for the
# trainer to finish its step, save and upload a preemption checkpoint. The Pod's grace period must be longer.
SHUTDOWN_TIMEOUT = 300

# Where a failing rank writes {"reason", "message"} (Kubernetes' default terminationMessagePath) and where the
# launcher reads it; FTJ_TERMINATION_LOG overrides it outside a Pod.
TERMINATION_LOG = "/dev/termination-log"

# Where a workload API cannot say `envFrom` (a TrainJob), the operator mounts the Secret whose keys the trainer needs
# as environment variables here instead and names the directory in SECRET_ENV_DIR_VAR; the launcher then adds each
# key to torchrun's environment (finetune_trainer.launch.secret_env).
SECRET_ENV_DIR = "/var/run/secrets/finetune.dev/env"
SECRET_ENV_DIR_VAR = "FTJ_SECRET_ENV_DIR"

# What Kubernetes accepts as an environment variable name (a container's env, the keys envFrom turns into variables).
ENV_NAME_PATTERN = r"[-._a-zA-Z][-._a-zA-Z0-9]*"
