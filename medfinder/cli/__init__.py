"""``python -m medfinder`` (or ``medfinder``): every command of the tool behind one parser.

Each command lives in a module of its own with ``configure(parser)`` and ``run(args)``. The
entry points a contract fixes (``python -m index_build``, ``python -m medfinder.phantoms``,
``python -m medfinder.train`` for torchrun) run one command through ``main(argv, command=...)``.
Errors a user can act on exit 2 with one sentence on stderr (``support.run_guarded``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from . import build, demo, listen, phantoms, search, training
from .support import CliParser, run_guarded

#: name -> (help, configure, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "search": ("search an index by text, by a CT, or by a study in a PACS", search.configure, search.run),
    "info": ("counts, model and settings of an index", search.configure_info, search.run_info),
    "check": ("load and validate CT files without searching", search.configure_check, search.run_check),
    "build": ("build or extend an index (also: python -m index_build)", build.configure, build.run),
    "listen": ("receive studies a PACS sends (DICOM C-STORE) and add them to an index", listen.configure, listen.run),
    "demo-index": ("build the demo index from synthetic phantoms", demo.configure, demo.run),
    "phantoms": ("write synthetic chest CT cases with reports and labels", phantoms.configure, phantoms.run),
    "train": ("train a model on a manifest of CTs and reports", training.configure_train, training.run_train),
    "evaluate": ("retrieval metrics of a model on a manifest", training.configure_evaluate, training.run_evaluate),
    "recipe": ("the demo weights' whole training cycle on fresh phantoms", training.configure_recipe, training.run_recipe),
}


def main(argv: Sequence[str] | None = None, command: str | None = None, prog: str | None = None) -> int:
    """Run the command line; with ``command``, only that command, under the program name ``prog``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if command is not None:
        help_text, configure, run = COMMANDS[command]
        parser = CliParser(prog=prog or f"python -m medfinder {command}", description=help_text)
        configure(parser)
        parser.set_defaults(run=run)
    else:
        parser = CliParser(prog=prog or "python -m medfinder", description="MedFinder: similar-case search for 3D CT.")
        sub = parser.add_subparsers(dest="command", required=True, parser_class=CliParser)
        for name, (help_text, configure, run) in COMMANDS.items():
            child = sub.add_parser(name, help=help_text, description=help_text)
            configure(child)
            child.set_defaults(run=run)
    args = parser.parse_args(argv)
    args.invocation = f"{parser.prog} {' '.join(sys.argv[1:] if argv is None else argv)}"
    return run_guarded(lambda: args.run(args))
