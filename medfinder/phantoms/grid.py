"""The voxel grid (voxels <-> patient frame) and the slab canvas that shapes are painted on.

The patient frame is where anatomy is simple to state; the grid is where the scanner put the
patient (shifted, slightly rotated on the table). Everything that turns a shape into voxels
lives here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .geometry import Shape
from .records import TISSUE_CODES

_T = TISSUE_CODES


class Grid:
    """Voxel grid of the output volume and the patient's pose inside it.

    World = RAS+ mm of the Volume's affine; the patient frame is the world rotated by ``theta``
    about z (patients are rarely straight on the table) and shifted by ``shift``.
    """

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 shift: Sequence[float], theta: float):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, np.float64)
        self.origin = -(np.asarray(self.shape) - 1) / 2.0 * self.spacing
        self.affine = np.eye(4)
        self.affine[:3, :3] = np.diag(self.spacing)
        self.affine[:3, 3] = self.origin
        self.shift = np.asarray(shift, np.float64)
        self.cos, self.sin = math.cos(theta), math.sin(theta)
        self.h = float(np.cbrt(np.prod(self.spacing)))  # soft-edge width

    def patient_to_world(self, p: np.ndarray) -> np.ndarray:
        p = np.atleast_2d(p)
        x = self.cos * p[:, 0] - self.sin * p[:, 1] + self.shift[0]
        y = self.sin * p[:, 0] + self.cos * p[:, 1] + self.shift[1]
        return np.column_stack([x, y, p[:, 2] + self.shift[2]])

    def patient_to_voxel(self, p: np.ndarray) -> np.ndarray:
        return (self.patient_to_world(p) - self.origin) / self.spacing

    def voxel_bbox(self, lo: np.ndarray, hi: np.ndarray, pad: float = 1.0) -> tuple[tuple[int, int], ...] | None:
        """Voxel index ranges (half-open, clipped) covering a patient-frame box, or None if outside."""
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        v = self.patient_to_voxel(corners)
        out = []
        for axis in range(3):
            a = max(int(math.floor(v[:, axis].min() - pad)), 0)
            b = min(int(math.ceil(v[:, axis].max() + pad)) + 1, self.shape[axis])
            if a >= b:
                return None
            out.append((a, b))
        return tuple(out)

    def voxel_bboxes(self, lo: np.ndarray, hi: np.ndarray, pad: float = 1.0) -> list[tuple[tuple[int, int], ...] | None]:
        """``voxel_bbox`` for many boxes at once (N, 3), vectorised: a scene has thousands of shapes."""
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        sel = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        corners = np.where(sel[None, :, :] == 0, lo[:, None, :], hi[:, None, :])   # (N, 8, 3)
        x = self.cos * corners[..., 0] - self.sin * corners[..., 1] + self.shift[0]
        y = self.sin * corners[..., 0] + self.cos * corners[..., 1] + self.shift[1]
        z = corners[..., 2] + self.shift[2]
        v = (np.stack([x, y, z], axis=-1) - self.origin) / self.spacing
        with np.errstate(invalid="ignore"):
            a = np.maximum(np.floor(np.nanmin(v, axis=1) - pad), 0)
            b = np.minimum(np.ceil(np.nanmax(v, axis=1) + pad) + 1, np.asarray(self.shape))
        out: list[tuple[tuple[int, int], ...] | None] = []
        for ai, bi in zip(a.astype(np.int64), b.astype(np.int64)):
            out.append(None if np.any(ai >= bi) else tuple((int(p), int(q)) for p, q in zip(ai, bi)))
        return out

    def patient_coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Patient-frame x and y of every (i, j) voxel column, shaped (nx, ny, 1), float32."""
        xw = (self.origin[0] + np.arange(self.shape[0]) * self.spacing[0] - self.shift[0])[:, None]
        yw = (self.origin[1] + np.arange(self.shape[1]) * self.spacing[1] - self.shift[1])[None, :]
        xp = self.cos * xw + self.sin * yw
        yp = -self.sin * xw + self.cos * yw
        return xp[..., None].astype(np.float32), yp[..., None].astype(np.float32)


class MaskRecord:
    """Collects the voxels a finding painted, inside the finding's voxel bounding box."""

    def __init__(self, bbox: tuple[tuple[int, int], ...], keep: Iterable[int]):
        self.bbox = bbox
        self.crop = np.zeros(tuple(b - a for a, b in bbox), dtype=bool)
        self.keep = tuple(keep)  # tissue codes that still count as this finding at the end

    def add(self, gx: slice, gy: slice, gz: slice, inside: np.ndarray) -> None:
        (x0, x1), (y0, y1), (z0, z1) = self.bbox
        ax, bx = max(gx.start, x0), min(gx.stop, x1)
        ay, by = max(gy.start, y0), min(gy.stop, y1)
        az, bz = max(gz.start, z0), min(gz.stop, z1)
        if ax >= bx or ay >= by or az >= bz:
            return
        src = inside[ax - gx.start:bx - gx.start, ay - gy.start:by - gy.start, az - gz.start:bz - gz.start]
        self.crop[ax - x0:bx - x0, ay - y0:by - y0, az - z0:bz - z0] |= src


class Canvas:
    """A slab of slices [k0, k1) being painted: HU (float32), tissue codes, patient coordinates.

    ``xp``, ``yp`` are ``Grid.patient_coords()``, computed once and shared by every slab.
    """

    def __init__(self, grid: Grid, k0: int, k1: int, xp: np.ndarray, yp: np.ndarray):
        self.grid, self.k0, self.k1 = grid, k0, k1
        nx, ny, _ = grid.shape
        self.hu = np.full((nx, ny, k1 - k0), -1000.0, np.float32)
        self.tissue = np.zeros((nx, ny, k1 - k0), np.uint8)
        self.xp, self.yp = xp, yp
        zw = grid.origin[2] + np.arange(k0, k1) * grid.spacing[2]
        self.zp = (zw - grid.shift[2]).astype(np.float32)[None, None, :]
        self.h = np.float32(grid.h)

    def window(self, shape: Shape, bb: tuple[tuple[int, int], ...] | None = None) -> tuple[slice, slice, slice] | None:
        if bb is None:
            bb = self.grid.voxel_bbox(shape.lo, shape.hi)
        if bb is None:
            return None
        (x0, x1), (y0, y1), (z0, z1) = bb
        z0, z1 = max(z0, self.k0), min(z1, self.k1)
        if z0 >= z1:
            return None
        return slice(x0, x1), slice(y0, y1), slice(z0 - self.k0, z1 - self.k0)

    def coords(self, win: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sx, sy, sz = win
        return self.xp[sx, sy], self.yp[sx, sy], self.zp[:, :, sz]

    def paint(self, shape: Shape, value: float | Callable[..., Any], tissue: int, *,
              allow: np.ndarray | None = None, record: MaskRecord | None = None,
              mode: str = "set", bbox: tuple[tuple[int, int], ...] | None = None) -> None:
        """Blend ``value`` into the voxels the shape covers (soft edge = partial volume).

        ``allow`` is a boolean lookup over tissue codes: only those tissues are replaced.
        ``mode="raise"`` only ever increases HU (ground glass keeps the vessels within it bright).
        """
        win = self.window(shape, bbox)
        if win is None:
            return
        x, y, z = self.coords(win)
        occ = shape.sd(x, y, z) * np.float32(-1.0 / self.h)
        occ += np.float32(0.5)
        np.clip(occ, 0.0, 1.0, out=occ)
        if shape.amp != 1.0:
            occ *= np.float32(shape.amp)
        tis = self.tissue[win]
        if allow is not None:
            occ *= allow[tis]
        if not occ.any():
            return
        hu = self.hu[win]
        v = value(x, y, z) if callable(value) else np.float32(value)
        if mode == "raise":
            hu += np.maximum(v - hu, 0.0) * occ
        else:
            hu += (v - hu) * occ
        inside = occ > 0.5
        tis[inside] = tissue
        if record is not None:
            gx, gy, gz = win
            record.add(gx, gy, slice(gz.start + self.k0, gz.stop + self.k0), inside)


def allow(*names: str) -> np.ndarray:
    """A lookup over tissue codes for ``Canvas.paint``: 1 for the tissues a shape may replace."""
    lut = np.zeros(256, np.float32)
    for n in names:
        lut[_T[n]] = 1.0
    return lut


#: What a lung finding may replace: aerated lung and what runs through it.
IN_LUNG = allow("lung", "lung_vessel", "airway", "ground_glass", "low_attenuation")
#: Everything but bone, metal and the table: what bone (and cartilage) may replace.
NOT_BONE = allow(*[n for n in _T if n not in ("cortical_bone", "marrow", "metal", "table")])
