"""``python -m medfinder.phantoms --n N --seed S --out DIR`` (or ``--render DIR``): the ``phantoms`` command."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(command="phantoms", prog="python -m medfinder.phantoms"))
