"""Run one training of this project's trainer from a TrainerConfig JSON with the bench's StepTimer (project venv):
the recipe exactly as `python -m finetune_trainer train` runs it, with the timer added to its Trainer.

    ~/.cache/finetune-operator/venv/bin/python bench/gpu/ours_driver.py CONFIG.json TIMING.json
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main() -> None:
    config_path, timing = sys.argv[1], sys.argv[2]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from steptimer import StepTimer

    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.progress import ProgressReporter
    from finetune_trainer.recipe import FineTuneRecipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = TrainerConfig.model_validate(json.loads(Path(config_path).read_text()))
    recipe = FineTuneRecipe(config, reporter=ProgressReporter(config.job_name))
    try:
        recipe.setup()
        recipe.trainer.add_callback(StepTimer(timing, recipe.trainer.processing_class.pad_token_id))
        recipe.train()
        recipe.finish()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    main()
