"""Dataset adapters (manifest, BIMCV-R, CT-RATE) on tiny trees the tests write, splits, CaseDataset."""

from __future__ import annotations

import csv
import gzip
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfinder.io import datasets as io_datasets
from medfinder.io import manifests
from medfinder.errors import ManifestError
from medfinder.io.datasets import read_bimcv_r, read_ct_rate
from medfinder.io.manifests import ManifestCase, read_manifest, select_split, split_of
from medfinder.training.datasets import CaseDataset, collate_cases
from medfinder.transforms.preprocess import PreprocessConfig, Preprocessor

TINY_PREPROCESS = PreprocessConfig(name="tiny", spacing=(8.0, 8.0, 8.0), shape=(16, 16, 16),
                                   windows=((-1000.0, 200.0), (-160.0, 240.0)))


def write_ct(path: Path, side: str = "right", effusion: bool = False, seed: int = 0) -> Path:
    """A small chest-like CT in HU: body, two lungs, optional dependent fluid, a bright spot on one side."""
    rng = np.random.default_rng(seed)
    shape = (24, 24, 16)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    hu[(x / 0.95) ** 2 + (y / 0.8) ** 2 <= 1] = 40
    for cx in (-0.45, 0.45):
        hu[((x - cx) / 0.35) ** 2 + (y / 0.55) ** 2 <= 1] = -850
    if effusion:
        hu[(((x - 0.45) / 0.35) ** 2 + (y / 0.55) ** 2 <= 1) & (y < -0.2)] = 10
    spot_x = 17 if side == "right" else 6  # RAS: index increases towards the patient's right
    hu[spot_x : spot_x + 3, 10:13, 6:9] = 700
    hu += rng.normal(0, 10, shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([4.0, 4.0, 4.0, 1.0])), str(path))
    return path


def write_tiny_corpus(folder: Path, n: int = 12, extra_rows: list[list[str]] | None = None) -> Path:
    """A manifest of n tiny CTs with reports and two finding label columns."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        side = "right" if i % 2 else "left"
        effusion = i % 3 == 0
        write_ct(folder / "images" / f"case{i:03d}.nii.gz", side, effusion, seed=i)
        report = (f"Findings: Calcified focus in the {side} lung. "
                  + ("Right pleural effusion. " if effusion else "No pleural effusion. ")
                  + "Heart size normal.")
        rows.append([f"case{i:03d}", f"images/case{i:03d}.nii.gz", report, int(effusion), 0, "F" if i % 2 else "M", 40 + i])
    rows.extend(extra_rows or [])
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "image", "report", "Pleural effusion", "Cardiomegaly", "sex", "age"])
        writer.writerows(rows)
    return folder / "manifest.csv"


@pytest.fixture
def finding_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    names = {"Pleural effusion", "Cardiomegaly"}
    monkeypatch.setattr(manifests, "known_finding_names", lambda: names)
    monkeypatch.setattr(io_datasets, "known_finding_names", lambda: names)
    return names


def _nifti_loader(path: Path):
    from medfinder.io.load import load_volume

    return load_volume(path)


# --------------------------------------------------------------------------- manifest
def test_manifest_labels_metadata_and_relative_images(tmp_path: Path, finding_names: set[str]) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "case_id,image,report,Pleural effusion,Cardiomegaly,Lung nodule,sex,age,scanner\n"
        "a,img/a.nii.gz,Small right effusion.,1,0,1,F,71,Siemens\n"
        'b,,"No effusion, normal heart.",0,,0,M,55,\n',
        encoding="utf-8",
    )
    a, b = read_manifest(manifest)
    assert a.case_id == "a" and a.image == tmp_path / "img" / "a.nii.gz"
    assert a.labels == {"Pleural effusion": 1, "Cardiomegaly": 0}
    assert a.metadata == {"Lung nodule": 1, "sex": "F", "age": 71, "scanner": "Siemens"}
    assert b.image is None and b.report == "No effusion, normal heart."
    assert b.labels == {"Pleural effusion": 0}  # an empty cell is unknown, not negative
    assert b.metadata == {"Lung nodule": 0, "sex": "M", "age": 55}


def test_manifest_label_columns_can_be_named(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,image,report,Custom finding\nx,,text,1\n", encoding="utf-8")
    (record,) = read_manifest(manifest, label_columns=["Custom finding"])
    assert record.labels == {"Custom finding": 1}
    with pytest.raises(ManifestError, match="label column"):
        read_manifest(manifest, label_columns=["Absent"])


def test_phantom_finding_names_are_known_labels() -> None:
    from medfinder.phantoms import PHANTOM_FINDINGS

    assert set(PHANTOM_FINDINGS) <= manifests.known_finding_names()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("case_id,image\nx,\n", "lacks the column"),
        ("case_id,image,report\nx,,a\nx,,b\n", "repeats case_id 'x' on lines 2 and 3"),
        ("case_id,image,report\n,,a\n", "empty case_id on line 2"),
    ],
)
def test_manifest_errors_name_the_file_and_problem(tmp_path: Path, content: str | None, message: str) -> None:
    manifest = tmp_path / "bad.csv"
    if content is not None:
        manifest.write_text(content, encoding="utf-8")
    with pytest.raises(ManifestError, match=message) as info:
        read_manifest(manifest)
    assert "bad.csv" in str(info.value)


def test_non_utf8_manifest_is_a_manifest_error(tmp_path: Path) -> None:
    manifest = tmp_path / "latin.csv"
    manifest.write_bytes("case_id,image,report\nx,,Derrame pleural peque\xf1o\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_manifest(manifest)


# --------------------------------------------------------------------------- BIMCV-R and CT-RATE
def test_bimcv_r_layout(tmp_path: Path) -> None:
    root = tmp_path / "bimcv"
    write_ct(root / "CT0001" / "ct" / "sub-S01_ses-E01_ct.nii.gz")
    write_ct(root / "CT0002" / "ct" / "sub-S02_ses-E02_ct.nii.gz")
    write_ct(root / "CT0003" / "ct" / "sub-S03_ses-E03_ct.nii.gz")
    (root / "reports").mkdir()
    with (root / "reports" / "reports_en.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "Report_es", "Report_en"])
        writer.writerow(["CT0001/ct/sub-S01_ses-E01_ct.nii.gz", "Derrame.", "Right pleural effusion."])
        writer.writerow(["sub-S02_ses-E02_ct.nii.gz", "Normal.", "No acute findings."])
        writer.writerow(["CT0009/ct/sub-S09_ses-E09_ct.nii.gz", "Nodulo.", "Lung nodule."])
    records = {r.case_id: r for r in read_bimcv_r(root)}
    assert set(records) == {"sub-S01_ses-E01_ct", "sub-S02_ses-E02_ct", "sub-S03_ses-E03_ct", "sub-S09_ses-E09_ct"}
    assert records["sub-S01_ses-E01_ct"].report == "Right pleural effusion."
    assert records["sub-S01_ses-E01_ct"].image == root / "CT0001" / "ct" / "sub-S01_ses-E01_ct.nii.gz"
    assert records["sub-S01_ses-E01_ct"].metadata["patient_id"] == "CT0001"
    assert records["sub-S02_ses-E02_ct"].report == "No acute findings."
    assert records["sub-S03_ses-E03_ct"].report == ""  # a volume without a report row is kept
    assert records["sub-S09_ses-E09_ct"].image is None  # a report whose volume is absent


def test_bimcv_r_without_report_table_is_an_error(tmp_path: Path) -> None:
    write_ct(tmp_path / "CT0001" / "ct" / "a.nii.gz")
    with pytest.raises(ManifestError, match="'path' and 'Report_en'"):
        read_bimcv_r(tmp_path)


def test_ct_rate_layout(tmp_path: Path, finding_names: set[str]) -> None:
    root = tmp_path / "ct-rate"
    write_ct(root / "valid" / "valid_53" / "valid_53_a" / "valid_53_a_1.nii.gz")
    write_ct(root / "valid" / "valid_53" / "valid_53_a" / "valid_53_a_2.nii.gz")
    write_ct(root / "valid" / "valid_7" / "valid_7_b" / "valid_7_b_1.nii.gz")
    (root / "radiology_text_reports").mkdir()
    with (root / "radiology_text_reports" / "validation_reports.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"])
        writer.writerow(["valid_53_a_1.nii.gz", "Cough.", "Non-contrast.", "Right pleural effusion.", "Effusion."])
        writer.writerow(["valid_53_a_2.nii.gz", "Cough.", "Non-contrast.", "Right pleural effusion.", "Effusion."])
        writer.writerow(["valid_7_b_1.nii.gz", "", "", "Heart enlarged.", ""])
    (root / "multi_abnormality_labels").mkdir()
    with (root / "multi_abnormality_labels" / "valid_labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["VolumeName", "Pleural effusion", "Cardiomegaly"])
        writer.writerow(["valid_53_a_1.nii.gz", 1, 0])
        writer.writerow(["valid_7_b_1.nii.gz", 0, 1])
    records = {r.case_id: r for r in read_ct_rate(root)}
    assert set(records) == {"valid_53_a_1", "valid_53_a_2", "valid_7_b_1"}
    first = records["valid_53_a_1"]
    assert first.report == "Findings: Right pleural effusion.\nImpression: Effusion."
    assert first.labels == {"Pleural effusion": 1, "Cardiomegaly": 0}
    assert first.image is not None and first.image.name == "valid_53_a_1.nii.gz"
    assert records["valid_7_b_1"].report == "Findings: Heart enlarged."
    # reconstructions of one patient share a patient key, hence a split
    assert first.metadata["patient_id"] == records["valid_53_a_2"].metadata["patient_id"] == "valid_53"
    assert split_of(first) == split_of(records["valid_53_a_2"])


def test_ct_rate_without_reports_is_an_error(tmp_path: Path) -> None:
    write_ct(tmp_path / "valid_1_a_1.nii.gz")
    with pytest.raises(ManifestError, match="Findings_EN"):
        read_ct_rate(tmp_path)


# --------------------------------------------------------------------------- splits
def test_hash_split_is_stable_and_close_to_80_10_10() -> None:
    ids = [f"case-{i}" for i in range(4000)]
    counts = Counter(split_of(i) for i in ids)
    assert abs(counts["train"] / 4000 - 0.8) < 0.03
    assert abs(counts["val"] / 4000 - 0.1) < 0.02
    assert abs(counts["test"] / 4000 - 0.1) < 0.02
    assert [split_of(i) for i in ids[:50]] == [split_of(i) for i in ids[:50]]
    records = [ManifestCase(i, None, "") for i in ids[:200]]
    assert sum(len(select_split(records, s)) for s in ("train", "val", "test")) == 200
    assert len(select_split(records, "all")) == 200


# --------------------------------------------------------------------------- torch dataset
def test_case_dataset_skips_missing_and_corrupt_images(tmp_path: Path, finding_names: set[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "corpus" / "images" / "broken.nii.gz"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(gzip.compress(b"not a nifti at all"))
    manifest = write_tiny_corpus(tmp_path / "corpus", n=3, extra_rows=[
        ["missing", "images/missing.nii.gz", "Text.", 0, 0, "F", 50],
        ["broken", "images/broken.nii.gz", "Text.", 0, 0, "F", 50],
        ["report-only", "", "Text only.", 0, 0, "F", 50],
    ])
    records = read_manifest(manifest)
    dataset = CaseDataset(records, Preprocessor(TINY_PREPROCESS), ["Pleural effusion"], loader=_nifti_loader, cache=True)
    assert len(dataset) == 5  # the report-only case is left out up front
    batch = collate_cases([dataset[i] for i in range(len(dataset))])
    assert batch is not None and batch["case_id"] == ["case000", "case001", "case002"]
    assert batch["image"].shape == (3, 2, 16, 16, 16)
    assert batch["labels"][:, 0].tolist() == [1.0, 0.0, 0.0]
    assert set(dataset.failures) == {"missing", "broken"}
    assert "missing.nii.gz" in caplog.text and "broken.nii.gz" in caplog.text
    assert dataset.usable_indices() == [0, 1, 2]
    assert collate_cases([None, None]) is None


def test_preload_fills_the_cache_and_records_failures(tmp_path: Path, finding_names: set[str]) -> None:
    manifest = write_tiny_corpus(tmp_path / "corpus", n=2, extra_rows=[["gone", "images/gone.nii.gz", "x", 0, 0, "F", 1]])
    dataset = CaseDataset(read_manifest(manifest), Preprocessor(TINY_PREPROCESS), loader=_nifti_loader, cache=True)
    dataset.preload(workers=0)
    assert set(dataset._cached) == {0, 1} and set(dataset.failures) == {"gone"}
    direct = Preprocessor(TINY_PREPROCESS)(_nifti_loader(dataset.records[0].image))
    # One byte per voxel, within half a level of the preprocessed volume.
    assert dataset._cached[0].dtype == torch.uint8
    assert torch.allclose(dataset[0]["image"], direct, atol=0.5 / 255 + 1e-6)


def test_a_cached_case_reads_the_same_the_first_time_and_after(tmp_path: Path) -> None:
    manifest = write_tiny_corpus(tmp_path / "corpus", n=1)
    dataset = CaseDataset(read_manifest(manifest), Preprocessor(TINY_PREPROCESS), loader=_nifti_loader, cache=True)
    first, again = dataset[0]["image"], dataset[0]["image"]
    assert torch.equal(first, again)


def test_the_cache_keeps_values_outside_the_unit_range() -> None:
    from medfinder.training.datasets import pack_for_cache, unpack_from_cache

    windowed = torch.rand(2, 8, 8, 8)
    assert pack_for_cache(windowed).dtype == torch.uint8
    assert (unpack_from_cache(pack_for_cache(windowed)) - windowed).abs().max() <= 0.5 / 255 + 1e-6
    # A preprocessor without clipped windows (HU / 1000, say) must not be squeezed into [0, 1].
    unwindowed = torch.tensor([-1.0, 0.25, 3.0])
    assert pack_for_cache(unwindowed).dtype == torch.float16
    assert torch.equal(unpack_from_cache(pack_for_cache(unwindowed)), unwindowed)


def test_preload_in_worker_processes_keeps_one_private_copy(tmp_path: Path) -> None:
    from medfinder.training.datasets import _Uncached

    manifest = write_tiny_corpus(tmp_path / "corpus", n=2, extra_rows=[["gone", "images/gone.nii.gz", "x", 0, 0, "F", 1]])
    dataset = CaseDataset(read_manifest(manifest), Preprocessor(TINY_PREPROCESS), loader=_nifti_loader, cache=True)
    # What a worker runs must not cache: in a worker process that cache is a second copy of every
    # volume it preprocesses, which ran a 5,500-case preload out of memory.
    _Uncached(dataset)[0]
    assert dataset._cached == {}
    dataset.preload(workers=2)
    assert set(dataset._cached) == {0, 1} and set(dataset.failures) == {"gone"}
    assert all(t.dtype == torch.uint8 and not t.is_shared() for t in dataset._cached.values())
