"""Shared fixtures: paths to the real test CTs and writers for DICOM/NIfTI files the tests make."""

from __future__ import annotations

import resource
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


@contextmanager
def file_size_limit(max_bytes: int) -> Iterator[None]:
    """Stop every file this process writes at ``max_bytes``, as a full disk stops it.

    Writes past the limit fail with EFBIG (SIGXFSZ is ignored, as CPython ignores it), which
    libraries report the way they report ENOSPC: hnswlib not at all, sqlite and safetensors
    with their own error types.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def copy_dicom_series(src: Path, dst: Path) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(src.iterdir()):
        out.append(Path(shutil.copy(f, dst / f.name)))
    return out


# ---------------------------------------------------------------- a tiny model, corpus and index
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny MedFinder saved like a real one (fast; not a useful model)."""
    import torch

    from medfinder.model import create_model_and_transforms

    torch.manual_seed(0)
    model, _ = create_model_and_transforms("medfinder-tiny")
    return model.save_pretrained(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Twelve small phantom cases with reports; returns the manifest path."""
    from medfinder.phantoms import write_corpus

    out = tmp_path_factory.mktemp("corpus")
    return write_corpus(12, 11, out, shape=(64, 64, 48), spacing=(5.0, 5.0, 6.0), workers=1)


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, tiny_model_dir, tiny_corpus) -> Path:
    from medfinder.index.build import build_index
    from medfinder.io.manifests import read_manifest

    out = tmp_path_factory.mktemp("idx") / "index"
    summary = build_index(read_manifest(tiny_corpus), out, model=tiny_model_dir, progress=False)
    assert summary.added == 12 and not summary.failed
    return out
