"""One preprocessing pipeline: orientation, spacing, HU window, crop/pad, for every caller."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfinder.io.load import load_volume
from medfinder.io.volume import volume_from_array
from medfinder.transforms.preprocess import (
    PRESETS,
    PreprocessConfig,
    Preprocessor,
    get_preset,
)


def _ball_volume(spacing=(2.0, 2.0, 2.0), flip_x=False):
    """A 'patient' (water ellipsoid in air) with a dense marker on the patient's right."""
    n = (60, 50, 40)
    grid = np.stack(np.meshgrid(*[np.arange(k) * s for k, s in zip(n, spacing)], indexing="ij"))
    centre = np.array([k * s / 2 for k, s in zip(n, spacing)])[:, None, None, None]
    r = np.sqrt((((grid - centre) / np.array([45, 40, 35])[:, None, None, None]) ** 2).sum(0))
    hu = np.where(r < 1, 0, -1000).astype(np.int16)
    marker = np.sqrt(((grid - centre - np.array([25, 0, 0])[:, None, None, None]) ** 2).sum(0)) < 6
    hu[marker] = 900
    affine = np.diag([*spacing, 1.0])
    if flip_x:
        hu = hu[::-1]
        affine = affine @ np.array([[-1, 0, 0, n[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return volume_from_array(hu, affine, source="ball")


CONFIG = PreprocessConfig(name="test", spacing=(3.0, 3.0, 3.0), shape=(40, 36, 32),
                          windows=((-1000.0, 1000.0), (-160.0, 240.0)))


def test_output_shape_channels_and_range():
    x = Preprocessor(CONFIG)(_ball_volume())
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    assert tuple(x.shape) == (2, 40, 36, 32)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # Window 0 maps water (0 HU) to 0.5; window 1 (mediastinal) maps it to 0.4.
    centre = tuple(s // 2 for s in CONFIG.shape)
    assert x[0][centre].item() == pytest.approx(0.5, abs=0.02)
    assert x[1][centre].item() == pytest.approx(0.4, abs=0.02)


def test_orientation_does_not_change_model_input():
    a = Preprocessor(CONFIG)(_ball_volume())
    b = Preprocessor(CONFIG)(_ball_volume(flip_x=True))
    torch.testing.assert_close(a, b)


def test_spacing_is_honoured():
    fine = Preprocessor(CONFIG)(_ball_volume(spacing=(2.0, 2.0, 2.0)))
    coarse = Preprocessor(CONFIG)(_ball_volume(spacing=(3.0, 3.0, 3.0)))
    # The same patient (sizes in mm) sampled at 2 mm and 3 mm: 1.5^3 = 3.4x more voxels in the
    # finer array, yet the same body volume once both are resampled to the model's spacing.
    body_fine = float((fine[0] > 0.3).sum())
    body_coarse = float((coarse[0] > 0.3).sum())
    assert 0.9 < body_coarse / body_fine < 1.1


def test_marker_stays_on_patient_right():
    x = Preprocessor(CONFIG)(_ball_volume())[0]
    dense = torch.nonzero(x > 0.9)
    assert dense[:, 0].float().mean() > CONFIG.shape[0] / 2  # RAS: larger x index is patient right


def test_config_round_trip_and_presets():
    assert PreprocessConfig.from_dict(CONFIG.to_dict()) == CONFIG
    for name in ("medfinder-demo", "medfinder-release", "ct-clip", "merlin", "m3d"):
        assert get_preset(name).name == name
    assert PRESETS["ct-clip"].spacing == (0.75, 0.75, 1.5) and PRESETS["merlin"].shape == (224, 224, 160)
    with pytest.raises(KeyError, match="Unknown preprocessing preset"):
        get_preset("nope")


def test_an_unpadded_preprocessing_keeps_a_small_scans_extent_and_crops_a_large_one():
    """``pad_to_shape: false`` (the real-CT tower's): no air is added around a scan smaller than the
    model's shape, so a pooled tower describes the scan; a larger scan is still centre-cropped to it."""
    from dataclasses import replace

    unpadded = PreprocessConfig(name="unpadded", spacing=(2.0, 2.0, 2.0), shape=(40, 40, 24), crop_foreground=False,
                                pad_to_shape=False)
    def body(shape: tuple[int, int, int]) -> np.ndarray:
        hu = np.full(shape, -1000, np.int16)
        hu[4:-4, 4:-4] = 0  # water inside, air at the sides
        return hu

    small = volume_from_array(body((30, 26, 10)), np.diag([2.0, 2.0, 2.0, 1.0]), source="small")
    large = volume_from_array(body((50, 60, 30)), np.diag([2.0, 2.0, 2.0, 1.0]), source="large")
    x = Preprocessor(unpadded)(small)
    assert tuple(x.shape) == (1, 30, 26, 10) and float((x == 0.5).float().mean()) > 0.5
    assert tuple(Preprocessor(unpadded)(large).shape) == (1, 40, 40, 24)
    padded = Preprocessor(replace(unpadded, pad_to_shape=True))(small)
    assert tuple(padded.shape) == (1, 40, 40, 24) and float((padded == 0.5).float().mean()) < 0.2  # mostly air
    # The model's grid still maps back to the scan's millimetres, for evidence and the viewer.
    _, affine = Preprocessor(unpadded).with_affine(small)
    assert np.allclose(affine[:3, 3], 0.0)
    # Saved only when off: configs written before the field existed keep their fingerprints.
    assert "pad_to_shape" not in PRESETS["merlin"].to_dict()
    assert PreprocessConfig.from_dict(unpadded.to_dict()) == unpadded


def test_real_ct_through_demo_preset(ct_nifti):
    cfg = get_preset("medfinder-demo")
    x = Preprocessor(cfg)(load_volume(ct_nifti))
    assert tuple(x.shape) == (cfg.in_channels, *cfg.shape)
    assert torch.isfinite(x).all()


def _spot_volume(offset_mm: float, fortran: bool = False) -> "object":
    """Soft tissue (40 HU) with one 2.2 mm voxel of calcium (800 HU) at ``offset_mm`` along x."""
    spacing = (2.2, 2.2, 2.5)
    hu = np.full((61, 61, 41), 40, np.int16)
    hu[:2], hu[-2:] = -1000, -1000  # air at the sides, so the body crop has edges
    hu[30 + int(round(offset_mm / 2.2)), 30, 20] = 800
    # A NIfTI's voxels are Fortran-ordered and take the reversed-axes pipeline: both must agree.
    hu = np.asfortranarray(hu) if fortran else hu
    return volume_from_array(hu, np.diag([*spacing, 1.0]), source="spot")


PEAK = PreprocessConfig(name="peak", spacing=(4.0, 4.0, 5.0), shape=(36, 36, 24),
                        windows=((-160.0, 240.0), (150.0, 1000.0)), peak_windows=(1,))


@pytest.mark.parametrize("offset_mm", [0.0, 2.2, 4.4, 6.6])
def test_peak_window_keeps_a_small_calcification_that_point_sampling_dilutes(offset_mm: float) -> None:
    plain = PreprocessConfig.from_dict({**PEAK.to_dict(), "peak_windows": []})
    peak = Preprocessor(PEAK)(_spot_volume(offset_mm))
    sampled = Preprocessor(plain)(_spot_volume(offset_mm))
    expected = (800 - 150) / (1000 - 150)
    # Wherever the spot falls against the 4 mm grid, its full HU survives in the peak channel...
    assert float(peak[1].max()) == pytest.approx(expected, abs=1e-3)
    # ...while interpolation alone loses much of it (a 2.2 mm voxel in a 4 x 4 x 5 mm sample).
    assert float(sampled[1].max()) < 0.8 * expected
    # The other windows are untouched by the peak copy, and the spot appears once, not smeared
    # over the whole box: the channel is a local maximum, not a dilation of everything.
    torch.testing.assert_close(peak[0], sampled[0])
    assert int((peak[1] > 0.5 * expected).sum()) <= 8
    torch.testing.assert_close(Preprocessor(PEAK)(_spot_volume(offset_mm, fortran=True)), peak)


def test_peak_windows_round_trip_and_old_configs_read_without_them() -> None:
    assert PreprocessConfig.from_dict(PEAK.to_dict()) == PEAK
    old = {k: v for k, v in CONFIG.to_dict().items() if k != "peak_windows"}
    assert PreprocessConfig.from_dict(old).peak_windows == ()
    # ...and serialise exactly as before, so a saved model keeps its fingerprint and its indexes.
    assert PreprocessConfig.from_dict(old).to_dict() == old
    with pytest.raises(ValueError, match="peak window 2 is not one of the 2 windows"):
        PreprocessConfig(name="bad", spacing=(4.0, 4.0, 5.0), shape=(8, 8, 8),
                         windows=((-160.0, 240.0), (150.0, 1000.0)), peak_windows=(2,))
