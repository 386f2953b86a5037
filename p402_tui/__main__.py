"""`python -m p402_tui`: the `p402` command, where the entry point is not on PATH."""

import sys

from .cli import main

sys.exit(main())
