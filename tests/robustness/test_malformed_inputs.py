"""The malformed-input corpus: the library raises the documented error, the CLI exits 2 with one
sentence within 10 s and 2 GB, and nothing is left behind in temp folders."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from medfinder.errors import VolumeError
from medfinder.io.load import load_volume

from .corpus import CORPUS

REPO = Path(__file__).resolve().parents[2]
MEMORY_LIMIT = 2 * 1024**3
TIME_LIMIT_S = 10


def test_corpus_has_at_least_30_inputs():
    assert len(CORPUS) >= 30
    assert len({m.name for m in CORPUS}) == len(CORPUS)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.parametrize("case", CORPUS, ids=[m.name for m in CORPUS])
def test_malformed_input_is_refused_cleanly(case, tmp_path):
    path = case.make(tmp_path)
    temp_before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(case.error) as info:
        load_volume(path)
    assert isinstance(info.value, VolumeError)
    assert case.word.lower() in str(info.value).lower()
    assert "\n" not in str(info.value)

    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "medfinder", "check", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=TIME_LIMIT_S, preexec_fn=_limit_memory)
    assert time.perf_counter() - started < TIME_LIMIT_S
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert path.name in lines[0]
    assert set(os.listdir(tempfile.gettempdir())) - temp_before == set()
