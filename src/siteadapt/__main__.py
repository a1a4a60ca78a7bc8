"""``python -m siteadapt`` = the ``siteadapt`` command."""

import sys

from .cli import main

sys.exit(main())
