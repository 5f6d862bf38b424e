"""Fixtures for the data tests: the tiny tokenizers and a TrainerConfig factory caching under tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer.datafiles import MakeConfig, config_for
from trainer.tiny import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """chatml tokenizer with a tool-aware chat_template."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def base_tokenizer() -> Any:
    """The same vocabulary without a chat_template, as a base model ships it."""
    return build_tokenizer(chat_template=None)


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    def make(*datasets: Path | dict[str, Any], cache: Path | None = None, **fields: Any) -> Any:
        return config_for(*datasets, cache=cache or tmp_path / "cache", **fields)

    return make
