"""CT ingestion: every file a clinician or dataset hands us becomes one trustworthy Volume.

Formats: NIfTI (.nii, .nii.gz), a DICOM series (a folder or a .zip), NRRD (.nrrd, .nhdr) and
NumPy (.npy, .npz). Whatever the source, the result is HU as int16 in RAS+ orientation with
its spacing and affine, plus a few safe metadata fields; identifying DICOM fields are never
read into it. Problems raise a ``medfinder.errors.VolumeError`` whose text is one sentence.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import nibabel as nib
import numpy as np

from .errors import (
    InvalidValuesError,
    NotAVolumeError,
    NotCTError,
    SliceGeometryError,
    SpacingError,
    UnreadableVolumeError,
    UnsafeArchiveError,
    VolumeTooLargeError,
)

#: Refuse volumes above this many voxels (1024 x 1024 x 2048) before reading any voxel.
DEFAULT_MAX_VOXELS = 1024 * 1024 * 2048
#: A DICOM zip may not unpack to more than this many bytes in total.
DEFAULT_MAX_ARCHIVE_BYTES = 4 * 1024**3
#: A member larger than this that deflates more than BOMB_RATIO times is a zip bomb (DICOM
#: slices, even mostly air, compress far less; deflate's ceiling is about 1032:1).
BOMB_MIN_BYTES = 16 * 1024**2
BOMB_RATIO = 200
#: Spacing outside this range (mm) is a broken header, not a real scanner.
SPACING_RANGE_MM = (0.05, 20.0)
#: A body CT always contains air or lung; an image with nothing below this is not in HU.
AIR_EVIDENCE_HU = -500.0
HU_MIN, HU_MAX = -1024, 32767
#: Spacing assumed for .npy/.npz arrays that do not carry one.
DEFAULT_NUMPY_SPACING = (1.0, 1.0, 1.0)
CT_MODALITY = "CT"


@dataclass(frozen=True, eq=False)
class Volume:
    """A CT volume in Hounsfield units, canonical RAS+ orientation.

    ``hu`` is int16 with array axes (x, y, z) in nibabel's RAS+ convention: the index along
    axis 0 increases towards the patient's Right, axis 1 towards Anterior, axis 2 towards
    Superior. ``spacing`` is the voxel size in mm along those axes; ``affine`` maps voxel
    indices to RAS+ world mm. ``metadata`` holds only safe, non-identifying fields.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.shape, self.spacing))  # type: ignore[return-value]

    def __repr__(self) -> str:
        sx, sy, sz = self.spacing
        return (
            f"Volume(source={self.source!r}, shape={self.shape}, spacing=({sx:.3g}, {sy:.3g}, {sz:.3g}) mm, "
            f"orientation={self.orientation}, HU=[{int(self.hu.min())}, {int(self.hu.max())}])"
        )


# ----------------------------------------------------------------------------- public API
def load_volume(
    path: str | os.PathLike[str],
    *,
    spacing: tuple[float, float, float] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
    label: str | None = None,
) -> Volume:
    """Load a CT from any supported source and validate it.

    ``spacing`` is only used for .npy/.npz arrays (default 1 mm isotropic, recorded in the
    metadata as assumed). ``path`` may also be a list of DICOM files (several uploads).
    ``label`` names the CT in error messages and in ``Volume.source`` instead of the file or
    folder name, which for a DICOM tree is often the patient's name.
    """
    if isinstance(path, (list, tuple)):
        return _load_dicom_files([Path(p) for p in path], max_voxels, label=label or f"the {len(path)} uploaded files")
    p = Path(path)
    name = label or p.name
    if not p.exists():
        raise UnreadableVolumeError(f"{name}: the file or folder does not exist.")
    if p.is_dir():
        return _load_dicom_folder(p, max_voxels, name)
    if p.stat().st_size == 0:
        raise UnreadableVolumeError(f"{name}: the file is empty.")
    lower = p.name.lower()
    if lower.endswith((".nii", ".nii.gz")):
        return _load_nifti(p, max_voxels, name)
    if lower.endswith(".zip"):
        return _load_dicom_zip(p, max_voxels, max_archive_bytes, name)
    if lower.endswith((".nrrd", ".nhdr")):
        return _load_nrrd(p, max_voxels, name)
    if lower.endswith((".npy", ".npz")):
        return _load_numpy(p, spacing or DEFAULT_NUMPY_SPACING, assumed=spacing is None, max_voxels=max_voxels, name=name)
    if lower.endswith(".dcm") or is_dicom_file(p):
        return _load_dicom_files([p], max_voxels, label=name)
    raise UnreadableVolumeError(
        f"{name}: unsupported file type; expected .nii/.nii.gz, a DICOM folder or .zip, .nrrd, or .npy/.npz."
    )


def volume_from_array(
    hu: np.ndarray,
    affine: np.ndarray,
    *,
    source: str = "",
    metadata: dict[str, Any] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Volume:
    """Validate an array in HU with its voxel-to-world affine (RAS+) and reorient it to RAS."""
    arr = _squeeze_to_3d(np.asanyarray(hu), source or "array")
    _check_budget(arr.shape, max_voxels, source or "array")
    return _finish(arr, np.asarray(affine, dtype=np.float64), source or "array", dict(metadata or {}))


# ----------------------------------------------------------------------------- validation
def _check_budget(shape: Iterable[int], max_voxels: int, name: str) -> None:
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.float64))
    if n > max_voxels:
        raise VolumeTooLargeError(
            f"{name}: {'x'.join(map(str, shape))} is {n:,} voxels, above the limit of {max_voxels:,}."
        )


def _squeeze_to_3d(arr: np.ndarray, name: str) -> np.ndarray:
    shape = _squeezed_shape(arr.shape, name)
    return arr.reshape(shape)


def _squeezed_shape(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    """Trailing singleton axes (a 4D NIfTI with one frame) are fine; anything else is not a volume."""
    dims = list(int(s) for s in shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) > 3:
        raise NotAVolumeError(
            f"{name}: the image has {len(dims)} dimensions with shape {tuple(shape)} (several frames or channels), "
            "not a single 3D volume."
        )
    if len(dims) < 3 or min(dims) < 2:
        raise NotAVolumeError(f"{name}: the image is {len(shape)}D with shape {tuple(shape)}, not a 3D volume.")
    return tuple(dims)  # type: ignore[return-value]


def _check_spacing(spacing: Iterable[float], name: str) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    lo, hi = SPACING_RANGE_MM
    if len(values) != 3 or not all(np.isfinite(values)) or not all(lo <= s <= hi for s in values):
        shown = ", ".join(f"{s:g}" for s in values)
        raise SpacingError(f"{name}: voxel spacing ({shown}) mm is not usable; each must be between {lo} and {hi} mm.")
    return values  # type: ignore[return-value]


def _to_hu_int16(arr: np.ndarray, name: str, slope: float = 1.0, inter: float = 0.0) -> np.ndarray:
    """Apply the stored scaling once, reject NaN/inf, round and clip into int16 HU.

    Works slab by slab so that a float64 copy of a large volume never exists.
    """
    if not np.isfinite(slope) or not np.isfinite(inter):
        raise InvalidValuesError(f"{name}: the intensity scaling (slope {slope}, intercept {inter}) is not finite.")
    if arr.dtype == np.int16 and slope == 1.0 and inter == 0.0:
        # Keep the file's memory order (NIfTI is Fortran order): a C-order copy costs ~1 s at 512x512x300.
        return np.maximum(arr, HU_MIN, order="K")
    if arr.dtype.kind not in "biuf":
        raise UnreadableVolumeError(f"{name}: voxel type {arr.dtype} is not a number type.")
    out = np.empty(arr.shape, dtype=np.int16)
    for z in range(0, arr.shape[2], 16):
        slab = np.asarray(arr[:, :, z : z + 16], dtype=np.float32)
        if slope != 1.0 or inter != 0.0:
            slab = slab * np.float32(slope) + np.float32(inter)
        if arr.dtype.kind == "f" and not np.isfinite(slab).all():
            bad = int((~np.isfinite(slab)).sum())
            raise InvalidValuesError(f"{name}: the voxels contain NaN or infinite values ({bad} at least).")
        np.clip(np.rint(slab), HU_MIN, HU_MAX, out=slab)
        out[:, :, z : z + 16] = slab
    return out


def _check_is_ct(hu: np.ndarray, name: str) -> None:
    # Subsample: the check needs the share of air-like voxels, not every voxel.
    sample = hu[::2, ::2, ::2]
    if np.count_nonzero(sample < AIR_EVIDENCE_HU) < 0.005 * sample.size:
        raise NotCTError(
            f"{name}: intensities range from {int(hu.min())} to {int(hu.max())} with almost nothing below "
            f"{AIR_EVIDENCE_HU:g}, so they are not Hounsfield units (a body CT contains air near -1000 HU); "
            "this looks like MR, PET or an unscaled image."
        )


def _finish(arr: np.ndarray, affine: np.ndarray, name: str, metadata: dict[str, Any],
            slope: float = 1.0, inter: float = 0.0) -> Volume:
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise SpacingError(f"{name}: the voxel-to-world matrix is degenerate or not finite.")
    arr, affine = _reorient_to_ras(arr, affine)
    spacing = _check_spacing(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), name)
    hu = _to_hu_int16(arr, name, slope, inter)
    _check_is_ct(hu, name)
    metadata.setdefault("modality", CT_MODALITY)
    return Volume(hu=hu, spacing=spacing, affine=affine, metadata=metadata, source=name)


def _reorient_to_ras(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose (no resampling) to the closest RAS+ axes, as nibabel's as_closest_canonical."""
    ornt = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt("RAS")
    transform = nib.orientations.ornt_transform(ornt, target)
    if np.array_equal(transform, target):
        return arr, affine
    new = nib.orientations.apply_orientation(arr, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, arr.shape)
    return new, new_affine


# ----------------------------------------------------------------------------- NIfTI
def _load_nifti(path: Path, max_voxels: int, name: str) -> Volume:
    if path.name.lower().endswith(".gz"):
        _check_gzip_member(path, name)
    # nibabel logs header repairs (e.g. zero pixdim) to stderr; we report such problems ourselves.
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return _load_nifti_quietly(path, max_voxels, name)
    finally:
        logger.setLevel(level)


def _load_nifti_quietly(path: Path, max_voxels: int, name: str) -> Volume:
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for junk files
        raise UnreadableVolumeError(f"{name}: not a readable NIfTI file ({_short(exc)}).") from None
    header = img.header
    shape = _squeezed_shape(tuple(header.get_data_shape()), name)
    _check_budget(shape, max_voxels, name)
    _check_spacing(_raw_nifti_zooms(path, header), name)
    try:
        if path.name.lower().endswith(".gz"):
            raw = _read_gzipped_voxels(path, img.dataobj, shape)
        else:
            raw = np.asanyarray(img.dataobj.get_unscaled()).reshape(shape)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise UnreadableVolumeError(f"{name}: the voxel data is truncated or corrupt ({_short(exc)}).") from None
    slope, inter = img.dataobj.slope, img.dataobj.inter
    slope = 1.0 if slope is None or (np.isfinite(slope) and slope == 0) else float(slope)
    inter = 0.0 if inter is None else float(inter)
    affine = np.asarray(img.affine, dtype=np.float64)
    return _finish(raw, affine, name, {}, slope, inter)


#: Bytes a .nii.gz may carry after its voxels (NIfTI allows none; tolerate small padding).
_TRAILING_SLACK = 1 << 20


def _read_gzipped_voxels(path: Path, proxy: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """The voxels of a .nii.gz, read to the end of the stream so the gzip CRC is checked.

    nibabel stops reading once it has the voxels, so a bit-flipped stream that still inflates
    would load as silent garbage; reading on to the end makes gzip verify its checksum. The
    read is capped at the size the header declares, so a gzip bomb cannot fill memory.
    """
    dtype = proxy.dtype
    offset = int(proxy.offset)
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    with gzip.open(path, "rb") as fh:
        data = fh.read(expected)
        if len(data) < expected:
            raise EOFError(f"{len(data):,} of {expected:,} bytes")
        if len(fh.read(_TRAILING_SLACK + 1)) > _TRAILING_SLACK:
            raise ValueError("more data than the header declares")
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape, order="F")


def _raw_nifti_zooms(path: Path, header: Any) -> tuple[float, ...]:
    """Voxel sizes as written in the file.

    nibabel quietly replaces a zero pixdim by 1 mm when it reads a header; when no sform
    overrides pixdim, that would turn a broken file into a wrong spacing, so read it raw.
    """
    if int(header["sform_code"]) > 0:
        return tuple(float(z) for z in header.get_zooms()[:3])
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as fh:
        raw = type(header).from_fileobj(fh, check=False)
    return tuple(float(z) for z in raw["pixdim"][1:4])


def _check_gzip_member(path: Path, name: str) -> None:
    with path.open("rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            raise UnreadableVolumeError(f"{name}: the file is named .gz but is not gzip-compressed.")


# ----------------------------------------------------------------------------- NRRD
def _load_nrrd(path: Path, max_voxels: int, name: str) -> Volume:
    import nrrd  # pynrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as exc:
        raise UnreadableVolumeError(f"{name}: not a readable NRRD file ({_short(exc)}).") from None
    shape = _squeezed_shape(tuple(int(s) for s in header.get("sizes", ())), name)
    _check_budget(shape, max_voxels, name)
    try:
        data, header = nrrd.read(str(path))
    except Exception as exc:
        raise UnreadableVolumeError(f"{name}: the voxel data is truncated or corrupt ({_short(exc)}).") from None
    data = data.reshape(shape)
    directions = header.get("space directions")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    if directions is not None:
        dirs = np.asarray([d for d in directions if d is not None and not np.all(np.isnan(np.asarray(d, float)))],
                          dtype=np.float64)
        affine[:3, :3] = dirs.T
    elif "spacings" in header:
        affine[:3, :3] = np.diag(np.asarray(header["spacings"], dtype=np.float64)[:3])
    affine[:3, 3] = origin[:3]
    space = str(header.get("space", "right-anterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        affine[:2, :] *= -1
    elif space not in ("right-anterior-superior", "ras", "scanner-xyz", "3d-right-handed"):
        raise UnreadableVolumeError(f"{name}: NRRD space {space!r} is not a patient coordinate system.")
    return _finish(data, affine, name, {})


# ----------------------------------------------------------------------------- NumPy
def _load_numpy(path: Path, spacing: tuple[float, float, float], assumed: bool, max_voxels: int, name: str) -> Volume:
    try:
        loaded = np.load(str(path), allow_pickle=False, mmap_mode="r" if path.name.lower().endswith(".npy") else None)
    except Exception as exc:
        raise UnreadableVolumeError(f"{name}: not a readable NumPy file ({_short(exc)}).") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.files)
            key = next((k for k in ("hu", "image", "volume") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise UnreadableVolumeError(f"{name}: the .npz holds {keys}; name the array 'hu' or 'image'.")
            if "spacing" in keys:
                spacing, assumed = tuple(float(s) for s in loaded["spacing"]), False  # type: ignore[assignment]
            arr = loaded[key]
    else:
        arr = loaded
    shape = _squeezed_shape(arr.shape, name)
    _check_budget(shape, max_voxels, name)
    spacing = _check_spacing(spacing, name)
    affine = np.diag([*spacing, 1.0])
    return _finish(np.asarray(arr).reshape(shape), affine, name, {"spacing_assumed": assumed})


# ----------------------------------------------------------------------------- DICOM
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


def _load_dicom_folder(folder: Path, max_voxels: int, name: str) -> Volume:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    if not files:
        raise UnreadableVolumeError(f"{name}: the folder is empty; expected a DICOM series.")
    return _load_dicom_files(files, max_voxels, label=name)


def _load_dicom_files(files: list[Path], max_voxels: int, label: str) -> Volume:
    def opener(p: Path) -> Any:
        return p.open("rb")

    return _assemble_series(((p, opener) for p in files), max_voxels, label)


def _load_dicom_zip(path: Path, max_voxels: int, max_bytes: int, name: str) -> Volume:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnreadableVolumeError(f"{name}: not a readable zip archive ({_short(exc)}).") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        _check_archive_members(members, name, max_bytes)
        budget = _ByteBudget(max_bytes, name)

        def opener(member: zipfile.ZipInfo) -> Any:
            # Members are read into memory through a counting reader: nothing touches disk,
            # and a member that lies about its size still stops at the budget.
            with archive.open(member) as fh:
                return io.BytesIO(budget.read_all(fh, member.filename))

        return _assemble_series(((m, opener) for m in members), max_voxels, name)


def _check_archive_members(members: list[zipfile.ZipInfo], name: str, max_bytes: int) -> None:
    if not members:
        raise UnreadableVolumeError(f"{name}: the zip archive is empty; expected a DICOM series.")
    total = 0
    for m in members:
        fn = m.filename.replace("\\", "/")
        if fn.startswith("/") or (len(fn) > 1 and fn[1] == ":") or ".." in fn.split("/"):
            raise UnsafeArchiveError(f"{name}: the archive member {m.filename!r} points outside the archive folder.")
        mode = (m.external_attr >> 16) & 0o170000
        if mode == stat.S_IFLNK:
            raise UnsafeArchiveError(f"{name}: the archive member {m.filename!r} is a symbolic link.")
        total += m.file_size
        if m.file_size > BOMB_MIN_BYTES and m.file_size > BOMB_RATIO * max(m.compress_size, 1):
            raise UnsafeArchiveError(
                f"{name}: the archive member {m.filename!r} expands {m.file_size // max(m.compress_size, 1):,} times "
                "(a zip bomb), so it was not unpacked."
            )
    if total > max_bytes:
        raise UnsafeArchiveError(
            f"{name}: the archive would unpack to {total / 1e6:,.0f} MB, above the limit of {max_bytes / 1e6:,.0f} MB."
        )


class _ByteBudget:
    def __init__(self, limit: int, name: str) -> None:
        self.left = limit
        self.name = name

    def read_all(self, fh: Any, member: str) -> bytes:
        chunks = []
        while True:
            try:
                chunk = fh.read(1 << 20)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                raise UnreadableVolumeError(f"{self.name}: member {member!r} is corrupt ({_short(exc)}).") from None
            if not chunk:
                return b"".join(chunks)
            self.left -= len(chunk)
            if self.left < 0:
                raise UnsafeArchiveError(f"{self.name}: the archive unpacks past the size limit.")
            chunks.append(chunk)


def _assemble_series(sources: Iterator[tuple[Any, Any]], max_voxels: int, label: str) -> Volume:
    import pydicom
    from pydicom.errors import InvalidDicomError

    slices: list[_Slice] = []
    other_modalities: dict[str, int] = {}
    no_pixels = 0
    for src, opener in sources:
        try:
            ds = pydicom.dcmread(opener(src), stop_before_pixels=False, defer_size=256)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not DICOM (a DICOMDIR reader, a readme, a thumbnail): skip it
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
                    source=src,
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
    _check_budget((first.cols, first.rows, len(series)), max_voxels, label)
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
                f"{label}: slice {k + 1} of {len(series)} cannot be decoded ({_short(exc)})."
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
                f"{label}: slice {k + 1} of {len(series)} has an unusable rescale to Hounsfield units ({_short(exc)})."
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
    return _finish(vol, ras, label, metadata)


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


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
