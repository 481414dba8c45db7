"""``python -m medfinder.train``: the ``train`` command as a module of its own, as torchrun needs one:
``torchrun --nproc_per_node N -m medfinder.train --manifest CSV --out DIR ...``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(command="train", prog="python -m medfinder.train"))
