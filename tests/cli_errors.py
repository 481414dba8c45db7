"""The command-line contract for bad input, shared by the tests that run the CLI: exit 2, no traceback,
one sentence on stderr (warnings aside) that names what went wrong."""

from __future__ import annotations

import subprocess


def one_sentence(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The one error line of ``proc``, asserting the contract and that it contains each of ``words``."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]
