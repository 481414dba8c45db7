"""The Volume: a CT in Hounsfield units, RAS+, with its spacing, and the checks every reader applies.

Whatever the source (NIfTI, DICOM, NRRD, NumPy, a phantom painted in memory), a Volume is int16
HU in RAS+ orientation with its spacing and affine, plus a few safe metadata fields; identifying
DICOM fields are never read into it. The readers (``nifti``, ``nrrd``, ``arrays``, ``dicom``,
``archive``) hand their voxels to ``finish_volume``, so every format is validated the same way;
problems raise a ``medfinder.errors.VolumeError`` whose text is one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import nibabel as nib
import numpy as np

from ..errors import (
    InvalidValuesError,
    NotAVolumeError,
    NotCTError,
    SpacingError,
    UnreadableVolumeError,
    VolumeTooLargeError,
)

#: Refuse volumes above this many voxels (1024 x 1024 x 2048) before reading any voxel.
DEFAULT_MAX_VOXELS = 1024 * 1024 * 2048
#: Spacing outside this range (mm) is a broken header, not a real scanner.
SPACING_RANGE_MM = (0.05, 20.0)
#: A body CT always contains air or lung; an image with nothing below this is not in HU.
AIR_EVIDENCE_HU = -500.0
HU_MIN, HU_MAX = -1024, 32767
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
    check_voxel_budget(arr.shape, max_voxels, source or "array")
    return finish_volume(arr, np.asarray(affine, dtype=np.float64), source or "array", dict(metadata or {}))


def check_voxel_budget(shape: Iterable[int], max_voxels: int, name: str) -> None:
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.float64))
    if n > max_voxels:
        raise VolumeTooLargeError(
            f"{name}: {'x'.join(map(str, shape))} is {n:,} voxels, above the limit of {max_voxels:,}."
        )


def _squeeze_to_3d(arr: np.ndarray, name: str) -> np.ndarray:
    shape = squeezed_shape(arr.shape, name)
    return arr.reshape(shape)


def squeezed_shape(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
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


def check_spacing(spacing: Iterable[float], name: str) -> tuple[float, float, float]:
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


def finish_volume(arr: np.ndarray, affine: np.ndarray, name: str, metadata: dict[str, Any],
            slope: float = 1.0, inter: float = 0.0) -> Volume:
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise SpacingError(f"{name}: the voxel-to-world matrix is degenerate or not finite.")
    arr, affine = _reorient_to_ras(arr, affine)
    spacing = check_spacing(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), name)
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


def short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
