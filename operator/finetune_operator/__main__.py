"""`python -m finetune_operator` runs the ftj CLI."""

from finetune_operator.cli import main

raise SystemExit(main())
