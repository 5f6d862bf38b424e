"""Errors the trainer reports to FineTuneJob status: each carries the status `reason` it maps to."""

from __future__ import annotations

# Exit codes of the container (finetune_trainer.launch), the contract with the workload that restarts it:
# PERMANENT_EXIT_CODE  a failure no restart can fix (bad data, bad config, an output that belongs to another run, an
#                      adapter that does not fit). The Job backend's podFailurePolicy fails the Job at once on it; on
#                      the PyTorchJob backend (restartPolicy: ExitCode) it is below 128, which fails the job as well.
# RETRYABLE_EXIT_CODE  every other failure: a crash, a signal, torchrun's own failure, an NCCL or storage error.
#                      128 or above, so that restartPolicy: ExitCode restarts the replica (within backoffLimit), and
#                      above 128 + 64 so that it is never mistaken for "killed by signal N"; the log says what it was.
PERMANENT_EXIT_CODE = 3
RETRYABLE_EXIT_CODE = 200
PERMANENT_REASONS = frozenset({"DataError", "InvalidConfig", "MergeError", "OutputInUse"})


class TrainerError(Exception):
    """A failure a person can act on; `reason` goes into the FineTuneJob's Failed condition."""

    reason = "TrainerError"


class DataError(TrainerError):
    """The training data cannot be used: unreadable file, missing column, nothing left after filtering."""

    reason = "DataError"


class ConfigError(TrainerError):
    """The configuration cannot work, e.g. a chat template that the tokenizer's special tokens contradict."""

    reason = "InvalidConfig"


class MergeError(TrainerError):
    """An adapter cannot be merged: it is missing, does not fit the base, or the output is taken."""

    reason = "MergeError"


class OutputInUseError(TrainerError):
    """output.uri already holds checkpoints or final outputs of another run (another run fingerprint)."""

    reason = "OutputInUse"


class CheckpointWriteError(TrainerError):
    """A checkpoint file could not be written to the local disk (full, gone); the message names the file. A restart
    resumes from the newest complete checkpoint in storage."""

    reason = "CheckpointWriteError"
