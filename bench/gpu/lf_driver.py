"""Run one LLaMA-Factory SFT training from a YAML file with the bench's StepTimer (in the LLaMA-Factory venv).

$(tests/parity/lf_venv.sh --train) bench/gpu/lf_driver.py CONFIG.yaml TIMING.json
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import yaml


def main() -> None:
    config, timing = sys.argv[1], sys.argv[2]
    try:
        import torchaudio  # noqa: F401
    except ImportError:  # imported by its multimodal plugin only; text training never uses it
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stub
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llamafactory.train.tuner import run_exp
    from steptimer import StepTimer
    from transformers import AutoTokenizer

    args = yaml.safe_load(Path(config).read_text())
    pad = AutoTokenizer.from_pretrained(args["model_name_or_path"]).pad_token_id
    run_exp(args, callbacks=[StepTimer(timing, pad)])


if __name__ == "__main__":
    main()
