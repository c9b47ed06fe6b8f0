"""`python -m beluga_cli ...` is the `beluga` command (how processes start their children)."""

import sys

from beluga_cli.cli import main

sys.exit(main())
