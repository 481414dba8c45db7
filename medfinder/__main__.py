"""``python -m medfinder``: the command line (``medfinder.cli``)."""

import sys

from .cli import main

sys.exit(main())
