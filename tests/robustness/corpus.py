"""Makes the malformed-input corpus: each entry is a file (or folder) the tests write themselves,
with the error type the library must raise and a word its sentence must contain."""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from dicom_factory import write_series, write_structured_report

from medfinder import errors

DATA = Path(__file__).resolve().parents[1] / "data"


@dataclass(frozen=True)
class Malformed:
    name: str
    error: type
    word: str
    make: Callable[[Path], Path]


def _body(shape=(24, 20, 16), dtype=np.int16) -> np.ndarray:
    arr = np.full(shape, 40, dtype=dtype)
    arr[:3] = -1000
    return arr


def _nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _truncated(d: Path) -> Path:
    data = (DATA / "abdomen_ct_crop.nii.gz").read_bytes()
    (d / "truncated.nii.gz").write_bytes(data[: len(data) // 3])
    return d / "truncated.nii.gz"


def _bitflip(d: Path) -> Path:
    data = bytearray((DATA / "abdomen_ct_crop.nii.gz").read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4000, 97):
        data[i] ^= 0xFF
    (d / "bitflip.nii.gz").write_bytes(bytes(data))
    return d / "bitflip.nii.gz"


def _giant_header(d: Path) -> Path:
    hdr = nib.Nifti2Header()
    hdr.set_data_shape((100000, 100000, 100000))
    hdr.set_data_dtype(np.int16)
    hdr.set_data_offset(544)
    (d / "giant.nii").write_bytes(hdr.binaryblock + b"\0" * 64)
    return d / "giant.nii"


def _raw_nifti(path: Path, pixdim: list[float], vox_offset: int) -> Path:
    """Header bytes written by hand: nibabel's writer would repair the very faults under test."""
    data = _body()
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.int16)
    hdr["pixdim"] = pixdim
    hdr["vox_offset"] = vox_offset
    path.write_bytes(hdr.binaryblock + b"\0" * 4 + data.tobytes(order="F"))
    return path


def _bad_vox_offset(d: Path) -> Path:
    return _raw_nifti(d / "voxoffset.nii", [1, 1, 1, 1, 1, 1, 1, 1], 10_000_000)  # far past the end of the file


def _zero_spacing(d: Path) -> Path:
    return _raw_nifti(d / "zerospacing.nii", [1, 0, 0, 0, 1, 1, 1, 1], 352)


def _floats(value: float, name: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        data = _body(dtype=np.float32)
        data[5, 5, 5] = value
        return _nifti(d / name, data)
    return make


def _dicom_series(name: str, **kwargs) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        write_series(d / name, **kwargs)
        return d / name
    return make


def _gap(d: Path) -> Path:
    files = write_series(d / "gap", n=9)
    files[4].unlink()
    return d / "gap"


def _duplicate(d: Path) -> Path:
    files = write_series(d / "dup", n=6)
    shutil.copy(files[2], d / "dup" / "copy.dcm")
    return d / "dup"


def _mixed_zip(d: Path) -> Path:
    write_series(d / "mixed", n=5, name_prefix="A")
    write_series(d / "mixed", n=5, name_prefix="B")
    return _zip_folder(d / "mixed", d / "mixed.zip")


def _zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"series/{f.name}")
    shutil.rmtree(folder)
    return out


def _zip_member(name: str, member: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        with zipfile.ZipFile(d / name, "w") as zf:
            zf.writestr(zipfile.ZipInfo(member), b"DICM" * 64)
        return d / name
    return make


def _zip_symlink(d: Path) -> Path:
    info = zipfile.ZipInfo("series/link.dcm")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(d / "symlink.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    return d / "symlink.zip"


def _zip_bomb(d: Path) -> Path:
    with zipfile.ZipFile(d / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("series/IM0001.dcm", "w") as fh:
            block = b"\0" * (1 << 20)
            for _ in range(200):
                fh.write(block)
    return d / "bomb.zip"


def _nested_zip(d: Path) -> Path:
    inner = _zip_bomb(d)
    with zipfile.ZipFile(d / "nested.zip", "w") as zf:
        for i in range(3):
            zf.write(inner, f"layer/{i}.zip")
    inner.unlink()
    return d / "nested.zip"


def _write(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / name).write_bytes(content)
        return d / name
    return make


def _empty_folder(d: Path) -> Path:
    (d / "emptyfolder").mkdir()
    return d / "emptyfolder"


def _sr(d: Path) -> Path:
    write_structured_report(d / "sr" / "report.dcm")
    return d / "sr"


def _single_slice(d: Path) -> Path:
    write_series(d / "single", n=1)
    return d / "single"


def _pickled_npy(d: Path) -> Path:
    np.save(d / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return d / "objects.npy"


def _nrrd_garbage(d: Path) -> Path:
    (d / "garbage.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: banana\n\n" + b"\0" * 100)
    return d / "garbage.nrrd"


def _mr_real(d: Path) -> Path:
    return Path(shutil.copy(DATA / "not_ct_mr.nii.gz", d / "mr.nii.gz"))


CORPUS: list[Malformed] = [
    Malformed("truncated .nii.gz", errors.UnreadableVolumeError, "truncated", _truncated),
    Malformed("bit-flipped .nii.gz", errors.UnreadableVolumeError, "bitflip", _bitflip),
    Malformed("header claiming 100000^3 voxels", errors.VolumeTooLargeError, "above the limit", _giant_header),
    Malformed("wrong vox_offset", errors.UnreadableVolumeError, "truncated", _bad_vox_offset),
    Malformed("zero spacing", errors.SpacingError, "spacing", _zero_spacing),
    Malformed("absurd spacing", errors.SpacingError, "spacing",
              lambda d: _nifti(d / "absurd.nii.gz", _body(), np.diag([1.0, 1.0, 400.0, 1.0]))),
    Malformed("NaN voxels", errors.InvalidValuesError, "NaN", _floats(np.nan, "nan.nii.gz")),
    Malformed("infinite voxels", errors.InvalidValuesError, "infinite", _floats(np.inf, "inf.nii.gz")),
    Malformed("2D image", errors.NotAVolumeError, "2D", lambda d: _nifti(d / "flat.nii.gz", _body()[:, :, 0])),
    Malformed("4D with several frames", errors.NotAVolumeError, "frames",
              lambda d: _nifti(d / "frames.nii.gz", np.stack([_body()] * 4, axis=-1))),
    Malformed("5D image", errors.NotAVolumeError, "dimensions",
              lambda d: _nifti(d / "five.nii.gz", np.stack([_body()] * 2, axis=-1)[..., None, :])),
    Malformed("real MR NIfTI", errors.NotCTError, "Hounsfield", _mr_real),
    Malformed("MR DICOM series", errors.NotCTError, "MR", _dicom_series("mrseries", modality="MR")),
    Malformed("PET DICOM series", errors.NotCTError, "PT", _dicom_series("petseries", modality="PT")),
    Malformed("DICOM zip mixing two series", errors.SliceGeometryError, "one series", _mixed_zip),
    Malformed("missing middle slice", errors.SliceGeometryError, "missing", _gap),
    Malformed("duplicated slices", errors.SliceGeometryError, "duplicated", _duplicate),
    Malformed("inconsistent pixel spacing", errors.SliceGeometryError, "pixel spacing",
              _dicom_series("spacing", n=6, pixel_spacing_per_slice={3: (0.9, 0.9)})),
    Malformed("gantry tilt", errors.SliceGeometryError, "gantry",
              _dicom_series("tilt", n=8, positions=[[-10.0, -12.0 + 0.9 * k, 100.0 + 2.0 * k] for k in range(8)])),
    Malformed("DICOM without pixel data", errors.UnreadableVolumeError, "no image pixels", _sr),
    Malformed("single DICOM slice", errors.NotAVolumeError, "single slice", _single_slice),
    Malformed("zip with ../ path", errors.UnsafeArchiveError, "outside", _zip_member("dotdot.zip", "../../evil.dcm")),
    Malformed("zip with absolute path", errors.UnsafeArchiveError, "outside", _zip_member("abs.zip", "/tmp/evil.dcm")),
    Malformed("zip with a symlink", errors.UnsafeArchiveError, "symbolic link", _zip_symlink),
    Malformed("zip bomb (one member)", errors.UnsafeArchiveError, "zip bomb", _zip_bomb),
    Malformed("nested zip bombs", errors.UnreadableVolumeError, "no readable DICOM", _nested_zip),
    Malformed("corrupt zip", errors.UnreadableVolumeError, "zip", _write("broken.zip", b"PK\x03\x04" + os.urandom(400))),
    Malformed("empty zip", errors.UnreadableVolumeError, "empty", lambda d: _zip_folder(_empty_folder(d), d / "e.zip")),
    Malformed("empty file", errors.UnreadableVolumeError, "empty", _write("empty.nii.gz", b"")),
    Malformed("text renamed .nii.gz", errors.UnreadableVolumeError, "gzip",
              _write("notes.nii.gz", b"Findings: no pleural effusion.\n" * 20)),
    Malformed("text renamed .nii", errors.UnreadableVolumeError, "NIfTI", _write("notes.nii", b"x" * 600)),
    Malformed("empty folder", errors.UnreadableVolumeError, "empty", _empty_folder),
    Malformed("JPEG renamed .dcm", errors.UnreadableVolumeError, "no readable DICOM",
              _write("photo.dcm", b"\xff\xd8\xff\xe0" + os.urandom(2000))),
    Malformed("pickled .npy", errors.UnreadableVolumeError, "NumPy", _pickled_npy),
    Malformed("garbage NRRD header", errors.UnreadableVolumeError, "NRRD", _nrrd_garbage),
    Malformed("unsupported extension", errors.UnreadableVolumeError, "unsupported", _write("scan.bmp", b"BM" + b"0" * 99)),
]
