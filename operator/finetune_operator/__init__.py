"""finetune-operator: the kopf operator, the FineTuneJob API and the ftj CLI."""

__version__ = "0.1.0"
