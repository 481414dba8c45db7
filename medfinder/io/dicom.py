"""A DICOM CT series (files or a folder) into a Volume: slices sorted by position, geometry checked,
and only an allow-list of technical header fields kept, read from a de-identified copy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import (
    NotAVolumeError,
    NotCTError,
    SliceGeometryError,
    UnreadableVolumeError,
)
from .volume import (
    CT_MODALITY,
    DEFAULT_MAX_VOXELS,
    HU_MAX,
    HU_MIN,
    Volume,
    check_voxel_budget,
    finish_volume,
    short_reason,
)

_SAFE_DICOM_FIELDS = {
    "Modality": "modality",
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "scanner_model",
    "SliceThickness": "slice_thickness_mm",
    "KVP": "kvp",
    "BodyPartExamined": "body_part",
    "ConvolutionKernel": "kernel",
}


@dataclass
class _Slice:
    source: Any  # Path or a zip member name
    series: str
    modality: str
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    cols: int
    header: Any


def is_dicom_file(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble ('DICM' at byte 128)."""
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def load_dicom_folder(folder: Path, max_voxels: int, name: str) -> Volume:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    if not files:
        raise UnreadableVolumeError(f"{name}: the folder is empty; expected a DICOM series.")
    return load_dicom_files(files, max_voxels, label=name)


def load_dicom_files(files: list[Path], max_voxels: int, label: str) -> Volume:
    def opener(p: Path) -> Any:
        return p.open("rb")

    return assemble_series(((p, opener) for p in files), max_voxels, label)


def assemble_series(sources: Iterator[tuple[Any, Any]], max_voxels: int, label: str) -> Volume:
    """The CT volume in files (or zip members): each ``(source, opener)`` is read with pydicom, and
    what is not DICOM (a DICOMDIR reader, a readme, a thumbnail) is passed over."""
    return assemble_datasets(_read_datasets(sources), max_voxels, label)


def _read_datasets(sources: Iterator[tuple[Any, Any]]) -> Iterator[Any]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    for src, opener in sources:
        try:
            yield pydicom.dcmread(opener(src), stop_before_pixels=False, defer_size=256)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not DICOM: skip it


def assemble_datasets(datasets: Iterable[Any], max_voxels: int = DEFAULT_MAX_VOXELS, label: str = "the series") -> Volume:
    """The CT volume in pydicom datasets already in memory (fetched from a PACS, received by the
    listener, read from files): the same checks as ``load_volume`` on a DICOM folder, so a series is
    a case by the same rules wherever it comes from. ``label`` names it in every error sentence."""
    slices: list[_Slice] = []
    other_modalities: dict[str, int] = {}
    no_pixels = 0
    for k, ds in enumerate(datasets):
        modality = str(ds.get("Modality", "")).upper()
        if "PixelData" not in ds:
            no_pixels += 1
            continue
        if modality != CT_MODALITY:
            other_modalities[modality or "unknown"] = other_modalities.get(modality or "unknown", 0) + 1
            continue
        try:
            slices.append(
                _Slice(
                    source=k,
                    series=str(ds.get("SeriesInstanceUID", "")),
                    modality=modality,
                    position=np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64),
                    orientation=np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64),
                    pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                    rows=int(ds.Rows),
                    cols=int(ds.Columns),
                    header=ds,
                )
            )
        except (AttributeError, KeyError, TypeError, ValueError, IndexError):
            raise SliceGeometryError(
                f"{label}: a CT slice lacks a valid ImagePositionPatient, ImageOrientationPatient or PixelSpacing."
            ) from None
    if not slices:
        if other_modalities:
            found = ", ".join(f"{m} ({n} files)" for m, n in sorted(other_modalities.items()))
            raise NotCTError(f"{label}: the DICOM series is {found}, not CT.")
        if no_pixels:
            raise UnreadableVolumeError(
                f"{label}: the DICOM files hold no image pixels (e.g. a structured report), so there is no CT to load."
            )
        raise UnreadableVolumeError(f"{label}: no readable DICOM files were found.")

    by_series: dict[str, list[_Slice]] = {}
    for s in slices:
        by_series.setdefault(s.series, []).append(s)
    # Several CT series (e.g. a scout and an axial stack): take the one with most slices,
    # unless two are equally large, when any choice would be a guess.
    sizes = sorted((len(v) for v in by_series.values()), reverse=True)
    if len(sizes) > 1 and sizes[0] == sizes[1]:
        raise SliceGeometryError(
            f"{label}: it holds {len(sizes)} CT series, two of them with {sizes[0]} slices; upload one series at a time."
        )
    series = max(by_series.values(), key=len)
    return _stack_series(series, max_voxels, label, n_series=len(by_series))


def _stack_series(series: list[_Slice], max_voxels: int, label: str, n_series: int) -> Volume:
    from pydicom.pixels import apply_modality_lut

    if len(series) < 2:
        raise NotAVolumeError(f"{label}: the CT series has a single slice, not a 3D volume.")
    first = series[0]
    for s in series:
        if (s.rows, s.cols) != (first.rows, first.cols):
            raise SliceGeometryError(f"{label}: slices have different sizes ({s.rows}x{s.cols} vs {first.rows}x{first.cols}).")
        if not np.allclose(s.orientation, first.orientation, atol=1e-3):
            raise SliceGeometryError(f"{label}: slices have different orientations (ImageOrientationPatient).")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-3):
            raise SliceGeometryError(
                f"{label}: slices have inconsistent pixel spacing ({s.pixel_spacing} vs {first.pixel_spacing} mm)."
            )
    check_voxel_budget((first.cols, first.rows, len(series)), max_voxels, label)
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    # Sort by position along the slice normal: file names and InstanceNumber are not reliable.
    series = sorted(series, key=lambda s: float(s.position @ normal))
    along = np.array([s.position @ normal for s in series])
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        raise SliceGeometryError(f"{label}: the series has duplicated slices at the same position.")
    step = float(np.median(steps))
    if np.max(np.abs(steps - step)) > 0.1 * step + 0.01:
        raise SliceGeometryError(
            f"{label}: slices are unevenly spaced (gaps from {steps.min():.2f} to {steps.max():.2f} mm), "
            "so slices are missing or the series is incomplete."
        )
    offsets = np.array([s.position - series[0].position for s in series[1:]])
    in_plane = offsets - np.outer(offsets @ normal, normal)
    if np.max(np.abs(in_plane)) > 0.05 * step * len(series) + 0.5:
        raise SliceGeometryError(
            f"{label}: the slices are not stacked along their normal (gantry tilt or a sheared series), "
            "which this loader does not correct."
        )

    metadata = _safe_header_fields(series[0].header)
    metadata["n_series_found"] = n_series
    metadata["slice_step_mm"] = round(step, 4)
    # Volume axes: (column index, row index, slice) so that axis 0 follows the row direction.
    vol = np.empty((first.cols, first.rows, len(series)), dtype=np.int16)
    for k, s in enumerate(series):
        try:
            pixels = s.header.pixel_array
        except Exception as exc:
            raise UnreadableVolumeError(
                f"{label}: slice {k + 1} of {len(series)} cannot be decoded ({short_reason(exc)})."
            ) from None
        # A multi-frame slice or a colour image (a dose report or screenshot tagged CT) is not
        # one greyscale plane of this series.
        if pixels.shape != (first.rows, first.cols):
            raise UnreadableVolumeError(
                f"{label}: slice {k + 1} of {len(series)} is not a single greyscale {first.rows}x{first.cols} "
                f"image (its pixel data has shape {'x'.join(map(str, pixels.shape))})."
            )
        try:
            hu = apply_modality_lut(pixels, s.header)
        except Exception as exc:
            raise UnreadableVolumeError(
                f"{label}: slice {k + 1} of {len(series)} has an unusable rescale to Hounsfield units ({short_reason(exc)})."
            ) from None
        vol[:, :, k] = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16).T
        s.header = None  # free each slice's decoded pixels as we go
    row_spacing, col_spacing = first.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = (series[-1].position - series[0].position) / (len(series) - 1)
    lps[:3, 3] = series[0].position
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return finish_volume(vol, ras, label, metadata)


def _safe_header_fields(ds: Any) -> dict[str, Any]:
    """Only non-identifying fields, read from a de-identified copy; the study date as a year alone.

    The year is taken before de-identification because dicognito shifts dates back by up to two
    years; a year alone identifies no one (HIPAA safe harbour keeps it).
    """
    from .deidentify import deidentified_header

    date = str(ds.get("StudyDate", "") or "")
    ds = deidentified_header(ds)
    out: dict[str, Any] = {}
    for tag, key in _SAFE_DICOM_FIELDS.items():
        value = ds.get(tag)
        if value is None or value == "":
            continue
        if key in ("slice_thickness_mm", "kvp"):
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                continue
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            out[key] = "\\".join(str(v) for v in value)
        else:
            out[key] = str(value)
    if len(date) >= 4 and date[:4].isdigit():
        out["study_year"] = int(date[:4])
    return out


# ------------------------------------------------------------------ what a DICOM instance is
#: Why an instance is not a slice of a CT volume: the short reasons a PACS build counts.
LOCALIZER = "localizer or scout"
DOSE_REPORT = "dose report"
SECONDARY_CAPTURE = "secondary capture"
TEXT_REPORT = "report (text SR), read as its study's report"
OTHER_SR = "structured report without a text report"
MULTIFRAME_CT = "multi-frame (enhanced) CT, not read"
_SECONDARY_CAPTURE_CLASSES = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
                              "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4"}
_ENHANCED_CT_CLASSES = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def not_a_ct_slice(ds: Any) -> str | None:
    """Why the instance (or a QIDO result standing for its series) is not a slice of a CT volume, as
    one of the short reasons above or "modality MR, not CT"; None when it may be one.

    Decided from the header alone (SOP class, modality, ImageType, series description): localizers
    and scouts (ImageType LOCALIZER), dose reports (dose SRs, dose screens), secondary captures,
    structured reports and other modalities. Whether the slices form a volume is ``assemble_datasets``'s
    business.
    """
    from .structured_reports import is_dose_report, is_text_report

    sop = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").upper()
    image_type = _upper_values(ds.get("ImageType"))
    description = str(ds.get("SeriesDescription", "") or "").upper()
    # Dose screens: Siemens stores "Patient Protocol", GE "Dose Report", both as captures of the console.
    if (is_dose_report(ds) or "DOSE" in description or "PATIENT PROTOCOL" in description
            or any("DOSE" in v for v in image_type)):
        return DOSE_REPORT
    if is_text_report(ds):
        return TEXT_REPORT
    if sop.startswith(_SR_PREFIX) or modality == "SR":
        return OTHER_SR
    # By SOP class only: a DERIVED\\SECONDARY reformat stored as a CT image is a volume like any other.
    if sop in _SECONDARY_CAPTURE_CLASSES:
        return SECONDARY_CAPTURE
    if "LOCALIZER" in image_type:
        return LOCALIZER
    if modality and modality != CT_MODALITY:
        return f"modality {modality}, not CT"
    if sop in _ENHANCED_CT_CLASSES:
        return MULTIFRAME_CT
    return None


def _upper_values(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip().upper() for v in value.split("\\")]
    try:
        return [str(v).strip().upper() for v in value]
    except TypeError:
        return [str(value).strip().upper()]
