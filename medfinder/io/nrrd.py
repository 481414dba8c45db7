"""NRRD (.nrrd, .nhdr) into a Volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UnreadableVolumeError
from .volume import (
    Volume,
    check_voxel_budget,
    finish_volume,
    short_reason,
    squeezed_shape,
)


def load_nrrd(path: Path, max_voxels: int, name: str) -> Volume:
    import nrrd  # pynrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as exc:
        raise UnreadableVolumeError(f"{name}: not a readable NRRD file ({short_reason(exc)}).") from None
    shape = squeezed_shape(tuple(int(s) for s in header.get("sizes", ())), name)
    check_voxel_budget(shape, max_voxels, name)
    try:
        data, header = nrrd.read(str(path))
    except Exception as exc:
        raise UnreadableVolumeError(f"{name}: the voxel data is truncated or corrupt ({short_reason(exc)}).") from None
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
    return finish_volume(data, affine, name, {})
