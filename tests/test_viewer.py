"""Slice rendering: radiological convention, window/level, aspect ratio, thumbnails."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from medfinder.io.volume import volume_from_array
from medfinder.viewer import (
    WINDOW_PRESETS,
    apply_window,
    key_slice_index,
    render_slice,
    slice_pixels,
    thumbnail_png,
)


def _marked_volume(spacing=(1.0, 1.0, 1.0)):
    hu = np.full((40, 30, 20), -1000, dtype=np.int16)
    hu[5:35, 5:25, 2:18] = 40
    hu[30:34, 20:24, 14:18] = 1000  # patient right (high x), anterior (high y), superior (high z)
    return volume_from_array(hu, np.diag([*spacing, 1.0]), source="marked")


def _bright_quadrant(image: np.ndarray) -> tuple[str, str]:
    ys, xs = np.nonzero(image > 500)
    h, w = image.shape
    return ("top" if ys.mean() < h / 2 else "bottom"), ("left" if xs.mean() < w / 2 else "right")


def test_radiological_convention_in_all_planes():
    vol = _marked_volume()
    axial, _ = slice_pixels(vol, "axial", 16)
    assert _bright_quadrant(axial) == ("top", "left")  # anterior up, patient right on image left
    coronal, _ = slice_pixels(vol, "coronal", 22)
    assert _bright_quadrant(coronal) == ("top", "left")  # superior up, right on left
    sagittal, _ = slice_pixels(vol, "sagittal", 32)
    assert _bright_quadrant(sagittal) == ("top", "left")  # superior up, anterior on left


def test_aspect_ratio_true_to_spacing():
    vol = _marked_volume(spacing=(0.5, 0.5, 3.0))  # extents 20 x 15 x 60 mm
    coronal = render_slice(vol, "coronal", max_size=300)
    assert coronal.size == (100, 300)  # width 20 mm, height 60 mm
    axial = render_slice(vol, "axial", max_size=200)
    assert axial.size == (200, 150)


def test_window_level_lut():
    hu = np.array([[-1000, -600, 150, 3000]], dtype=np.int16)
    grey = apply_window(hu, *WINDOW_PRESETS["lung"])
    assert grey.tolist() == [[60, 128, 255, 255]]  # low edge -1350 HU
    assert apply_window(hu, 350, 50).tolist() == [[0, 0, 200, 255]]  # (150 + 125) / 350 * 255


def test_letters_drawn_and_unknown_plane():
    vol = _marked_volume()
    plain = np.asarray(render_slice(vol, "axial", letters=False))
    lettered = np.asarray(render_slice(vol, "axial", letters=True))
    assert (lettered != plain).any() and lettered.shape == plain.shape
    with pytest.raises(ValueError, match="Unknown plane"):
        render_slice(vol, "oblique")


def test_thumbnail_is_png_of_body_slice():
    vol = _marked_volume()
    assert 2 <= key_slice_index(vol) <= 17
    png = thumbnail_png(vol, size=64)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and max(image.size) == 64
