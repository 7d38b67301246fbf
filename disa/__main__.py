"""`python -m disa` is the `disa` command."""

import sys

from disa.cli import main

sys.exit(main())
