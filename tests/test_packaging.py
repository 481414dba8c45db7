"""The package's shape: layers that only look down, and requirements in step with pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    """pyproject.toml's contracts: layers only look down, no cycle; the library never imports
    index_build, the demo, the app, the command line or training; nor does it import gradio."""
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_space_requirements_are_the_core_and_the_app():
    """A Space installs requirements.txt; it must be pyproject.toml's core dependencies and the app extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["app"]
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == wanted


def test_every_entry_point_answers_help():
    for args in (["-m", "medfinder", "--help"], ["-m", "index_build", "--help"], ["-m", "medfinder.phantoms", "--help"],
                 ["-m", "medfinder.train", "--help"]):
        proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (args, proc.stderr)
