"""Command-line error contract: exit status 2 and one plain sentence on stderr, no traceback."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

from ..errors import MedFinderError, os_error_sentence

EXIT_USAGE = 2


def fail(sentence: str) -> NoReturn:
    print(f"error: {sentence}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


class CliParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one sentence (the usage stays available with --help)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message[0].upper()}{message[1:]}; see {self.prog} --help.")


def run_guarded(main: Callable[[], int]) -> int:
    """Run a CLI main, turning the errors a user can act on into the exit-2 contract."""
    try:
        return main()
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error of ours; stop writing quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MedFinderError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(os_error_sentence(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
