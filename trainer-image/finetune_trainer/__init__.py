"""finetune-trainer: the supervised fine-tuning program that runs in every replica."""

__version__ = "0.1.0"
