"""Slice rendering for a Volume: the three planes, window/level, radiological convention.

Images follow the radiological convention: the patient's right is on the image's left in
axial and coronal views, anterior is at the top of axial views and on the left of sagittal
views, superior at the top of coronal and sagittal views. Pixels are resampled so that the
picture's aspect ratio is true to the voxel spacing.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .io.volume import Volume

#: (window width, window level) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 50.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
    "liver": (150.0, 30.0),
    "abdomen": (400.0, 40.0),
}

PLANES = ("axial", "coronal", "sagittal")
#: An evidence mark is drawn on a slice when it lies this close to it (mm).
MARK_REACH_MM = 12.0
# For each plane: the volume axis held fixed, then the edge letters (left, right, top, bottom).
_PLANE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
_PLANE_LETTERS = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}


def plane_size(volume: Volume, plane: str) -> int:
    """Number of slices along a plane's normal."""
    return volume.shape[_axis(plane)]


def slice_pixels(volume: Volume, plane: str, index: int | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """The HU slice in display orientation and its (row, column) pixel size in mm."""
    axis = _axis(plane)
    n = volume.shape[axis]
    index = n // 2 if index is None else int(np.clip(index, 0, n - 1))
    plane_2d = np.take(volume.hu, index, axis=axis)  # axes (u, v) in RAS order
    # Rows follow v descending (A or S at the top); columns follow u descending (R, or A, on the left).
    image = plane_2d.T[::-1, ::-1]
    u_axis, v_axis = [a for a in range(3) if a != axis]
    return image, (volume.spacing[v_axis], volume.spacing[u_axis])


def apply_window(hu: np.ndarray, window: float, level: float) -> np.ndarray:
    """HU to uint8 grey levels through a lookup table (faster than float maths per pixel)."""
    return _window_lut(float(max(window, 1.0)), float(level))[hu.astype(np.int32) + 32768]


@lru_cache(maxsize=64)
def _window_lut(window: float, level: float) -> np.ndarray:
    values = np.arange(-32768, 32768, dtype=np.float32)
    low = level - window / 2.0
    lut = np.clip((values - low) * (255.0 / window), 0, 255)
    return np.rint(lut).astype(np.uint8)


def render_slice(
    volume: Volume,
    plane: str = "axial",
    index: int | None = None,
    window: float = 1500.0,
    level: float = -600.0,
    *,
    max_size: int = 512,
    letters: bool = True,
    focus: Sequence[float] | None = None,
    marks: Sequence[Sequence[float]] = (),
) -> Image.Image:
    """An RGB picture of one slice, aspect-true, fitted into ``max_size`` pixels, with orientation letters.

    ``focus`` (a voxel, (i, j, k)) is drawn as a crosshair; each of ``marks`` (voxels: evidence points)
    as a ring, when it lies within ``MARK_REACH_MM`` of this slice.
    """
    pixels, (row_mm, col_mm) = slice_pixels(volume, plane, index)
    grey = apply_window(pixels, window, level)
    height_mm, width_mm = pixels.shape[0] * row_mm, pixels.shape[1] * col_mm
    scale = max_size / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    image = Image.fromarray(np.ascontiguousarray(grey), mode="L").resize(size, Image.Resampling.BILINEAR)
    image = image.convert("RGB")
    if letters:
        _draw_letters(image, _PLANE_LETTERS[plane])
    axis = _axis(plane)
    index = volume.shape[axis] // 2 if index is None else int(np.clip(index, 0, volume.shape[axis] - 1))
    draw = ImageDraw.Draw(image)
    for voxel in marks:
        if abs(float(voxel[axis]) - index) * volume.spacing[axis] <= MARK_REACH_MM:
            x, y = pixel_of(volume, plane, voxel, image.size)
            r = max(6, image.size[0] // 25)
            draw.ellipse((x - r, y - r, x + r, y + r), outline=(0, 230, 255), width=3)
    if focus is not None:
        x, y = pixel_of(volume, plane, focus, image.size)
        w, h = image.size
        gap = max(6, w // 30)
        for line in (((0, y), (x - gap, y)), ((x + gap, y), (w, y)), ((x, 0), (x, y - gap)), ((x, y + gap), (x, h))):
            draw.line(line, fill=(255, 210, 0), width=1)
    return image


def pixel_of(volume: Volume, plane: str, voxel: Sequence[float], size: tuple[int, int]) -> tuple[float, float]:
    """Where voxel (i, j, k) falls in a picture of ``plane`` of ``size`` (width, height) pixels."""
    axis = _axis(plane)
    u_axis, v_axis = [a for a in range(3) if a != axis]
    n_u, n_v = volume.shape[u_axis], volume.shape[v_axis]
    column, row = n_u - 1 - float(voxel[u_axis]), n_v - 1 - float(voxel[v_axis])
    return (column + 0.5) * size[0] / n_u, (row + 0.5) * size[1] / n_v


def world_to_voxel(volume: Volume, point: Sequence[float]) -> tuple[float, float, float]:
    """A world RAS+ mm point as (fractional) voxel indices of ``volume``."""
    voxel = np.linalg.solve(volume.affine, np.array([*point, 1.0]))[:3]
    return (float(voxel[0]), float(voxel[1]), float(voxel[2]))


def key_slice_index(volume: Volume) -> int:
    """The axial slice showing the most body, away from the ends of the scan."""
    body = (volume.hu[::2, ::2, :] > -500).sum(axis=(0, 1))
    n = len(body)
    lo, hi = int(n * 0.1), max(int(n * 0.9), int(n * 0.1) + 1)
    return lo + int(np.argmax(body[lo:hi]))


def thumbnail_png(volume: Volume, preset: str = "lung", size: int = 160, index: int | None = None,
                  marks: Sequence[Sequence[float]] = ()) -> bytes:
    """A small PNG of an axial slice (the key slice unless ``index``), for result cards and the index."""
    window, level = WINDOW_PRESETS[preset]
    image = render_slice(volume, "axial", key_slice_index(volume) if index is None else index,
                         window, level, max_size=size, letters=False, marks=marks)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _axis(plane: str) -> int:
    try:
        return _PLANE_AXIS[plane]
    except KeyError:
        raise ValueError(f"Unknown plane {plane!r}; choose one of {PLANES}.") from None


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _draw_letters(image: Image.Image, letters: tuple[str, str, str, str]) -> None:
    draw = ImageDraw.Draw(image)
    w, h = image.size
    font = _font(max(10, min(w, h) // 22))
    left, right, top, bottom = letters
    pad = 4
    for text, anchor, xy in (
        (left, "lm", (pad, h / 2)),
        (right, "rm", (w - pad, h / 2)),
        (top, "mt", (w / 2, pad)),
        (bottom, "mb", (w / 2, h - pad)),
    ):
        draw.text(xy, text, fill=(255, 210, 0), font=font, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))
