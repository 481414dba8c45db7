import sys

from .cli import main
from .cli_support import run_guarded

sys.exit(run_guarded(main))
