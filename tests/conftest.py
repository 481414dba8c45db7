"""Shared fixtures: paths to the real test CTs and writers for DICOM/NIfTI files the tests make."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def ct_nifti() -> Path:
    return DATA / "abdomen_ct_crop.nii.gz"


@pytest.fixture
def ct_dicom_dir() -> Path:
    return DATA / "abdomen_ct_dicom"


@pytest.fixture
def mr_nifti() -> Path:
    return DATA / "not_ct_mr.nii.gz"


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None, **header: float) -> Path:
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


def copy_dicom_series(src: Path, dst: Path) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(src.iterdir()):
        out.append(Path(shutil.copy(f, dst / f.name)))
    return out
