"""Faults: index_build killed with SIGKILL at several points, then re-run to completion."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from medfinder.errors import CaseIndexError
from medfinder.index import CaseIndex

REPO = Path(__file__).resolve().parents[2]


def _build(manifest: Path, out: Path, model: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "index_build", "--manifest", str(manifest), "--out", str(out), "--model", str(model),
         "--batch-size", "2", "--commit-every", "0", "--quiet"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _committed(out: Path) -> int:
    """Cases in the last committed generation (index.json is replaced atomically, so it is whole)."""
    try:
        return CaseIndex.read_info(out)["counts"]["cases"]
    except CaseIndexError:
        return 0


def test_sigkill_mid_build_then_rerun_gives_every_case_once(tiny_corpus, tiny_model_dir, tmp_path):
    """Each run is killed just after one of its commits lands (at a random moment after it), so the
    kills fall between the first and the last commit of the build, and the re-runs must finish it."""
    out = tmp_path / "index"
    rng = random.Random(2026)
    seen_counts, mid_build_kills = [], 0
    for _ in range(5):
        before = _committed(out)
        proc = _build(tiny_corpus, out, tiny_model_dir)
        while proc.poll() is None and _committed(out) == before:
            time.sleep(0.01)
        if proc.poll() is None:
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        after = _committed(out)
        if proc.returncode == -signal.SIGKILL and 0 < after < 12:
            mid_build_kills += 1
        # Whatever was committed before the kill opens cleanly, checksums and all.
        with CaseIndex.open(out) as index:
            seen_counts.append(len(index))
            assert len(index.case_ids()) == len(index)
        if after == 12:
            break
    assert mid_build_kills >= 1, seen_counts  # a kill that landed between the first and the last commit
    final = _build(tiny_corpus, out, tiny_model_dir)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()
    with CaseIndex.open(out) as index:
        ids = index.case_ids()
        assert len(index) == 12 and len(ids) == 12
        info = index.info()
        assert all(count == 12 for channel, count in info["counts"].items() if channel != "cases")
    assert seen_counts == sorted(seen_counts)  # progress is never lost between kills


def test_corrupted_index_file_is_detected_on_open(tiny_index, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_index, copy)
    target = next(p for p in copy.rglob("*.hnsw"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    try:
        CaseIndex.open(copy)
    except CaseIndexError as exc:
        assert target.name in str(exc)
    else:
        raise AssertionError("a corrupted vector file was not detected")
