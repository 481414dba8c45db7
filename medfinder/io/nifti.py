"""NIfTI (.nii, .nii.gz) into a Volume, with the gzip stream checked to its end."""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..errors import UnreadableVolumeError
from .volume import (
    Volume,
    check_spacing,
    check_voxel_budget,
    finish_volume,
    short_reason,
    squeezed_shape,
)


def load_nifti(path: Path, max_voxels: int, name: str) -> Volume:
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
        raise UnreadableVolumeError(f"{name}: not a readable NIfTI file ({short_reason(exc)}).") from None
    header = img.header
    shape = squeezed_shape(tuple(header.get_data_shape()), name)
    check_voxel_budget(shape, max_voxels, name)
    check_spacing(_raw_nifti_zooms(path, header), name)
    try:
        if path.name.lower().endswith(".gz"):
            raw = _read_gzipped_voxels(path, img.dataobj, shape)
        else:
            raw = np.asanyarray(img.dataobj.get_unscaled()).reshape(shape)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise UnreadableVolumeError(f"{name}: the voxel data is truncated or corrupt ({short_reason(exc)}).") from None
    slope, inter = img.dataobj.slope, img.dataobj.inter
    slope = 1.0 if slope is None or (np.isfinite(slope) and slope == 0) else float(slope)
    inter = 0.0 if inter is None else float(inter)
    affine = np.asarray(img.affine, dtype=np.float64)
    return finish_volume(raw, affine, name, {}, slope, inter)


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
