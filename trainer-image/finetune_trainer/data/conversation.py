"""The common conversation form that every dataset format is converted to before templating."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["user", "assistant", "function", "observation"]

# Turns alternate between the prompt side and the model side, as in LLaMA-Factory's sharegpt rules:
# a tool result (observation) stands where a user turn would, a tool call (function) where an assistant turn would.
PROMPT_ROLES: frozenset[str] = frozenset({"user", "observation"})
MODEL_ROLES: frozenset[str] = frozenset({"assistant", "function"})


@dataclass(frozen=True, slots=True)
class Turn:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Conversation:
    """One training sample: an optional system prompt and tool list, then alternating prompt/model turns.

    `tools` is the parsed tool description (a list of JSON-schema dicts in the usual case) or None; `tools_text`
    the text it was parsed from, when it came as text (templates that write the tool list as given use it).
    A valid conversation starts on the prompt side and ends with a model turn.
    """

    turns: tuple[Turn, ...]
    system: str | None = None
    tools: Any = None
    tools_text: str | None = None
    origin: int = 0  # where the record is in its file, for messages about this sample (its reader's `where`)


def check_turns(turns: tuple[Turn, ...]) -> str | None:
    """Why the turn order is unusable, or None when it alternates prompt/model and ends with a model turn."""
    if not turns:
        return "no turns"
    for index, turn in enumerate(turns):
        expected = PROMPT_ROLES if index % 2 == 0 else MODEL_ROLES
        if turn.role not in expected:
            side = "user/observation" if index % 2 == 0 else "assistant/function"
            return f"turn {index + 1} is {turn.role!r} where a {side} turn must come"
    if len(turns) % 2:
        return "the last turn is not an assistant/function turn"
    return None
