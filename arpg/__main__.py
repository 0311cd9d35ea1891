"""`python -m arpg ...`: the `arpg` command (what `arpg.train.launch` runs under torchrun)."""

import sys

from .cli import main

sys.exit(main())
