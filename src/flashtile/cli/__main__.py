"""``python -m flashtile.cli``: the same as the ``flashtile`` command."""

import sys

from . import main

sys.exit(main())
