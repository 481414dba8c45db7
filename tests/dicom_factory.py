"""Writes small synthetic DICOM series for tests, with fake (never real) patient identifiers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

FAKE_PHI = {
    "PatientName": "Doe^Jane^Fakeperson",
    "PatientID": "FAKE-ID-493817",
    "PatientBirthDate": "19470312",
    "AccessionNumber": "ACC-FAKE-77125",
    "InstitutionName": "Fake General Hospital",
    "ReferringPhysicianName": "Fakedoc^Otto",
}
_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4", "PT": "1.2.840.10008.5.1.4.1.1.128"}


def phantom_pixels(rows: int, cols: int, k: int) -> np.ndarray:
    """HU slice: air around an ellipse of soft tissue with a 'lung' and a bright 'bone'."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    cy, cx = rows / 2, cols / 2
    hu = np.full((rows, cols), -1000, dtype=np.int32)
    body = ((yy - cy) / (rows * 0.42)) ** 2 + ((xx - cx) / (cols * 0.45)) ** 2 < 1
    hu[body] = 40
    hu[((yy - cy) / (rows * 0.2)) ** 2 + ((xx - cx * 0.6) / (cols * 0.12)) ** 2 < 1] = -850
    hu[(yy - rows * 0.75) ** 2 + (xx - cx) ** 2 < (rows * 0.06) ** 2] = 700
    hu[0, 0] = -1000 + k  # marks the slice's true order
    return hu


def write_series(
    folder: Path,
    n: int = 8,
    modality: str = "CT",
    rows: int = 32,
    cols: int = 28,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    step: float = 2.0,
    positions: list[list[float]] | None = None,
    series_uid: str | None = None,
    phi: bool = True,
    name_prefix: str = "IM",
    pixel_spacing_per_slice: dict[int, tuple[float, float]] | None = None,
    study_uid: str | None = None,
    phi_values: dict[str, str] | None = None,
    image_type: list[str] | None = None,
    sop_class: str | None = None,
    series_description: str | None = None,
    orientation: list[float] | None = None,
) -> list[Path]:
    """A series of ``n`` slices in ``folder``; ``phi_values`` overrides FAKE_PHI's values (still fake)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class or _SOP_CLASS[modality]
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20190523"
        ds.Manufacturer = "FAKE"
        ds.KVP = "120"
        ds.SliceThickness = str(step)
        if phi:
            for tag, value in {**FAKE_PHI, **(phi_values or {})}.items():
                setattr(ds, tag, value)
        if image_type:
            ds.ImageType = image_type
        if series_description:
            ds.SeriesDescription = series_description
        ds.InstanceNumber = n - k  # deliberately reversed: loaders must not trust it
        pos = positions[k] if positions else [-10.0, -12.0, 100.0 + k * step]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:g}" for v in (orientation or [1, 0, 0, 0, 1, 0])]
        ps = (pixel_spacing_per_slice or {}).get(k, pixel_spacing)
        ds.PixelSpacing = [f"{ps[0]:g}", f"{ps[1]:g}"]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        stored = phantom_pixels(rows, cols, k) + 1024 if modality == "CT" else np.full((rows, cols), 300) + k
        ds.PixelData = np.clip(stored, 0, 4095).astype(np.uint16).tobytes()
        path = folder / f"{name_prefix}{(k * 7919) % 1000:04d}_{k}.dcm"  # file names not in slice order
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_structured_report(path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    for tag, value in FAKE_PHI.items():
        setattr(ds, tag, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_text_report(path: Path, study_uid: str, sections: dict[str, str], phi_values: dict[str, str] | None = None,
                      series_uid: str | None = None) -> Path:
    """A Basic Text SR (TID 2000 shape) in study ``study_uid``: one container per section, holding its
    text, plus an observer's (fake) name that must never reach a report."""
    from pydicom.sequence import Sequence

    def code(value: str, meaning: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        return item

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid or generate_uid()
    ds.StudyDate, ds.ContentDate, ds.ContentTime = "20190523", "20190524", "101500"
    for tag, value in {**FAKE_PHI, **(phi_values or {})}.items():
        setattr(ds, tag, value)
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([code("18748-4", "Diagnostic Imaging Report")])
    observer = Dataset()
    observer.RelationshipType, observer.ValueType = "HAS OBS CONTEXT", "PNAME"
    observer.ConceptNameCodeSequence = Sequence([code("121008", "Person Observer Name")])
    observer.PersonName = FAKE_PHI["ReferringPhysicianName"]
    items = [observer]
    for name, text in sections.items():
        container = Dataset()
        container.RelationshipType, container.ValueType, container.ContinuityOfContent = "CONTAINS", "CONTAINER", "SEPARATE"
        container.ConceptNameCodeSequence = Sequence([code("121070", name)])
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
        item.ConceptNameCodeSequence = Sequence([code("121071", "Finding")])
        item.TextValue = text
        container.ContentSequence = Sequence([item])
        items.append(container)
    ds.ContentSequence = Sequence(items)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
