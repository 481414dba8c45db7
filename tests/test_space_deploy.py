"""The Space deploy script against a local bare repository standing in for a Hugging Face Space."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "push_space.sh"
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"

pytestmark = pytest.mark.skipif(shutil.which("git-lfs") is None, reason="Debian git-lfs is not installed")


def _git(*args: str, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def space(tmp_path: Path) -> str:
    """A Space made in the web UI: a bare repository that already has a first commit."""
    bare = tmp_path / "space.git"
    _git("init", "-q", "--bare", "-b", "main", str(bare), cwd=tmp_path)
    first = tmp_path / "first"
    _git("init", "-q", "-b", "main", str(first), cwd=tmp_path)
    (first / "README.md").write_text("---\ntitle: medfinder\nsdk: gradio\n---\n")
    (first / ".gitattributes").write_text("*.bin filter=lfs diff=lfs merge=lfs -text\n")
    _git("add", "-A", cwd=first)
    _git("-c", "user.name=hf", "-c", "user.email=hf@example.org", "commit", "-qm", "initial commit", cwd=first)
    _git("push", "-q", f"file://{bare}", "main", cwd=first)
    return f"file://{bare}"


def _push(space: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), space, "main"], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_push_makes_one_snapshot_commit_with_binaries_in_lfs_and_the_clone_imports_the_app(space, tmp_path):
    proc = _push(space)
    assert proc.returncode == 0, proc.stderr
    assert space not in proc.stdout + proc.stderr  # the URL (which may hold a token) is never printed

    pointers = tmp_path / "pointers"
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"}
    _git("clone", "-q", "-b", "main", space, str(pointers), cwd=tmp_path, env=env)
    # One commit on top of the Space's own first commit: a fast-forward, not a rewrite.
    log = _git("log", "--format=%s", cwd=pointers).splitlines()
    assert log == [log[0], "initial commit"] and log[0].startswith("MedFinder snapshot of ")
    # Every binary is an LFS pointer in the pushed tree; no plain blob is over 10 MB.
    for path in ("assets/model/model.safetensors", "assets/examples/real_abdomen_ct_totalsegmentator.nii.gz",
                 "assets/screenshot_text_search.png", "tests/data/abdomen_ct_crop.nii.gz"):
        assert (pointers / path).read_bytes().startswith(LFS_POINTER), path
    sizes = [line.split() for line in _git("ls-tree", "-r", "-l", "HEAD", cwd=pointers).splitlines()]
    assert max(int(size) for _, kind, _, size, *_ in sizes if kind == "blob") < 10 * 1024 * 1024
    assert (pointers / "app.py").read_bytes() == _git_blob(REPO, "app.py")  # text stays text

    # A normal clone fetches the real files, and the app imports from it.
    full = tmp_path / "full"
    _git("clone", "-q", "-b", "main", space, str(full), cwd=tmp_path)
    weights = (full / "assets/model/model.safetensors").read_bytes()
    assert weights == _git_blob(REPO, "assets/model/model.safetensors")
    check = subprocess.run([sys.executable, "-c", "import app, medfinder; print(medfinder.__file__)"], cwd=full,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().startswith(str(full))

    # Pushing again stacks a new snapshot on top: still a fast-forward.
    again = _push(space)
    assert again.returncode == 0, again.stderr


def test_bad_use_is_one_sentence_and_exit_2(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("usage:")
    outside = subprocess.run(["bash", str(SCRIPT), "file:///nowhere"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60)
    assert outside.returncode == 2 and "inside the MedFinder repository" in outside.stderr


def _git_blob(repo: Path, path: str) -> bytes:
    return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=repo, capture_output=True, timeout=120).stdout
