"""`python -m finetune_trainer`: see finetune_trainer.cli."""

import sys

from finetune_trainer.cli import main

sys.exit(main())
