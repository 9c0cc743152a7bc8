"""``python -m moe_theory`` runs the command-line interface."""

from .cli import main

raise SystemExit(main())
