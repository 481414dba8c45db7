"""Loading CT from every supported source, and refusing everything that is not a trustworthy CT."""

from __future__ import annotations

import gzip
import os
import random
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import copy_dicom_series, write_nifti
from dicom_factory import FAKE_PHI, write_series, write_structured_report

from medfinder import errors
from medfinder.io.load import load_volume
from medfinder.io.volume import volume_from_array


def _body_like(shape=(24, 20, 16)) -> np.ndarray:
    rng = np.random.default_rng(0)
    arr = rng.integers(-50, 80, size=shape).astype(np.int16)
    arr[:3] = -1000  # air
    return arr


# ------------------------------------------------------------------ real files
def test_real_nifti_loads_in_ras_with_spacing(ct_nifti):
    vol = load_volume(ct_nifti)
    assert vol.shape == (122, 101, 30)
    assert vol.spacing == (3.0, 3.0, 3.0)
    assert vol.orientation == "RAS"
    assert vol.hu.dtype == np.int16
    assert -1024 <= vol.hu.min() < -900 and 1000 < vol.hu.max() < 3000
    assert "shape=(122, 101, 30)" in repr(vol) and "RAS" in repr(vol)


def test_real_dicom_series_hu_range_and_geometry(ct_dicom_dir):
    vol = load_volume(ct_dicom_dir)
    assert vol.shape == (512, 512, 20)
    assert vol.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert vol.orientation == "RAS"
    assert vol.hu.min() == -1024 and 1000 < vol.hu.max() < 3072
    # soft tissue dominates an abdomen: the median body voxel sits near water/soft tissue
    body = vol.hu[vol.hu > -500]
    assert -100 < np.median(body) < 100
    assert vol.metadata["modality"] == "CT" and vol.metadata["study_year"] == 2022


def test_dicom_order_does_not_depend_on_file_names(ct_dicom_dir, tmp_path):
    reference = load_volume(ct_dicom_dir)
    files = sorted(ct_dicom_dir.iterdir())
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    order = list(range(len(files)))
    random.Random(3).shuffle(order)
    for new_name, idx in enumerate(order):
        shutil.copy(files[idx], shuffled / f"{new_name:03d}.dcm")
    vol = load_volume(shuffled)
    np.testing.assert_array_equal(vol.hu, reference.hu)
    np.testing.assert_allclose(vol.affine, reference.affine)


def test_dicom_in_zip_equals_folder(ct_dicom_dir, tmp_path):
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in ct_dicom_dir.iterdir():
            zf.write(f, f"study/{f.name}")
    np.testing.assert_array_equal(load_volume(archive).hu, load_volume(ct_dicom_dir).hu)


def test_nifti_in_lps_loads_to_same_ras_array_as_dicom(ct_dicom_dir, tmp_path):
    dicom = load_volume(ct_dicom_dir)
    # Rewrite the same voxels in LPS order (x and y flipped) with the matching affine.
    lps_data = dicom.hu[::-1, ::-1, :]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = dicom.shape[0] - 1
    flip[1, 3] = dicom.shape[1] - 1
    lps_affine = dicom.affine @ flip
    assert nib.aff2axcodes(lps_affine) == ("L", "P", "S")
    path = write_nifti(tmp_path / "lps.nii.gz", np.ascontiguousarray(lps_data), lps_affine)
    vol = load_volume(path)
    np.testing.assert_array_equal(vol.hu, dicom.hu)
    np.testing.assert_allclose(vol.affine, dicom.affine, atol=1e-4)


def test_synthetic_dicom_sorted_by_position_not_instance_number(tmp_path):
    write_series(tmp_path / "s", n=8)
    vol = load_volume(tmp_path / "s")
    markers = [int(vol.hu[-1, -1, k]) for k in range(vol.shape[2])]
    assert markers == [-1000 + k for k in range(8)]  # z increases superiorly, slice k at index k


def test_several_uploaded_dicom_files(tmp_path):
    paths = write_series(tmp_path / "s", n=6)
    assert load_volume(paths).shape[2] == 6


def test_picks_the_ct_series_with_most_slices(tmp_path):
    write_series(tmp_path / "mix", n=4, name_prefix="A", step=5.0)
    write_series(tmp_path / "mix", n=9, name_prefix="B")
    assert load_volume(tmp_path / "mix").shape[2] == 9


def test_two_equally_large_ct_series_are_ambiguous(tmp_path):
    write_series(tmp_path / "two", n=5, name_prefix="A")
    write_series(tmp_path / "two", n=5, name_prefix="B")
    _refused(tmp_path / "two", errors.SliceGeometryError, "2 CT series", "one series")


def test_no_identifying_dicom_field_in_metadata(tmp_path):
    write_series(tmp_path / "s", n=4)
    vol = load_volume(tmp_path / "s")
    text = repr(vol.metadata) + repr(vol)
    for value in FAKE_PHI.values():
        assert value not in text
    assert vol.metadata["study_year"] == 2019 and "20190523" not in text


def test_scl_slope_applied_exactly_once(tmp_path):
    stored = (_body_like().astype(np.int32) + 1024).astype(np.int16)
    img = nib.Nifti1Image(stored, np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    np.testing.assert_array_equal(load_volume(tmp_path / "scaled.nii.gz").hu, _body_like())


def test_float_nifti_rounded_and_clipped_to_int16(tmp_path):
    data = _body_like().astype(np.float64) + 0.4
    data[0, 0, 0] = -3000.0  # outside the scanner's field of view
    vol = load_volume(write_nifti(tmp_path / "f.nii", data))
    assert vol.hu.dtype == np.int16 and vol.hu[0, 0, 0] == -1024 and vol.hu[5, 5, 5] == _body_like()[5, 5, 5]


def test_four_d_with_one_frame_is_a_volume(tmp_path):
    vol = load_volume(write_nifti(tmp_path / "one.nii.gz", _body_like()[..., None]))
    assert vol.shape == (24, 20, 16)


def test_nrrd_and_numpy(tmp_path):
    import nrrd

    data = _body_like()
    nrrd.write(str(tmp_path / "v.nrrd"), data, {"space": "left-posterior-superior",
                                                  "space directions": np.diag([0.5, 0.6, 2.0]),
                                                  "space origin": [0.0, 0.0, 0.0]})
    vol = load_volume(tmp_path / "v.nrrd")
    assert vol.spacing == pytest.approx((0.5, 0.6, 2.0))
    np.testing.assert_array_equal(vol.hu, data[::-1, ::-1, :])  # LPS -> RAS flips x and y

    np.save(tmp_path / "v.npy", data)
    vol = load_volume(tmp_path / "v.npy")
    assert vol.spacing == (1.0, 1.0, 1.0) and vol.metadata["spacing_assumed"] is True
    np.savez(tmp_path / "v.npz", hu=data, spacing=np.array([0.7, 0.7, 1.25]))
    assert load_volume(tmp_path / "v.npz").spacing == pytest.approx((0.7, 0.7, 1.25))
    assert load_volume(tmp_path / "v.npy", spacing=(2.0, 2.0, 3.0)).metadata["spacing_assumed"] is False


# ------------------------------------------------------------------ refusals
def _refused(path, error, *words, **kwargs):
    with pytest.raises(error) as info:
        load_volume(path, **kwargs)
    message = str(info.value)
    assert Path(str(path if not isinstance(path, list) else path[0])).name.split(".")[0][:6] in message or \
        isinstance(path, list)
    for word in words:
        assert word.lower() in message.lower(), message
    assert "\n" not in message and "Traceback" not in message
    return message


def test_mr_nifti_refused(mr_nifti):
    _refused(mr_nifti, errors.NotCTError, "not hounsfield")


def test_mr_and_pet_dicom_refused(tmp_path):
    write_series(tmp_path / "mr", modality="MR")
    _refused(tmp_path / "mr", errors.NotCTError, "MR", "not CT")
    write_series(tmp_path / "pt", modality="PT")
    _refused(tmp_path / "pt", errors.NotCTError, "PT")


def test_real_dicom_relabelled_mr_refused(ct_dicom_dir, tmp_path):
    import pydicom

    for f in copy_dicom_series(ct_dicom_dir, tmp_path / "mr"):
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    _refused(tmp_path / "mr", errors.NotCTError, "MR")


def test_label_replaces_the_file_or_folder_name_everywhere(ct_dicom_dir, tmp_path):
    # A DICOM tree's folders are often named after the patient; the index builder passes the case id.
    named = tmp_path / "Doe^Jane^Fakeperson"
    shutil.copytree(ct_dicom_dir, named)
    vol = load_volume(named, label="dicom-0a1b")
    assert vol.source == "dicom-0a1b" and "Fakeperson" not in repr(vol)
    (tmp_path / "Roe^Richard").mkdir()
    broken = {
        tmp_path / "Roe^Richard": "empty",
        tmp_path / "Roe^Richard.nii.gz": "gzip",
        tmp_path / "Roe^Richard.nrrd": "NRRD",
        tmp_path / "Roe^Richard.npy": "NumPy",
        tmp_path / "Roe^Richard.zip": "zip",
        tmp_path / "Roe^Richard.dcm": "DICOM",
    }
    for path in broken:
        if not path.is_dir():
            path.write_bytes(b"not an image at all" * 20)
    for path, problem in broken.items():
        with pytest.raises(errors.MedFinderError) as info:
            load_volume(path, label="dicom-0a1b")
        message = str(info.value)
        assert message.startswith("dicom-0a1b: ") and "Roe" not in message, message
        assert problem.lower() in message.lower(), message


def test_a_label_does_not_change_how_a_file_is_read(ct_nifti, tmp_path, monkeypatch):
    # The file's own name still decides the format: gzip's checksum, memory-mapping a .npy.
    labelled = load_volume(ct_nifti, label="case-1")
    assert np.array_equal(labelled.hu, load_volume(ct_nifti).hu) and labelled.source == "case-1"
    data = bytearray(gzip.compress(gzip.decompress(ct_nifti.read_bytes())))
    data[-8] ^= 0xFF  # the gzip trailer's CRC: the voxels still inflate, the checksum fails
    bad = tmp_path / "crc.nii.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(errors.UnreadableVolumeError, match="case-1: .*corrupt"):
        load_volume(bad, label="case-1")
    np.save(tmp_path / "arr.npy", _body_like())
    modes, real_load = [], np.load

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    assert np.array_equal(load_volume(tmp_path / "arr.npy", label="case-2").hu, load_volume(tmp_path / "arr.npy").hu)
    assert modes == ["r", "r"]  # mapped whether or not a label names it, not read whole into memory


def test_truncated_nifti_refused(ct_nifti, tmp_path):
    data = ct_nifti.read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    _refused(bad, errors.UnreadableVolumeError, "truncated")


def test_text_renamed_nifti_and_empty_file_refused(tmp_path):
    (tmp_path / "notes.nii.gz").write_text("this is a radiology note, not an image")
    _refused(tmp_path / "notes.nii.gz", errors.UnreadableVolumeError, "gzip")
    (tmp_path / "plain.nii").write_text("x" * 400)
    _refused(tmp_path / "plain.nii", errors.UnreadableVolumeError, "NIfTI")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _refused(tmp_path / "empty.nii.gz", errors.UnreadableVolumeError, "empty")


def test_missing_file_and_unknown_type_refused(tmp_path):
    _refused(tmp_path / "absent.nii.gz", errors.UnreadableVolumeError, "does not exist")
    (tmp_path / "scan.jpg").write_bytes(b"\xff\xd8\xff" + b"0" * 100)
    _refused(tmp_path / "scan.jpg", errors.UnreadableVolumeError, "unsupported")


def test_nan_and_inf_refused(tmp_path):
    data = _body_like().astype(np.float32)
    data[4, 4, 4] = np.nan
    _refused(write_nifti(tmp_path / "nan.nii.gz", data), errors.InvalidValuesError, "NaN")
    data[4, 4, 4] = np.inf
    _refused(write_nifti(tmp_path / "inf.nii.gz", data), errors.InvalidValuesError, "infinite")


def test_2d_4d_5d_refused(tmp_path):
    _refused(write_nifti(tmp_path / "flat.nii.gz", _body_like()[:, :, 0]), errors.NotAVolumeError, "2D")
    four = np.stack([_body_like()] * 3, axis=-1)
    _refused(write_nifti(tmp_path / "four.nii.gz", four), errors.NotAVolumeError, "frames")
    _refused(write_nifti(tmp_path / "five.nii.gz", four[..., None, :]), errors.NotAVolumeError, "dimensions")


def test_zero_and_absurd_spacing_refused(tmp_path):
    # nibabel's writer repairs pixdim from the affine, so write the header bytes ourselves.
    data = _body_like()
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.int16)
    hdr["pixdim"] = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    hdr["vox_offset"] = 352
    (tmp_path / "zero.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + data.tobytes(order="F"))
    _refused(tmp_path / "zero.nii", errors.SpacingError, "spacing")
    path = write_nifti(tmp_path / "huge.nii.gz", _body_like(), np.diag([1.0, 1.0, 500.0, 1.0]))
    _refused(path, errors.SpacingError, "spacing")


def test_voxel_budget_checked_from_header_before_reading(tmp_path):
    # A header claiming 100000^3 voxels with almost no data behind it.
    hdr = nib.Nifti2Header()  # NIfTI-2 dims are int64, so the claim is representable
    hdr.set_data_shape((100000, 100000, 100000))
    hdr.set_data_dtype(np.int16)
    path = tmp_path / "giant.nii"
    hdr.set_data_offset(544)
    path.write_bytes(hdr.binaryblock + b"\0" * 64)
    _refused(path, errors.VolumeTooLargeError, "above the limit")
    _refused(write_nifti(tmp_path / "small.nii.gz", _body_like()), errors.VolumeTooLargeError, max_voxels=1000)


def test_empty_folder_and_folder_without_dicom_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", errors.UnreadableVolumeError, "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    _refused(tmp_path / "junk", errors.UnreadableVolumeError, "no readable DICOM")


def test_dicom_without_pixels_refused(tmp_path):
    write_structured_report(tmp_path / "sr" / "report.dcm")
    _refused(tmp_path / "sr", errors.UnreadableVolumeError, "no image pixels")


def _rewrite(path: Path, **changes) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for name, value in changes.items():
        setattr(ds, name, value)
    ds.save_as(path)


def test_slices_that_are_not_one_greyscale_plane_refused(tmp_path):
    # A colour screenshot tagged CT, a multi-frame slice, a rescale that is not a number:
    # one sentence naming the folder, never a numpy broadcasting traceback.
    files = write_series(tmp_path / "rgb", n=6, rows=32, cols=28)
    _rewrite(files[2], SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
             BitsAllocated=8, BitsStored=8, HighBit=7, PixelData=bytes(32 * 28 * 3))
    _refused(tmp_path / "rgb", errors.UnreadableVolumeError, "is not a single greyscale 32x28 image")
    files = write_series(tmp_path / "frames", n=6, rows=32, cols=28)
    _rewrite(files[1], NumberOfFrames=2, PixelData=bytes(32 * 28 * 2 * 2))
    _refused(tmp_path / "frames", errors.UnreadableVolumeError, "is not a single greyscale")
    files = write_series(tmp_path / "slope", n=6)
    slope = b"\x28\x00\x53\x10DS\x02\x001 "  # (0028,1053) RescaleSlope "1", explicit VR little endian
    raw = files[3].read_bytes()
    assert raw.count(slope) == 1
    files[3].write_bytes(raw.replace(slope, b"\x28\x00\x53\x10DS\x04\x00abc "))
    _refused(tmp_path / "slope", errors.UnreadableVolumeError, "rescale to Hounsfield units")


def test_missing_duplicated_and_inconsistent_slices_refused(tmp_path):
    files = write_series(tmp_path / "gap", n=9)
    files[4].unlink()
    _refused(tmp_path / "gap", errors.SliceGeometryError, "missing")
    files = write_series(tmp_path / "dup", n=6)
    shutil.copy(files[2], tmp_path / "dup" / "copy.dcm")
    _refused(tmp_path / "dup", errors.SliceGeometryError, "duplicated")
    write_series(tmp_path / "ps", n=6, pixel_spacing_per_slice={3: (0.9, 0.9)})
    _refused(tmp_path / "ps", errors.SliceGeometryError, "pixel spacing")


def test_gantry_tilt_refused(tmp_path):
    positions = [[-10.0, -12.0 + 0.9 * k, 100.0 + 2.0 * k] for k in range(8)]
    write_series(tmp_path / "tilt", n=8, positions=positions)
    _refused(tmp_path / "tilt", errors.SliceGeometryError, "gantry tilt")


def test_zip_with_escaping_paths_refused(ct_dicom_dir, tmp_path):
    first = next(ct_dicom_dir.iterdir())
    for name, member in (("dotdot.zip", "../../evil.dcm"), ("absolute.zip", "/etc/evil.dcm")):
        with zipfile.ZipFile(tmp_path / name, "w") as zf:
            zf.writestr(zipfile.ZipInfo(member), first.read_bytes())  # ZipInfo keeps the name verbatim
        _refused(tmp_path / name, errors.UnsafeArchiveError, "outside")
    assert not (tmp_path.parent / "evil.dcm").exists()


def test_zip_with_symlink_refused(tmp_path):
    info = zipfile.ZipInfo("series/link.dcm")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    _refused(tmp_path / "link.zip", errors.UnsafeArchiveError, "symbolic link")


def test_zip_bomb_refused_without_unpacking(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("series/IM0001.dcm", "w") as fh:
            block = b"\0" * (1 << 20)
            for _ in range(64):
                fh.write(block)
    assert bomb.stat().st_size < 200_000
    _refused(bomb, errors.UnsafeArchiveError, "zip bomb")  # 64 MB from 64 kB: the ratio gives it away
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as zf:  # stored, incompressible: only the total size is wrong
        for i in range(3):
            zf.writestr(f"series/IM{i}.dcm", os.urandom(4 * 1024 * 1024))
    _refused(big, errors.UnsafeArchiveError, "above the limit", max_archive_bytes=8 * 1024 * 1024)


def test_corrupt_zip_refused(tmp_path):
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04" + os.urandom(300))
    _refused(tmp_path / "broken.zip", errors.UnreadableVolumeError, "zip")


def test_refusals_leave_no_temp_files(tmp_path, mr_nifti):
    before = set(os.listdir(tempfile.gettempdir()))
    write_series(tmp_path / "mr", modality="MR")
    with zipfile.ZipFile(tmp_path / "mr.zip", "w") as zf:
        for f in (tmp_path / "mr").iterdir():
            zf.write(f, f.name)
    for bad in (tmp_path / "mr.zip", mr_nifti):
        with pytest.raises(errors.VolumeError):
            load_volume(bad)
    assert set(os.listdir(tempfile.gettempdir())) - before == set()


def test_volume_from_array_reorients_and_validates():
    data = _body_like()
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # x runs towards the left
    vol = volume_from_array(data, affine, source="array")
    assert vol.orientation == "RAS"
    np.testing.assert_array_equal(vol.hu, data[::-1])
    with pytest.raises(errors.NotAVolumeError):
        volume_from_array(data[:, :, 0], np.eye(4))
