"""``load_volume``: one entry for every CT source a clinician or a dataset hands us."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UnreadableVolumeError
from .archive import DEFAULT_MAX_ARCHIVE_BYTES, load_dicom_zip
from .arrays import DEFAULT_NUMPY_SPACING, load_numpy
from .dicom import is_dicom_file, load_dicom_files, load_dicom_folder
from .nifti import load_nifti
from .nrrd import load_nrrd
from .volume import DEFAULT_MAX_VOXELS, Volume


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
        return load_dicom_files([Path(p) for p in path], max_voxels, label=label or f"the {len(path)} uploaded files")
    p = Path(path)
    name = label or p.name
    if not p.exists():
        raise UnreadableVolumeError(f"{name}: the file or folder does not exist.")
    if p.is_dir():
        return load_dicom_folder(p, max_voxels, name)
    if p.stat().st_size == 0:
        raise UnreadableVolumeError(f"{name}: the file is empty.")
    lower = p.name.lower()
    if lower.endswith((".nii", ".nii.gz")):
        return load_nifti(p, max_voxels, name)
    if lower.endswith(".zip"):
        return load_dicom_zip(p, max_voxels, max_archive_bytes, name)
    if lower.endswith((".nrrd", ".nhdr")):
        return load_nrrd(p, max_voxels, name)
    if lower.endswith((".npy", ".npz")):
        return load_numpy(p, spacing or DEFAULT_NUMPY_SPACING, assumed=spacing is None, max_voxels=max_voxels, name=name)
    if lower.endswith(".dcm") or is_dicom_file(p):
        return load_dicom_files([p], max_voxels, label=name)
    raise UnreadableVolumeError(
        f"{name}: unsupported file type; expected .nii/.nii.gz, a DICOM folder or .zip, .nrrd, or .npy/.npz."
    )
