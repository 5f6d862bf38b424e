"""The parity cases: which template, tokenizer, data and settings each reference row comes from.

Shared by the reference generator (run in LLaMA-Factory's venv) and the test, so both sides run the same matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Fixed date for the tool formats that print today's date (llama3), so the reference does not age.
TOOL_DATE = (2025, 1, 15)
SEED = 42


@dataclass(frozen=True)
class Case:
    template: str
    tokenizer: str  # a tokenizers_build.KINDS key
    sets: tuple[str, ...]  # dataset_info.json entries
    cutoff_len: int = 1024
    train_on_prompt: bool = False
    mask_history: bool = False

    @property
    def key(self) -> str:
        flags = "".join(flag for flag, on in (("+prompt", self.train_on_prompt), ("+history", self.mask_history)) if on)
        return f"{self.template}/{self.tokenizer}/{'+'.join(self.sets)}/{self.cutoff_len}{flags}"


# Templates looked at closely: every tokenizer, several cutoffs, the masking options.
FOCUS = ("default", "alpaca", "qwen", "qwen3", "llama3", "llama2", "mistral", "chatml", "glm4", "gemma", "empty")
TOKENIZERS = ("nobos", "bos", "eos0")
CUTOFFS = (16, 48, 128)
ALL_SETS = ("alpaca", "sharegpt", "tools", "long")


def cases(templates: list[str]) -> list[Case]:
    """The whole matrix for the text templates `templates` (lf_templates.json names that are not multimodal)."""
    out: list[Case] = []
    for index, name in enumerate(sorted(templates)):
        # Every template once on all sets, the tokenizers taken in turn.
        out.append(Case(name, TOKENIZERS[index % len(TOKENIZERS)], ALL_SETS))
    for name in FOCUS:
        for tokenizer in TOKENIZERS:
            out.append(Case(name, tokenizer, ("alpaca", "sharegpt", "tools")))
            for cutoff in CUTOFFS:
                out.append(Case(name, tokenizer, ("long", "sharegpt"), cutoff))
        out.append(Case(name, "nobos", ("long", "sharegpt", "tools"), 48, mask_history=True))
        out.append(Case(name, "bos", ("long", "sharegpt", "tools"), 48, train_on_prompt=True))
    return list({case.key: case for case in out}.values())


def as_dict(case: Case) -> dict[str, Any]:
    return {
        "template": case.template,
        "tokenizer": case.tokenizer,
        "sets": list(case.sets),
        "cutoff_len": case.cutoff_len,
        "train_on_prompt": case.train_on_prompt,
        "mask_history": case.mask_history,
    }
