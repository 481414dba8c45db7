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
    # A second patient's folder holds a single slice: the reason it is skipped must not name them.
    write_series(tree / "Roe^Richard^Fakeperson" / "FAKE-ID-77", n=1, rows=48, cols=48)
    out = tmp_path / "index"
    proc = subprocess.run([sys.executable, "-m", "index_build", "--dicom-tree", str(tree), "--out", str(out),
                           "--model", str(tiny_model_dir), "--quiet"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["added"] == 1 and summary["failed"] == 1
    (case_id, reason), = summary["failures"].items()
    assert "single slice" in reason and case_id in reason  # named by its case id
    _assert_clean(proc.stdout + proc.stderr, "index_build output")
    proc = subprocess.run([sys.executable, "-m", "index_build", "--dicom-tree", str(tree), "--out", str(out),
                           "--model", str(tiny_model_dir)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "single slice" in proc.stderr  # the warning a build without --quiet logs...
    _assert_clean(proc.stdout + proc.stderr, "index_build log")  # ...names no one either
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


def test_headers_are_deidentified_before_the_allow_list_reads_them(tmp_path):
    """Defence in depth: even a field that names a person or sits in a private tag is gone."""
    import pydicom

    from medfinder.io.deidentify import deidentified_header

    path = write_series(tmp_path / "s", n=2)[0]
    ds = pydicom.dcmread(path)
    ds.PatientAddress = "12 Fake Street, Faketown"
    ds.OperatorsName = "Fakeoperator^Olga"
    ds.StudyID = "FAKE-STUDY-991"
    block = ds.private_block(0x0029, "FAKE VENDOR", create=True)
    block.add_new(0x01, "LO", "FAKE-ID-493817 private copy")
    header = deidentified_header(ds)

    text = "\n".join(str(e.value) for e in header.iterall() if e.VR not in ("OB", "OW", "SQ"))
    for value in PHI_VALUES + ["12 Fake Street", "Fakeoperator", "FAKE-STUDY-991", "FAKE VENDOR"]:
        assert value not in text, f"{value!r} survived de-identification"
    assert "PixelData" not in header and not any(e.tag.is_private for e in header.iterall())
    assert header.Modality == "CT" and header.Rows == ds.Rows  # technical fields are kept
    # The original is untouched: its pixels are still decoded by the loader afterwards.
    assert str(ds.PatientName) == FAKE_PHI["PatientName"] and "PixelData" in ds


def test_loaded_volume_metadata_comes_from_the_deidentified_header(tmp_path, monkeypatch):
    from medfinder.io import deidentify as deid

    from medfinder.io.load import load_volume

    seen = []
    original = deid.deidentified_header
    monkeypatch.setattr(deid, "deidentified_header", lambda ds: seen.append(1) or original(ds))
    folder = tmp_path / "series"
    write_series(folder, n=6)
    volume = load_volume(folder)
    assert seen, "the loader read header fields without de-identifying them first"
    assert volume.metadata["modality"] == "CT" and volume.metadata["study_year"] == 2019
    _assert_clean(json.dumps(volume.metadata), "the volume metadata")
