"""Errors the trainer reports to FineTuneJob status: each carries the status `reason` it maps to."""

from __future__ import annotations

# Exit code of a failure no restart can fix (bad data, bad config, an adapter that does not fit): the operator's
# Job podFailurePolicy fails the Job at once on it instead of retrying. Other failures exit 1 and are retried.
PERMANENT_EXIT_CODE = 3
PERMANENT_REASONS = frozenset({"DataError", "InvalidConfig", "MergeError"})


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
