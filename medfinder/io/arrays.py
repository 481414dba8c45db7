"""NumPy arrays (.npy, .npz) into a Volume; a bare array carries no spacing, so one is assumed and said."""

from __future__ import annotations

from pathlib import Path

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

#: Spacing assumed for .npy/.npz arrays that do not carry one.
DEFAULT_NUMPY_SPACING = (1.0, 1.0, 1.0)


def load_numpy(path: Path, spacing: tuple[float, float, float], assumed: bool, max_voxels: int, name: str) -> Volume:
    try:
        loaded = np.load(str(path), allow_pickle=False, mmap_mode="r" if path.name.lower().endswith(".npy") else None)
    except Exception as exc:
        raise UnreadableVolumeError(f"{name}: not a readable NumPy file ({short_reason(exc)}).") from None
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
    shape = squeezed_shape(arr.shape, name)
    check_voxel_budget(shape, max_voxels, name)
    spacing = check_spacing(spacing, name)
    affine = np.diag([*spacing, 1.0])
    return finish_volume(np.asarray(arr).reshape(shape), affine, name, {"spacing_assumed": assumed})
