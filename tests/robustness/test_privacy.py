"""No patient-identifying DICOM value survives into the index, the CLI's output or the app's answers."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from dicom_factory import FAKE_PHI, write_series

REPO = Path(__file__).resolve().parents[2]
PHI_VALUES = [v for v in FAKE_PHI.values()] + ["19470312", "Fakeperson", "FAKE-ID", "ACC-FAKE"]


def _phi_series(tmp_path: Path) -> tuple[Path, Path]:
    # The folder is named after the patient, as archives often are.
    folder = tmp_path / "tree" / "Doe^Jane^Fakeperson" / "FAKE-ID-493817"
    write_series(folder, n=8, rows=48, cols=48)
    archive = tmp_path / "phi_series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"study/{f.name}")
    return tmp_path / "tree", archive


def _assert_clean(blob: bytes | str, where: str) -> None:
    data = blob.encode() if isinstance(blob, str) else blob
    for value in PHI_VALUES:
        assert value.encode() not in data, f"{value!r} leaked into {where}"


def test_dicom_identifiers_never_reach_the_index_or_cli(tmp_path, tiny_model_dir, tiny_index):
    tree, archive = _phi_series(tmp_path)
    out = tmp_path / "index"
    proc = subprocess.run([sys.executable, "-m", "index_build", "--dicom-tree", str(tree), "--out", str(out),
                           "--model", str(tiny_model_dir), "--quiet"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["added"] == 1
    _assert_clean(proc.stdout + proc.stderr, "index_build output")
    for stored in out.rglob("*"):
        if stored.is_file():
            _assert_clean(stored.read_bytes(), f"index file {stored.name}")

    search = subprocess.run([sys.executable, "-m", "medfinder", "search", "--index", str(tiny_index), "--model",
                             str(tiny_model_dir), "--image", str(archive), "--json", "-k", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert search.returncode == 0, search.stderr
    _assert_clean(search.stdout + search.stderr, "search output")
    check = subprocess.run([sys.executable, "-m", "medfinder", "check", str(archive), "--json"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and json.loads(check.stdout)[0]["metadata"]["study_year"] == 2019
    _assert_clean(check.stdout + check.stderr, "check output")
