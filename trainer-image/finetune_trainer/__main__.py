"""`python -m finetune_trainer`: see finetune_trainer.cli."""

from finetune_trainer.cli import exit_process, main

exit_process(main())
