"""Synthetic chest CT cases with matching reports: the demo corpus and the ground truth of retrieval.

Real paired CT and report data cannot be fetched or redistributed here, so every test of retrieval
and the demo app run on cases whose content we know exactly. ``generate_case(seed, index)`` builds
one case deterministically: a patient (sex, age, body habitus), a set of findings drawn with
realistic co-occurrence, a HU volume in which those findings are painted where their geometry
says, a radiology report that states them (and negates others, in varied wording), and the
labels.

How a volume is made. Anatomy lives in a patient frame in millimetres (x to the patient's right,
y anterior, z superior, z = 0 at the right hemidiaphragm dome). Each structure is a shape with an
approximate signed distance (ellipses, capsules, boxes, implicit regions); painting blends the
shape's HU into the volume with a soft edge one voxel wide, which is the partial-volume effect a
scanner produces, and writes a tissue code where the shape covers more than half a voxel. Later
shapes cover earlier ones, with optional lists of tissues they may replace (lung vessels only in
lung, a node only in fat). The volume is painted in slabs of slices so that a 512x512x300 scan
needs little memory; a Gaussian point-spread function and correlated noise (seeded per slice, so
the slab size never changes the result) finish it.
"""

from __future__ import annotations

import csv
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .cli_support import CliParser, run_guarded
from .errors import MedFinderError
from .volume import Volume

#: Finding labels the generator produces; the names are CT-RATE's labels where they overlap, so
#: a model or parser trained here speaks the label space of real chest CT reports.
PHANTOM_FINDINGS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pleural effusion",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
    "Pneumothorax",
    "Lung mass",
)

#: Demo size: 352 x 352 mm in-plane, 320 mm of coverage (thoracic inlet to upper abdomen).
DEMO_SHAPE: tuple[int, int, int] = (160, 160, 128)
DEMO_SPACING: tuple[float, float, float] = (2.2, 2.2, 2.5)

#: Manifest columns before the per-finding 0/1 columns and after them.
MANIFEST_HEAD = ("case_id", "image", "report")
MANIFEST_TAIL = ("sex", "age")

#: Tissue codes of ``PhantomCase.tissue`` (where a structure covers more than half a voxel).
TISSUE_CODES: dict[str, int] = {
    "air": 0,            # outside the patient
    "table": 1,
    "skin": 2,
    "fat": 3,
    "muscle": 4,
    "cortical_bone": 5,
    "marrow": 6,
    "cartilage": 7,      # costal cartilage, intervertebral discs
    "lung": 8,
    "lung_vessel": 9,
    "airway": 10,        # air in trachea, bronchi, air bronchograms
    "blood": 11,         # heart chambers and great vessels
    "myocardium": 12,
    "organ": 13,         # liver, spleen, thyroid
    "gut": 14,           # oesophagus, stomach wall and contents
    "gut_air": 15,
    "csf": 16,
    "fluid": 17,         # pleural or pericardial effusion
    "lesion": 18,        # nodule, mass, consolidation, atelectasis, node...
    "ground_glass": 19,
    "low_attenuation": 20,  # emphysema
    "pleural_air": 21,   # pneumothorax
    "calcium": 22,
    "metal": 23,
}
_T = TISSUE_CODES


class PhantomError(MedFinderError):
    """Bad arguments to the phantom generator (shape, spacing, counts, output folder)."""


# ==========================================================================================
# Public data classes
# ==========================================================================================
@dataclass
class PhantomFinding:
    """One finding as painted: where it is, how big, and which voxels show it.

    ``center_vox`` are (x, y, z) indices into ``Volume.hu``; ``center_mm`` the same point in the
    Volume's RAS world coordinates; ``size_mm`` the largest diameter (or thickness for effusions
    and pneumothorax, which is what a report gives). ``bbox`` is ((x0, x1), (y0, y1), (z0, z1)),
    half-open voxel ranges; ``mask()`` returns the full-size boolean voxel mask.
    """

    name: str
    center_vox: tuple[int, int, int]
    center_mm: tuple[float, float, float]
    size_mm: float
    side: str | None = None
    lobe: str | None = None
    severity: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0), (0, 0))
    mask_crop: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), bool), repr=False)
    volume_shape: tuple[int, int, int] = (0, 0, 0)

    def mask(self) -> np.ndarray:
        """Boolean mask over the whole volume: the voxels where this finding was painted."""
        full = np.zeros(self.volume_shape, dtype=bool)
        (x0, x1), (y0, y1), (z0, z1) = self.bbox
        full[x0:x1, y0:y1, z0:z1] = self.mask_crop
        return full

    @property
    def voxel_count(self) -> int:
        return int(self.mask_crop.sum())


@dataclass
class PhantomCase:
    """A synthetic chest CT with its report, labels and the truth behind them."""

    case_id: str
    volume: Volume
    report: str
    labels: dict[str, int]
    findings: list[PhantomFinding]
    sex: str
    age: int
    contrast: bool
    tissue: np.ndarray = field(repr=False)

    def manifest_row(self, image: str) -> list[str]:
        return ([self.case_id, image, self.report]
                + [str(self.labels[name]) for name in PHANTOM_FINDINGS]
                + [self.sex, str(self.age)])


# ==========================================================================================
# Geometry: shapes with approximate signed distance in the patient frame (mm)
# ==========================================================================================
class _Shape:
    """Something paintable: a patient-frame bounding box and a signed distance (< 0 inside)."""

    lo: np.ndarray
    hi: np.ndarray
    amp: float = 1.0  # < 1 for structures thinner than a voxel: their partial volume is smaller

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _OrientedShape(_Shape):
    """A shape with a centre ``c`` and an optional rotation ``rot`` (columns: its local axes)."""

    c: np.ndarray
    rot: np.ndarray | None

    def _local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient coordinates to the shape's own frame (centred, then rotated)."""
        px, py, pz = x - np.float32(self.c[0]), y - np.float32(self.c[1]), z - np.float32(self.c[2])
        if self.rot is not None:
            m = self.rot.astype(np.float32)
            px, py, pz = (px * m[0, 0] + py * m[1, 0] + pz * m[2, 0],
                          px * m[0, 1] + py * m[1, 1] + pz * m[2, 1],
                          px * m[0, 2] + py * m[1, 2] + pz * m[2, 2])
        return px, py, pz


class _Capsule(_Shape):
    """A tube segment with radii ra at a and rb at b (vessels, airways, ribs, wires)."""

    def __init__(self, a: Sequence[float], b: Sequence[float], ra: float, rb: float | None = None):
        self.a = np.asarray(a, np.float64)
        self.b = np.asarray(b, np.float64)
        self.ra, self.rb = float(ra), float(ra if rb is None else rb)
        r = max(self.ra, self.rb)
        self.lo = np.minimum(self.a, self.b) - r
        self.hi = np.maximum(self.a, self.b) + r
        d = self.b - self.a
        self.l2 = max(float(d @ d), 1e-6)

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        dx, dy, dz = (self.b - self.a).astype(np.float32)
        px, py, pz = x - np.float32(self.a[0]), y - np.float32(self.a[1]), z - np.float32(self.a[2])
        t = np.clip((px * dx + py * dy + pz * dz) * np.float32(1.0 / self.l2), 0.0, 1.0)
        qx, qy, qz = px - t * dx, py - t * dy, pz - t * dz
        d = np.sqrt(qx * qx + qy * qy + qz * qz)
        if self.ra == self.rb:
            return d - np.float32(self.ra)
        return d - (np.float32(self.ra) + t * np.float32(self.rb - self.ra))


class _Ellipsoid(_OrientedShape):
    """An ellipsoid, optionally rotated (columns of ``rot`` are its axes in the patient frame)."""

    def __init__(self, c: Sequence[float], radii: Sequence[float], rot: np.ndarray | None = None):
        self.c = np.asarray(c, np.float64)
        self.r = np.maximum(np.asarray(radii, np.float64), 0.3)
        self.rot = None if rot is None else np.asarray(rot, np.float64)
        half = self.r if self.rot is None else np.sqrt(((self.rot * self.r) ** 2).sum(axis=1))
        self.lo, self.hi = self.c - half, self.c + half

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        px, py, pz = self._local(x, y, z)
        ix, iy, iz = (np.float32(1.0 / v) for v in self.r)
        f = (px * ix) ** 2 + (py * iy) ** 2 + (pz * iz) ** 2
        return (np.sqrt(f) - 1.0) * np.float32(self.r.min())


class _Box(_OrientedShape):
    """A box with rounded edges (sternum, pacemaker generator, port chamber)."""

    def __init__(self, c: Sequence[float], half: Sequence[float], round_mm: float = 1.0,
                 rot: np.ndarray | None = None):
        self.c = np.asarray(c, np.float64)
        self.h = np.asarray(half, np.float64)
        self.round = float(round_mm)
        self.rot = None if rot is None else np.asarray(rot, np.float64)
        ext = self.h if self.rot is None else np.abs(self.rot) @ self.h
        self.lo, self.hi = self.c - ext, self.c + ext

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        px, py, pz = self._local(x, y, z)
        r = np.float32(self.round)
        qx = np.abs(px) - np.float32(self.h[0] - self.round)
        qy = np.abs(py) - np.float32(self.h[1] - self.round)
        qz = np.abs(pz) - np.float32(self.h[2] - self.round)
        outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2 + np.maximum(qz, 0) ** 2)
        inside = np.minimum(np.maximum(np.maximum(qx, qy), qz), 0)
        return outside + inside - r


class _Region(_Shape):
    """Any implicit region: a signed-distance function and the box it lives in."""

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                 lo: Sequence[float], hi: Sequence[float]):
        self.fn = fn
        self.lo, self.hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.fn(x, y, z)


class _Layer(_Shape):
    """A shape offset inwards from a shared distance field: skin then fat reuse one body outline."""

    def __init__(self, base: _Shape, inset: float, memo: dict[str, Any]):
        self.base, self.inset, self.memo = base, float(inset), memo
        self.lo, self.hi = base.lo, base.hi

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        key = (x.__array_interface__["data"][0], x.shape, y.__array_interface__["data"][0], z.shape,
               float(z.flat[0]), float(z.flat[-1]))
        if self.memo.get("key") != key:
            self.memo["key"], self.memo["sd"] = key, self.base.sd(x, y, z)
        return self.memo["sd"] + np.float32(self.inset) if self.inset else self.memo["sd"]


def _layers(base: _Shape, *insets: float) -> list[_Layer]:
    memo: dict[str, Any] = {}
    return [_Layer(base, i, memo) for i in insets]


def _chain(points: np.ndarray, radii: Sequence[float] | float) -> list[_Capsule]:
    """Capsules along a polyline (radius per point, or one radius)."""
    pts = np.asarray(points, np.float64)
    rr = np.broadcast_to(np.asarray(radii, np.float64), (len(pts),))
    return [_Capsule(pts[i], pts[i + 1], rr[i], rr[i + 1]) for i in range(len(pts) - 1)]


def _smooth_path(anchors: Sequence[Sequence[float]], n: int) -> np.ndarray:
    """A smooth curve through anchor points (Catmull-Rom), n samples."""
    p = np.asarray(anchors, np.float64)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    seg = len(p) - 3
    out = []
    for t in np.linspace(0, seg, n, endpoint=True):
        i = min(int(t), seg - 1)
        u = t - i
        p0, p1, p2, p3 = p[i], p[i + 1], p[i + 2], p[i + 3]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u * u
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * u ** 3))
    return np.array(out)


def _frame(axis: Sequence[float]) -> np.ndarray:
    """An orthonormal frame whose first column is ``axis``."""
    u = np.asarray(axis, np.float64)
    u = u / np.linalg.norm(u)
    helper = np.array([0.0, 0.0, 1.0]) if abs(u[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    v = np.cross(helper, u)
    v /= np.linalg.norm(v)
    w = np.cross(u, v)
    return np.column_stack([u, v, w])


# ==========================================================================================
# The grid (voxels <-> patient frame) and the slab canvas that shapes are painted on
# ==========================================================================================
class _Grid:
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

    def world_xy(self) -> tuple[np.ndarray, np.ndarray]:
        xw = (self.origin[0] + np.arange(self.shape[0]) * self.spacing[0])[:, None, None]
        yw = (self.origin[1] + np.arange(self.shape[1]) * self.spacing[1])[None, :, None]
        return xw.astype(np.float32), yw.astype(np.float32)


class _MaskRecord:
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


class _Canvas:
    """A slab of slices [k0, k1) being painted: HU (float32), tissue codes, patient coordinates."""

    def __init__(self, grid: _Grid, k0: int, k1: int, xp: np.ndarray, yp: np.ndarray,
                 xw: np.ndarray, yw: np.ndarray):
        self.grid, self.k0, self.k1 = grid, k0, k1
        nx, ny, _ = grid.shape
        self.hu = np.full((nx, ny, k1 - k0), -1000.0, np.float32)
        self.tissue = np.zeros((nx, ny, k1 - k0), np.uint8)
        self.xp, self.yp, self.xw, self.yw = xp, yp, xw, yw
        zw = grid.origin[2] + np.arange(k0, k1) * grid.spacing[2]
        self.zw = zw.astype(np.float32)[None, None, :]
        self.zp = (zw - grid.shift[2]).astype(np.float32)[None, None, :]
        self.h = np.float32(grid.h)

    def window(self, shape: _Shape, bb: tuple[tuple[int, int], ...] | None = None) -> tuple[slice, slice, slice] | None:
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

    def paint(self, shape: _Shape, value: float | Callable[..., Any], tissue: int, *,
              allow: np.ndarray | None = None, record: _MaskRecord | None = None,
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


def _allow(*names: str) -> np.ndarray:
    lut = np.zeros(256, np.float32)
    for n in names:
        lut[_T[n]] = 1.0
    return lut


_IN_LUNG = _allow("lung", "lung_vessel", "airway", "ground_glass", "low_attenuation")
_SOFT = _allow("fat", "muscle", "lung", "lung_vessel", "skin", "organ", "gut", "lesion", "ground_glass",
               "low_attenuation", "fluid", "blood", "myocardium", "airway", "gut_air", "air", "cartilage")
_NOT_BONE = _allow(*[n for n in _T if n not in ("cortical_bone", "marrow", "metal", "table")])
_FATTY = _allow("fat", "lung", "lung_vessel")


# ==========================================================================================
# The patient: analytic anatomy in the patient frame
# ==========================================================================================
def _ellipse_sd(x: np.ndarray, y: np.ndarray, cx: Any, cy: Any, a: Any, b_ant: Any, b_post: Any) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse whose anterior and posterior halves differ."""
    dy = y - cy
    ib = np.where(dy > 0, np.float32(1.0) / b_ant, np.float32(1.0) / b_post)
    dy = dy * ib
    np.square(dy, out=dy)
    u = (x - cx) * (np.float32(1.0) / a)
    dy += u * u
    np.sqrt(dy, out=dy)
    dy -= np.float32(1.0)
    dy *= np.minimum(np.minimum(a, b_ant), b_post)
    return dy


#: Thickness of the rib layer between the pleura and the chest-wall muscles (mm).
RIB = 8.0

LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")


class _Anatomy:
    """One patient's body: sizes drawn from the case's random stream, landmarks, implicit organs."""

    def __init__(self, rng: np.random.Generator, sex: str, age: int, contrast: bool, heart_scale: float):
        self.sex, self.age, self.contrast = sex, age, contrast
        male = sex == "M"
        s = rng.uniform(0.98, 1.08) if male else rng.uniform(0.9, 0.99)
        self.s = s
        self.L = rng.uniform(205, 245) * s                      # apex height above the right dome
        self.ac0 = rng.uniform(130, 142) * s                    # cavity half-width at the bases
        self.ba0 = rng.uniform(72, 86) * s                      # cavity centre to anterior wall
        self.bp0 = rng.uniform(80, 92) * s                      # cavity centre to posterior wall
        habitus = rng.beta(2.0, 3.0)                            # 0 lean .. 1 obese
        self.fat = np.array([5, 6, 5]) + habitus * np.array([26, 34, 26])  # ant, lat, post (mm)
        self.muscle = (np.array([13, 5, 14]) if male else np.array([8, 4, 12])) * rng.uniform(0.8, 1.2)
        self.fat_hu = rng.uniform(-112, -88)
        self.muscle_hu = rng.uniform(38, 55)
        self.lung_hu = rng.uniform(-880, -835) + (age - 50) * -0.4
        self.dome_left = -rng.uniform(10, 22)
        self.dia_depth = rng.uniform(48, 62)
        self.carina_z = 0.58 * self.L + rng.uniform(-6, 6)
        self.notch_z = self.L - rng.uniform(20, 32)
        self.pitch = rng.uniform(26.5, 29.5) * s                # vertebral level spacing
        self.blood_hu = rng.uniform(180, 260) if contrast else rng.uniform(36, 48)
        self.myo_hu = rng.uniform(95, 120) if contrast else rng.uniform(40, 50)
        self.liver_hu = rng.uniform(95, 125) if contrast else rng.uniform(50, 66)
        self.marrow_hu = float(np.clip(rng.normal(330 - 2.2 * (age - 30), 35), 150, 420))
        self.cortex_hu = rng.uniform(950, 1250)

        # Heart: long axis base -> apex points left, anterior and down.
        self.heart_scale = heart_scale
        axis = np.array([-0.72, 0.45, -0.52]) + rng.normal(0, 0.05, 3)
        self.heart_rot = _frame(axis)
        grow = np.array([1.0, 0.75, 0.35]) * (heart_scale - 1) + 1   # enlarged hearts widen most
        self.heart_r = np.array([67.0, 52.0, 45.0]) * s * grow * rng.uniform(0.95, 1.05, 3)
        ext = np.sqrt(((self.heart_rot * self.heart_r) ** 2).sum(axis=1))
        hz = -12 + ext[2] - 14
        hy = self.ba0 * 0.98 - 5 - ext[1]
        hx = 36 * s - ext[0] - rng.uniform(0, 8)
        self.heart_c = np.array([hx, hy, hz])
        self.heart_ext = ext

        # Airway and vessel landmarks.
        self.y_trachea = self.y_vb(self.carina_z) + 44 * s
        self.trachea_r = (9.5 if male else 8.3) * rng.uniform(0.92, 1.08)
        cz = self.carina_z
        self.hilum = {
            "right": np.array([0.36 * self.ac0, self.y_trachea - 14, cz - 18]),
            "left": np.array([-0.38 * self.ac0, self.y_trachea - 16, cz - 26]),
        }
        self.aorta_r = (13.5 + 0.05 * (age - 40)) * s * rng.uniform(0.92, 1.08)
        self.aorta_path = self._aorta_path()

    # ---- z profiles -----------------------------------------------------------------------
    def profile(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Cavity half-width, anterior and posterior half-depth, and centre y at height z."""
        L = self.L
        zs = [-400, -60, 0, 0.35 * L, 0.6 * L, 0.8 * L, 0.92 * L, L, L + 30, L + 400]
        a = np.interp(z, zs, [0.96, 0.99, 1.0, 0.99, 0.95, 0.86, 0.74, 0.6, 0.52, 0.52]) * self.ac0
        ba = np.interp(z, zs, [0.92, 0.97, 1.0, 1.0, 0.95, 0.86, 0.76, 0.66, 0.56, 0.56]) * self.ba0
        bp = np.interp(z, zs, [0.95, 0.98, 1.0, 1.0, 0.97, 0.9, 0.8, 0.72, 0.62, 0.62]) * self.bp0
        cy = np.interp(z, zs, [0, 0, 0, 0, -3, -8, -12, -15, -16, -16]) * self.s
        return (a.astype(np.float32), ba.astype(np.float32), bp.astype(np.float32), cy.astype(np.float32))

    def y_vb(self, z: Any) -> Any:
        """Centre of the vertebral bodies (thoracic kyphosis bows them backwards mid-chest)."""
        u = (np.asarray(z, np.float64) - 0.45 * self.L) / (0.75 * self.L)
        return -self.bp0 + 24 * self.s - 9 * self.s * (1 - np.clip(u, -1, 1) ** 2)

    def body_sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, inset: float = 0.0) -> np.ndarray:
        a, ba, bp, cy = self.profile(z)
        top = np.clip((z - 0.78 * self.L) / (0.22 * self.L), 0, 1)
        aw = self.ac0 * 0.99 + RIB + self.muscle[1] + self.fat[1] + 2 + 14 * top - inset
        bw = ba + RIB + self.muscle[0] + self.fat[0] + 2 - inset
        bpw = self.bp0 + RIB + self.muscle[2] + self.fat[2] + 22 * self.s + 2 - inset
        sd = _ellipse_sd(x, y, 0.0, cy, aw, bw, bpw + cy)
        flat = -(y + np.float32(0.94 * (self.bp0 + RIB + self.muscle[2] + self.fat[2] + 22 * self.s + 2) - inset))
        return np.maximum(sd, flat)   # the back lies flat on the table

    def muscle_sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        a, ba, bp, cy = self.profile(z)
        top = np.clip((z - 0.72 * self.L) / (0.28 * self.L), 0, 1)
        return _ellipse_sd(x, y, 0.0, cy, a + RIB + self.muscle[1] + 26 * top, ba + RIB + self.muscle[0],
                           bp + RIB + self.muscle[2])

    def cavity_sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        a, ba, bp, cy = self.profile(z)
        return _ellipse_sd(x, y, 0.0, cy, a, ba, bp)

    def dia_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height of the diaphragm surface (two domes; deepest in the posterior recesses)."""
        yd = 0.1 * self.ba0
        by = np.where(y > yd, 1.35 * self.ba0, self.bp0)
        qy = ((y - yd) / by) ** 2
        sx = 0.6 * self.ac0
        zr = -self.dia_depth * (((x - 0.42 * self.ac0) / sx) ** 2 + qy)
        zl = self.dome_left - self.dia_depth * (((x + 0.42 * self.ac0) / sx) ** 2 + qy)
        return np.maximum(zr, zl)

    def apex_top(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ya = -0.2 * self.bp0
        R = 2 * 38.0 * self.s
        tr = self.L - ((x - 0.38 * self.ac0) ** 2 + (y - ya) ** 2) / R
        tl = self.L - 6 - ((x + 0.38 * self.ac0) ** 2 + (y - ya) ** 2) / R
        return np.maximum(tr, tl)

    def envelope_sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The mediastinum between the lungs above the heart (and behind it, around the aorta)."""
        L, s = self.L, self.s
        zs = [-400, 0, 0.25 * L, 0.45 * L, 0.58 * L, 0.68 * L, 0.8 * L, L, L + 400]
        w = np.interp(z, zs, [22, 22, 24, 27, 33, 40, 30, 25, 34]).astype(np.float32) * s
        xm = np.interp(z, zs, [-10, -10, -9, -6, -3, -2, 0, 0, 0]).astype(np.float32) * s
        a, ba, bp, cy = self.profile(z)
        ant = cy + ba
        post = np.asarray(self.y_vb(z), np.float32) - 8 * s
        yc = (ant + post) / 2
        b = (ant - post) / 2
        return _ellipse_sd(x, y, xm, yc, w, b, b)

    def heart_sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, grow: float = 0.0) -> np.ndarray:
        return _Ellipsoid(self.heart_c, self.heart_r + grow, self.heart_rot).sd(x, y, z)

    def _aorta_path(self) -> np.ndarray:
        s, cz, hc = self.s, self.carina_z, self.heart_c
        yvb = float(self.y_vb(cz))
        dz = float(self.y_vb(0.0))
        anchors = [
            [hc[0] + 28 * s, hc[1] + 2, hc[2] + 32 * s],        # aortic root
            [20 * s, 14 * s, cz - 8],
            [16 * s, 18 * s, cz + 22],                          # ascending, right of the trachea
            [0.0, 12 * s, cz + 38],                             # arch
            [-18 * s, -4 * s, cz + 34],
            [-24 * s, yvb + 24 * s, cz + 8],                    # descending, left of the spine
            [-22 * s, float(self.y_vb(0.4 * self.L)) + 22 * s, 0.4 * self.L],
            [-12 * s, dz + 24 * s, -30.0],
            [-6 * s, dz + 24 * s, -300.0],
        ]
        return _smooth_path(anchors, 40)

    # ---- lungs and lobes ------------------------------------------------------------------
    def lung_sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The pleural space the lungs fill (before the heart and great vessels take their share)."""
        sd = np.maximum(self.cavity_sd(x, y, z), self.dia_z(x, y) - z)
        sd = np.maximum(sd, z - self.apex_top(x, y))
        return np.maximum(sd, -self.envelope_sd(x, y, z))

    def lung_side(self, p: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """For points (N, 3): 1 in the right lung, 2 in the left lung, 0 elsewhere, ``margin`` mm deep."""
        x, y, z = (p[:, i].astype(np.float32) for i in range(3))
        inside = self.lung_sd(x, y, z) < -margin
        inside &= self.heart_sd(x, y, z, grow=4.0) > margin
        yv = np.asarray(self.y_vb(z), np.float32)
        inside &= ((x / 30) ** 2 + ((y - yv) / 28) ** 2) > (1 + margin / 28) ** 2
        d_aorta = np.min(np.linalg.norm(p[:, None, :] - self.aorta_path[None, ::2, :], axis=2), axis=1)
        inside &= d_aorta > self.aorta_r + 4 + margin
        return np.where(inside, np.where(x > 0, 1, 2), 0)

    def oblique_z(self, y: Any, side: str, x: Any = 0.0) -> Any:
        """Height of the major fissure; laterally it lies further back, as it curves round the hilum."""
        y = y + 0.4 * (np.abs(x) - 45 * self.s)
        y1, z1 = -self.bp0, self.carina_z + (14 if side == "right" else 24)
        y2, z2 = 0.35 * self.ba0, -18.0
        return z1 + (y - y1) * (z2 - z1) / (y2 - y1)

    def horizontal_z(self) -> float:
        return self.carina_z - 42 * self.s

    def lobe_of(self, p: Sequence[float]) -> str:
        x, y, z = (float(v) for v in p)
        side = "right" if x > 0 else "left"
        if z < self.oblique_z(y, side, x):
            return f"{side} lower lobe"
        if side == "right":
            return "right middle lobe" if z < self.horizontal_z() else "right upper lobe"
        return "left upper lobe"

    def sample_lung(self, rng: np.random.Generator, n: int, margin: float = 0.0,
                    lobe: str | None = None, side: str | None = None,
                    where: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """Up to n random points inside the lungs (optionally one lobe or side)."""
        lo = np.array([-self.ac0, -self.bp0, -self.dia_depth * 1.3 + self.dome_left])
        hi = np.array([self.ac0, self.ba0, self.L])
        out: list[np.ndarray] = []
        got = 0
        for _ in range(40):
            cand = rng.uniform(lo, hi, size=(max(4 * n, 256), 3))
            if side is not None:
                cand[:, 0] = np.abs(cand[:, 0]) * (1 if side == "right" else -1)
            ok = self.lung_side(cand, margin) > 0
            if where is not None:
                ok &= where(cand)
            cand = cand[ok]
            if lobe is not None and len(cand):
                cand = cand[[self.lobe_of(c) == lobe for c in cand]]
            out.append(cand)
            got += len(cand)
            if got >= n:
                break
        pts = np.vstack(out) if out else np.zeros((0, 3))
        return pts[:n]


# ==========================================================================================
# Branching trees: pulmonary arteries (with their bronchi) and veins
# ==========================================================================================
@dataclass
class _Branch:
    a: np.ndarray
    b: np.ndarray
    ra: float
    rb: float
    depth: int


def _grow_tree(root: np.ndarray, points: np.ndarray, r0: float, decay: float, max_depth: int,
               twigs: int = 2) -> list[_Branch]:
    """Recursive bisection of the territory a tree supplies: each branch aims at the centroid of
    its share of the lung and splits it along its longest axis, so branches fan out and taper."""
    out: list[_Branch] = []

    def rec(start: np.ndarray, pts: np.ndarray, r: float, depth: int) -> None:
        c = pts.mean(axis=0)
        f = 0.5 if depth else 0.35
        end = start + (c - start) * f
        out.append(_Branch(start, end, r, r * decay ** 0.5, depth))
        if depth >= max_depth or len(pts) < 8:
            far = pts[np.argsort(((pts - end) ** 2).sum(1))[::-1][:twigs]]
            for q in far:
                out.append(_Branch(end, end + (q - end) * 0.95, r * decay, r * decay * 0.8, depth + 1))
            return
        d = pts - c
        _, vecs = np.linalg.eigh(d.T @ d)
        proj = d @ vecs[:, -1]
        for half in (pts[proj < 0], pts[proj >= 0]):
            if len(half):
                rec(end, half, r * decay, depth + 1)

    rec(np.asarray(root, np.float64), points, r0, 0)
    return out


def _bronchi_from(arteries: list[_Branch], max_depth: int, gap: float = 1.2) -> list[_Branch]:
    """Airways run beside their artery (the bronchovascular bundle), slightly wider."""
    kept = [br for br in arteries if br.depth <= max_depth]
    if not kept:
        return []
    a = np.array([br.a for br in kept])
    b = np.array([br.b for br in kept])
    n = np.cross(b - a, [0.0, 0.0, 1.0])
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(norm > 1e-6, n / np.maximum(norm, 1e-6), [1.0, 0.0, 0.0])
    ra = np.array([br.ra for br in kept])[:, None]
    rb = np.array([br.rb for br in kept])[:, None]
    oa, ob = a + n * (2.05 * ra + gap), b + n * (2.05 * rb + gap)
    return [_Branch(oa[i], ob[i], br.ra * 1.05, br.rb * 1.05, br.depth) for i, br in enumerate(kept)]


# ==========================================================================================
# A scene: ordered paint operations, and the findings they belong to
# ==========================================================================================
@dataclass
class _Spec:
    """A finding while it is being built: its facts for the report and its paint footprint."""

    name: str
    center: np.ndarray                 # patient frame, mm
    size_mm: float
    side: str | None = None
    lobe: str | None = None
    severity: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    keep: tuple[int, ...] = ()
    lo: np.ndarray = field(default_factory=lambda: np.full(3, np.inf))
    hi: np.ndarray = field(default_factory=lambda: np.full(3, -np.inf))
    record: _MaskRecord | None = None

    def grow(self, shape: _Shape) -> None:
        self.lo = np.minimum(self.lo, shape.lo)
        self.hi = np.maximum(self.hi, shape.hi)


@dataclass
class _Op:
    shape: _Shape
    value: Any
    tissue: int
    allow: np.ndarray | None
    spec: _Spec | None
    mode: str


STAGES = ("table", "body", "abdomen", "mediastinum", "heart", "airways", "nodes", "lung_tree",
          "lung_findings", "pleura", "bones", "calcium", "metal")


class _Scene:
    def __init__(self) -> None:
        self.ops: dict[str, list[_Op]] = {s: [] for s in STAGES}
        self.specs: list[_Spec] = []

    def add(self, stage: str, shape: _Shape, value: Any, tissue: str, allow: np.ndarray | None = None,
            spec: _Spec | None = None, mode: str = "set") -> None:
        self.ops[stage].append(_Op(shape, value, _T[tissue], allow, spec, mode))
        if spec is not None:
            spec.grow(shape)

    def bone(self, stage: str, shape_outer: _Shape, shape_inner: _Shape | None, anat: _Anatomy,
             cortex_scale: float = 1.0) -> None:
        """Cortex then marrow: thin bones read mostly as cortex at coarse spacing, as on a scanner."""
        self.add(stage, shape_outer, anat.cortex_hu * cortex_scale, "cortical_bone", _NOT_BONE)
        if shape_inner is not None:
            self.add(stage, shape_inner, anat.marrow_hu, "marrow", _allow("cortical_bone"))

    def spec(self, spec: _Spec) -> _Spec:
        self.specs.append(spec)
        return spec

    def ordered(self) -> list[_Op]:
        return [op for s in STAGES for op in self.ops[s]]


_BIG = 1e4


def _region(fn: Callable[..., np.ndarray], lo: Sequence[float] = (-_BIG,) * 3,
            hi: Sequence[float] = (_BIG,) * 3) -> _Region:
    return _Region(fn, lo, hi)


def _build_anatomy(scene: _Scene, anat: _Anatomy, grid: _Grid, rng: np.random.Generator,
                   pericardial_gap: float, heart_spec: _Spec | None, effusion_spec: _Spec | None,
                   bronchi_out: dict[str, list[_Branch]], arteries_out: dict[str, list[_Branch]]) -> None:
    s, L, cz, A = anat.s, anat.L, anat.carina_z, anat
    top = L + 400

    # --- the table, in the world frame (patients lie rotated on a straight table) ---------
    back = 0.94 * (A.bp0 + RIB + A.muscle[2] + A.fat[2] + 22 * s + 2)
    table_y = grid.shift[1] - back / max(grid.cos, 0.5) - 3.0

    def table_sd(x: np.ndarray, y: np.ndarray, z: np.ndarray, inset: float = 0.0) -> np.ndarray:
        xw = grid.cos * x - grid.sin * y + grid.shift[0]
        yw = grid.sin * x + grid.cos * y + grid.shift[1]
        ytop = table_y - (xw / 420.0) ** 2 * 30.0
        d = np.maximum(yw - ytop, (ytop - 48.0) - yw) + inset
        d = np.maximum(d, np.abs(xw) - 230.0 + inset)
        return d + np.zeros_like(z)

    t_lo, t_hi = (-400, -back - 80, -_BIG), (400, -back + 6, _BIG)
    outer, inner = _layers(_region(table_sd, t_lo, t_hi), 0.0, 2.5)
    scene.add("table", outer, 180.0, "table")
    scene.add("table", inner, -960.0, "table", _allow("table"))

    # --- body wall: skin, subcutaneous fat, muscle, then the cavity inside the ribs --------
    skin, fat = _layers(_region(A.body_sd), 0.0, 2.2)
    scene.add("body", skin, 32.0, "skin", _allow("air", "table"))
    scene.add("body", fat, A.fat_hu, "fat", _allow("skin"))
    wall = max(A.muscle) + RIB + 30
    scene.add("body", _region(A.muscle_sd, (-A.ac0 - wall, -A.bp0 - wall, -_BIG), (A.ac0 + wall, A.ba0 + wall, _BIG)),
              A.muscle_hu, "muscle", _allow("fat"))
    for side in (1, -1):
        def paraspinal(x: np.ndarray, y: np.ndarray, z: np.ndarray, side: int = side) -> np.ndarray:
            yv = np.asarray(A.y_vb(z), np.float32)
            return ((np.sqrt(((x - side * 33 * s) / (27 * s)) ** 2 + ((y - yv + 42 * s) / (26 * s)) ** 2) - 1)
                    * np.float32(26 * s))
        scene.add("body", _region(paraspinal, (-80 * s, -A.bp0 - 90 * s, -_BIG), (80 * s, -A.bp0 + 20 * s, _BIG)),
                  A.muscle_hu + 4, "muscle", _allow("fat"))
    cav_lo, cav_hi = (-A.ac0 - 2, -A.bp0 - 2, -_BIG), (A.ac0 + 2, A.ba0 + 2, _BIG)
    scene.add("body", _region(A.cavity_sd, cav_lo, cav_hi), A.fat_hu + 10, "fat", _allow("muscle", "fat"))
    if A.sex == "F":
        size = rng.uniform(0.7, 1.3)
        for side in (1, -1):
            zc = A.heart_c[2] + 12 * s
            _, ba, _, cy = A.profile(np.array([zc]))
            yb = float(cy[0] + ba[0]) + RIB + A.muscle[0] + A.fat[0] - 14 * s
            c = (side * 78 * s, yb, zc)
            r = np.array([70, 28 * size, 60]) * s
            scene.add("body", _Ellipsoid(c, r + 2), 32.0, "skin", _allow("air", "skin"))
            scene.add("body", _Ellipsoid(c, r), A.fat_hu, "fat", _allow("skin", "air"))
            # Fibroglandular tissue, partly averaged with the fat between its strands.
            scene.add("body", _Ellipsoid((c[0], c[1] + 8, c[2]), r * [0.45, 0.42, 0.45]), rng.uniform(-40, 5), "organ",
                      _allow("fat"))

    def lung_value(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        dep = np.clip((A.ba0 * 0.3 - y) / (A.ba0 + A.bp0), 0, 1)
        return A.lung_hu + 65.0 * dep ** 1.5

    lung_lo = (-A.ac0, -A.bp0 * 1.1, -A.dia_depth * 1.4 + A.dome_left)
    lung_hi = (A.ac0, A.ba0 * 1.1, L + 5)
    scene.add("body", _region(A.lung_sd, lung_lo, lung_hi), lung_value, "lung", _allow("fat"))

    # --- upper abdomen below the diaphragm ------------------------------------------------
    abd_lo, abd_hi = (-A.ac0 - 5, -A.bp0 - 5, -top), (A.ac0 + 5, A.ba0 + 5, 15.0)
    scene.add("abdomen", _region(lambda x, y, z: np.maximum(A.cavity_sd(x, y, z),
                                                            np.abs(z - A.dia_z(x, y) + 2.8) - 2.8),
                                 abd_lo, abd_hi), A.muscle_hu, "muscle", _allow("fat"))

    def liver_sd(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        xl = -14 * s - 52 * s * np.clip(y / A.ba0, 0, 1)
        sd = np.maximum(A.cavity_sd(x, y, z) + 3, z - (A.dia_z(x, y) - 5.6))
        return np.maximum(sd, xl - x)

    scene.add("abdomen", _region(liver_sd, abd_lo, abd_hi), A.liver_hu, "organ", _allow("fat"))
    spleen_c = (-0.72 * A.ac0, -0.5 * A.bp0, A.dome_left - 48 * s)
    rot = _frame([math.cos(-0.6), math.sin(-0.6), 0.0])
    spleen = _Ellipsoid(spleen_c, np.array([48, 22, 44]) * s, rot)
    scene.add("abdomen", _region(lambda x, y, z: np.maximum(spleen.sd(x, y, z), z - A.dia_z(x, y) + 6),
                                 spleen.lo, spleen.hi), A.liver_hu - 6 if A.contrast else 47.0, "organ",
              _allow("fat", "organ"))
    st_c = np.array([-0.42 * A.ac0, 0.12 * A.ba0, A.dome_left - 52 * s])
    st_r = np.array([44, 46, 40]) * s * rng.uniform(0.8, 1.15)
    below = lambda z, x, y: z - A.dia_z(x, y) + 6  # noqa: E731
    st_out, st_in = _Ellipsoid(st_c, st_r), _Ellipsoid(st_c, st_r - 4)
    level = st_c[1] + st_r[1] * rng.uniform(-0.1, 0.55)
    scene.add("abdomen", _region(lambda x, y, z: np.maximum(st_out.sd(x, y, z), below(z, x, y)),
                                 st_out.lo, st_out.hi), 42.0, "gut", _allow("fat", "organ"))
    scene.add("abdomen", _region(lambda x, y, z: np.maximum(st_in.sd(x, y, z), below(z, x, y) + 4),
                                 st_in.lo, st_in.hi), rng.uniform(5, 25), "gut", _allow("gut"))
    scene.add("abdomen", _region(lambda x, y, z: np.maximum(np.maximum(st_in.sd(x, y, z), level - y),
                                                            below(z, x, y) + 4), st_in.lo, st_in.hi),
              -1000.0, "gut_air", _allow("gut"))
    colon = _smooth_path([[-0.55 * A.ac0, 0.45 * A.ba0, -40 * s - 50], [-0.35 * A.ac0, 0.6 * A.ba0, -100 * s - 40],
                          [0.0, 0.65 * A.ba0, -120 * s - 45]], 8)
    for cap in _chain(colon, 17 * s):
        scene.add("abdomen", cap, 40.0, "gut", _allow("fat"))
    for cap in _chain(colon, 14 * s):
        scene.add("abdomen", cap, -1000.0, "gut_air", _allow("gut"))

    # --- mediastinum: oesophagus, aorta, pulmonary arteries, veins ---------------------------
    blood, vessel_ok = A.blood_hu, _allow("fat", "lung", "lung_vessel", "organ", "muscle", "gut", "skin")
    yes = lambda z: float(A.y_vb(z)) + 27 * s  # noqa: E731
    eso = _smooth_path([[-2 * s, yes(L + 120), L + 120], [-3 * s, yes(cz), cz],
                        [-12 * s, yes(0.3 * L) + 6 * s, 0.3 * L], [-0.28 * A.ac0, 0.1 * A.ba0 - 8, A.dome_left - 22]], 18)
    for cap in _chain(eso, 8.5 * s):
        scene.add("mediastinum", cap, 42.0, "gut", _allow("fat", "lung", "lung_vessel", "muscle", "organ"))
    if rng.random() < 0.5:
        for cap in _chain(eso[:8], 2.2):
            scene.add("mediastinum", cap, -950.0, "gut_air", _allow("gut"))

    ap = A.aorta_path
    radii = np.interp(np.arange(len(ap)), [0, 12, 20, len(ap) - 1], [1.12, 1.0, 0.92, 0.85]) * A.aorta_r
    for cap in _chain(ap, radii):
        scene.add("mediastinum", cap, blood, "blood", vessel_ok)
    branches = [
        ([[6 * s, 14 * s, cz + 40], [14 * s, 14 * s, cz + 70], [20 * s, 12 * s, L + 130]], 6.5 * s),
        ([[-4 * s, 12 * s, cz + 42], [-10 * s, 12 * s, cz + 75], [-14 * s, 14 * s, L + 130]], 4.5 * s),
        ([[-14 * s, 2 * s, cz + 38], [-26 * s, -4 * s, cz + 70], [-40 * s, -4 * s, L + 20], [-90 * s, -4 * s, L + 40]], 5.5 * s),
    ]
    for anchors, r in branches:
        for cap in _chain(_smooth_path(anchors, 8), r):
            scene.add("mediastinum", cap, blood, "blood", vessel_ok)
    hc = A.heart_c
    bif = np.array([-14 * s, 2 * s, cz - 8])
    trunk = _smooth_path([[hc[0] + 2, hc[1] + 22 * s, hc[2] + 28 * s], [-16 * s, 18 * s, cz - 22], bif], 8)
    for cap in _chain(trunk, 14 * s):
        scene.add("mediastinum", cap, blood, "blood", vessel_ok)
    pa = {
        "right": _smooth_path([bif, [6 * s, -6 * s, cz - 12], [20 * s, -8 * s, cz - 15], A.hilum["right"]], 8),
        "left": _smooth_path([bif, [-26 * s, -4 * s, cz - 2], A.hilum["left"]], 8),
    }
    for side in pa:
        for cap in _chain(pa[side], np.linspace(11 * s, 7 * s, len(pa[side]))):
            scene.add("mediastinum", cap, blood, "blood", vessel_ok)
    veins = [
        ([[27 * s, 8 * s, L + 130], [26 * s, 9 * s, cz + 30], [25 * s, 11 * s, hc[2] + 38 * s]], 9.5 * s),
        ([[-55 * s, 20 * s, cz + 72], [-10 * s, 20 * s, cz + 58], [26 * s, 10 * s, cz + 45]], 6.5 * s),
        ([[12 * s, float(A.y_vb(cz - 40)) + 22 * s, cz - 60], [12 * s, float(A.y_vb(cz)) + 22 * s, cz],
          [20 * s, 4 * s, cz + 14]], 4.5 * s),
        ([[hc[0] + A.heart_ext[0] * 0.7, hc[1] - 30 * s, hc[2] - 10 * s], [22 * s, yes(0) + 10 * s, -25], [20 * s, yes(0) + 12 * s, -top]],
         12 * s),
    ]
    for anchors, r in veins:
        for cap in _chain(_smooth_path(anchors, 10), r):
            scene.add("mediastinum", cap, blood, "blood", vessel_ok)
    thyroid_ok = _allow("fat", "muscle", "lung")
    for side in (1, -1):
        scene.add("mediastinum", _Ellipsoid((side * 19 * s, float(A.y_vb(L)) + 52 * s, L + 40 * s),
                                            np.array([10, 13, 24]) * s), 150.0 if A.contrast else 95.0,
                  "organ", thyroid_ok)

    # --- heart in its pericardial sac ------------------------------------------------------
    heart_ok = _allow("fat", "lung", "lung_vessel", "blood", "organ", "gut", "muscle")
    peri = _Ellipsoid(hc, A.heart_r + pericardial_gap + 1.6, A.heart_rot)
    scene.add("heart", peri, 32.0, "myocardium", heart_ok)
    sac = _Ellipsoid(hc + (0, -0.25 * pericardial_gap, -0.2 * pericardial_gap) if effusion_spec else hc,
                     A.heart_r + pericardial_gap, A.heart_rot)
    if effusion_spec is not None:
        scene.add("heart", sac, rng.uniform(6, 16), "fluid", _allow("myocardium"), spec=effusion_spec)
    else:
        scene.add("heart", sac, A.fat_hu + 10, "fat", _allow("myocardium"))
    heart = _Ellipsoid(hc, A.heart_r, A.heart_rot)
    heart_clip = _region(lambda x, y, z: np.maximum(heart.sd(x, y, z), A.dia_z(x, y) - z - 2), heart.lo, heart.hi)
    scene.add("heart", heart_clip, A.myo_hu, "myocardium", _allow("fat", "fluid", "myocardium", "lung", "lung_vessel",
                                                                 "blood", "organ", "gut"), spec=heart_spec)
    if A.contrast:  # chambers only show against the myocardium once blood is opacified
        R, r = A.heart_rot, A.heart_r
        ant = np.array([0.0, 1.0, 0.0])
        left = np.array([-1.0, 0.0, 0.0])
        long_ = R[:, 0]
        for centre, radii in [
            (hc + long_ * 0.12 * r[0] + left * 0.18 * r[1] - ant * 0.12 * r[1], (0.55 * r[0], 0.4 * r[1], 0.42 * r[2])),  # LV
            (hc + ant * 0.42 * r[1] - left * 0.1 * r[1], (0.55 * r[0], 0.2 * r[1], 0.5 * r[2])),                       # RV
            (hc - long_ * 0.62 * r[0] - ant * 0.25 * r[1], (0.3 * r[0], 0.45 * r[1], 0.4 * r[2])),                    # LA
            (hc - long_ * 0.45 * r[0] - left * 0.45 * r[1] + ant * 0.1 * r[1], (0.3 * r[0], 0.35 * r[1], 0.42 * r[2])),  # RA
        ]:
            scene.add("heart", _Ellipsoid(centre, radii, R), blood, "blood", _allow("myocardium"), spec=heart_spec)
    for path in _coronary_paths(A).values():
        for cap in _chain(path, 1.7):
            scene.add("heart", cap, blood, "blood", _allow("fat"))

    # --- airways: trachea and main bronchi, then the bronchial and vascular trees --------------
    ytr = lambda z: float(A.y_vb(z)) + 44 * s  # noqa: E731
    trachea = _smooth_path([[0, ytr(L + 130), L + 130], [0, ytr(L), L], [0, ytr(cz + 40), cz + 40],
                            [0, ytr(cz), cz]], 14)
    rt = A.trachea_r
    main = {
        "right": _smooth_path([trachea[-1], [12 * s, ytr(cz) - 5, cz - 12], A.hilum["right"] + (4, 8, 2)], 6),
        "left": _smooth_path([trachea[-1], [-20 * s, ytr(cz) - 6, cz - 10], [-34 * s, ytr(cz) - 10, cz - 20],
                              A.hilum["left"] + (-4, 8, 3)], 7),
    }
    wall_ok = _allow("fat", "lung", "lung_vessel", "gut", "organ", "muscle", "blood", "gut_air")
    pipes = [(trachea, rt)] + [(main[k], rt * (0.78 if k == "right" else 0.7)) for k in main]
    for path, r in pipes:
        for cap in _chain(path, r + 1.8):
            scene.add("airways", cap, 45.0, "cartilage", wall_ok)
    for path, r in pipes:
        for cap in _chain(path, r):
            scene.add("airways", cap, -1000.0, "airway", _allow("cartilage", "fat", "lung"))

    in_lung_ok = _allow("lung", "fat", "lung_vessel")
    for side in ("right", "left"):
        pts = A.sample_lung(rng, 2400, margin=2.0, side=side)
        if len(pts) < 50:
            continue
        arteries = _grow_tree(A.hilum[side], pts, 5.8 * s, 0.76, 6, twigs=3)
        arteries_out[side] = arteries
        la = hc + A.heart_rot @ np.array([-0.55 * A.heart_r[0], 0.0, 0.0]) + (
            (24 if side == "right" else -22) * s, -10 * s, -8 * s)
        vpts = A.sample_lung(rng, 2400, margin=2.0, side=side)
        vtree = _grow_tree(la, vpts, 6.2 * s, 0.76, 6, twigs=3)
        for br in arteries + vtree:
            scene.add("lung_tree", _Capsule(br.a, br.b, br.ra, br.rb), blood, "lung_vessel", in_lung_ok)
        bronchi = _bronchi_from(arteries, 7)
        bronchi_out[side] = bronchi
        for br in bronchi:
            if br.depth <= 4:
                wall = max(0.9, 0.18 * br.ra)
                cap = _Capsule(br.a, br.b, br.ra + wall, br.rb + wall)
                scene.add("lung_tree", cap, 40.0, "lung_vessel", _allow("lung", "fat"))
        for br in bronchi:
            if br.depth <= 4:
                scene.add("lung_tree", _Capsule(br.a, br.b, br.ra, br.rb), -1000.0, "airway",
                          _allow("lung", "lung_vessel", "fat"))
    # Fissures: the thin pleural planes that separate the lobes.
    cos = {side: 1 / math.sqrt(1 + ((A.oblique_z(1.0, side) - A.oblique_z(0.0, side))) ** 2)
           for side in ("right", "left")}
    for side, sign in (("right", 1.0), ("left", -1.0)):
        def oblique(x: np.ndarray, y: np.ndarray, z: np.ndarray, side: str = side, sign: float = sign) -> np.ndarray:
            d = np.abs(z - A.oblique_z(y, side, x)) * np.float32(cos[side]) - 0.5
            return np.maximum(d, -sign * x)
        fis = _region(oblique, lung_lo, lung_hi)
        fis.amp = min(1.0, 1.2 / grid.h)
        scene.add("lung_tree", fis, -80.0, "lung", _allow("lung"))
    zh = A.horizontal_z()
    hfis = _region(lambda x, y, z: np.maximum(np.maximum(np.abs(z - zh) - 0.5, -x), A.oblique_z(y, "right", x) - z),
                   (0, -A.bp0, zh - 3), (A.ac0, A.ba0, zh + 3))
    hfis.amp = min(1.0, 1.2 / grid.h)
    scene.add("lung_tree", hfis, -80.0, "lung", _allow("lung"))

    # --- bones -----------------------------------------------------------------------------
    _build_bones(scene, A, rng)


def _coronary_paths(A: _Anatomy) -> dict[str, np.ndarray]:
    """LAD, circumflex and right coronary artery, 1.6 mm outside the myocardium (epicardial fat)."""
    R, r, c = A.heart_rot, A.heart_r, A.heart_c
    ant = R.T @ np.array([0.0, 1.0, 0.0])
    ant[0] = 0.0
    ant /= np.linalg.norm(ant)
    lat = np.cross([1.0, 0.0, 0.0], ant)
    if (R @ lat)[0] > 0:          # make ``lat`` point to the patient's left (negative x)
        lat = -lat

    def on_surface(u: np.ndarray, theta: np.ndarray) -> np.ndarray:
        v = np.sqrt(np.clip(1 - u ** 2, 0, 1))[:, None] * (np.outer(np.cos(theta), ant) + np.outer(np.sin(theta), lat))
        unit = v.copy()
        unit[:, 0] = u
        local = unit * r
        local *= (1 + 1.6 / np.linalg.norm(local, axis=1))[:, None]
        return c + local @ R.T

    n = 14
    groove = np.full(n, -0.42)
    return {
        "LAD": on_surface(np.linspace(-0.42, 0.9, n), np.full(n, 0.15)),
        "LCx": on_surface(groove, np.linspace(0.35, 2.3, n)),
        "RCA": on_surface(groove, np.linspace(-0.2, -2.5, n)),
    }


def _build_bones(scene: _Scene, A: _Anatomy, rng: np.random.Generator) -> None:
    s, L, cz, pitch = A.s, A.L, A.carina_z, A.pitch
    # Vertebrae C7..L2: body (cortex shell, marrow), disc below, arch, spinous and transverse processes.
    for k in range(0, 15):
        zk = cz + (4.5 - k) * pitch
        yv = float(A.y_vb(zk))
        rx, ry, hz = 20 * s * (1 + 0.025 * k), 15.5 * s * (1 + 0.02 * k), 0.4 * pitch
        lo, hi = (-rx - 2, yv - ry - 2, zk - hz - 2), (rx + 2, yv + ry + 2, zk + hz + 2)

        def body(x: np.ndarray, y: np.ndarray, z: np.ndarray, inset: float = 0.0, zk: float = zk, yv: float = yv,
                 rx: float = rx, ry: float = ry, hz: float = hz) -> np.ndarray:
            e = (np.sqrt((x / rx) ** 2 + ((y - yv) / ry) ** 2) - 1) * np.float32(ry)
            return np.maximum(e, np.abs(z - zk) - hz) + inset

        scene.bone("bones", _region(body, lo, hi), _region(lambda x, y, z, f=body: f(x, y, z, 2.4), lo, hi), A)
        zd = zk - 0.5 * pitch
        scene.add("bones", _region(lambda x, y, z, zd=zd, yv=yv, rx=rx, ry=ry: np.maximum(
            (np.sqrt((x / rx) ** 2 + ((y - yv) / ry) ** 2) - 1) * np.float32(ry), np.abs(z - zd) - 0.1 * pitch),
            (-rx, yv - ry, zd - 4), (rx, yv + ry, zd + 4)), 95.0, "cartilage", _NOT_BONE)
        yc = yv - ry - 9 * s
        arch_lo, arch_hi = (-16 * s, yc - 16 * s, zk - 0.45 * pitch), (16 * s, yc + 14 * s, zk + 0.25 * pitch)
        scene.add("bones", _region(lambda x, y, z, yc=yc, zk=zk: np.maximum(
            np.abs(np.sqrt(x * x + (y - yc) ** 2) - 12 * s) - 3.5 * s, np.abs(z - zk + 0.1 * pitch) - 0.33 * pitch),
            arch_lo, arch_hi), A.cortex_hu * 0.8, "cortical_bone", _NOT_BONE)
        for a, b, r in [((0, yc - 12 * s, zk), (0, yc - 38 * s, zk - 0.6 * pitch), 4.5 * s),
                        ((9 * s, yc + 2, zk + 3), (34 * s, yc - 10 * s, zk + 6), 5.0 * s),
                        ((-9 * s, yc + 2, zk + 3), (-34 * s, yc - 10 * s, zk + 6), 5.0 * s)]:
            scene.bone("bones", _Capsule(a, b, r), _Capsule(a, b, r - 1.8), A, 0.9)
    canal_lo, canal_hi = (-10 * s, -A.bp0 - 60, -_BIG), (10 * s, 0, _BIG)
    scene.add("bones", _region(lambda x, y, z: np.sqrt(x * x + (y - np.asarray(A.y_vb(z), np.float32)
                                                                  + np.float32(24.5 * s)) ** 2) - 8 * s,
                               canal_lo, canal_hi), 22.0, "csf", _allow("cortical_bone", "marrow", "muscle", "fat",
                                                                         "cartilage"))
    # Ribs 1-12 on each side: from the costovertebral joint around the chest wall, sloping down.
    drops = [18, 34, 48, 58, 66, 72, 76, 76, 72, 64, 46, 36]
    ends = [0.82, 0.82, 0.81, 0.8, 0.79, 0.78, 0.76, 0.7, 0.64, 0.58, 0.5, 0.42]
    calcified = A.age > 55 and rng.random() < 0.6
    for k in range(1, 13):
        zpost = cz + (4.5 - k) * pitch + 0.3 * pitch
        yv = float(A.y_vb(zpost))
        for side in (1.0, -1.0):
            a0, ba0, bp0, cy0 = (float(v[0]) for v in A.profile(np.array([zpost])))
            phi0 = math.asin(min(0.95, 46 * s / (a0 + 5)))
            phi = np.linspace(phi0, ends[k - 1] * math.pi, 12)
            zz = zpost - drops[k - 1] * s * ((phi - phi0) / (phi[-1] - phi0)) ** 1.25
            a, ba, bp, cy = A.profile(zz)
            xx = side * (a + 5) * np.sin(phi)
            yy = np.where(phi < math.pi / 2, cy - (bp + 5) * np.cos(phi), cy - (ba + 5) * np.cos(phi))
            pts = np.vstack([[side * 14 * s, yv + 4, zpost + 4], [side * 34 * s, yv - 14 * s, zpost + 3],
                             np.column_stack([xx, yy, zz])])
            r = (4.0 if k in (1, 12) else 4.6) * s
            for cap_o, cap_i in zip(_chain(pts, r), _chain(pts, r - 1.7)):
                scene.bone("bones", cap_o, cap_i, A)
            if k <= 10:
                end = pts[-1]
                if k <= 7:
                    zs = A.notch_z - 12 * s - (k - 1) * 19 * s
                    target = np.array([side * 17 * s, float(A.profile(np.array([zs]))[1][0]
                                                           + A.profile(np.array([zs]))[3][0]) + 9 * s, zs])
                else:
                    target = end + (-side * 22 * s, 10 * s, 30 * s)
                mid = (end + target) / 2 + (0, 4 * s, 0)
                cart = _smooth_path([end, mid, target], 6)
                for cap in _chain(cart, 4.2 * s):
                    scene.add("bones", cap, rng.uniform(260, 420) if calcified and rng.random() < 0.3 else 115.0,
                              "cartilage", _NOT_BONE)
    # Sternum: manubrium, body, xiphoid, tilted so the lower end sits further forward.
    zs_top = A.notch_z
    _, ba_m, _, cy_m = (float(v[0]) for v in A.profile(np.array([zs_top - 22 * s])))
    y_m = cy_m + ba_m + 8 * s
    body_len = 100 * s
    zb = zs_top - 48 * s - body_len / 2
    _, ba_b, _, cy_b = (float(v[0]) for v in A.profile(np.array([zb])))
    y_b = cy_b + ba_b + 9 * s
    tilt = _frame([0.0, 0.0, 1.0])
    for c, half in [((0, y_m, zs_top - 22 * s), (24 * s, 6.5 * s, 22 * s)),
                    ((0, y_b, zb), (14 * s, 6 * s, body_len / 2)),
                    ((0, y_b + 3 * s, zb - body_len / 2 - 14 * s), (9 * s, 3.5 * s, 12 * s))]:
        scene.bone("bones", _Box(c, half, 3.0, tilt), _Box(c, np.array(half) - 2.0, 2.0, tilt), A)
    A.sternum = (y_m, y_b, zs_top, zb - body_len / 2)
    # Clavicles and scapulae.
    for side in (1.0, -1.0):
        p = _smooth_path([[side * 18 * s, y_m + 8 * s, zs_top + 4], [side * 62 * s, y_m - 2 * s, zs_top + 14],
                          [side * (A.ac0 * 0.95 + 16 * s), -0.05 * A.bp0, zs_top + 26]], 8)
        for co, ci in zip(_chain(p, 6.2 * s), _chain(p, 4.4 * s)):
            scene.bone("bones", co, ci, A)

        def scapula(x: np.ndarray, y: np.ndarray, z: np.ndarray, side: float = side) -> np.ndarray:
            a, ba, bp, cy = A.profile(z)
            off = RIB + A.muscle[2] * 0.55
            e = _ellipse_sd(x, y, 0.0, cy, a + off + 6, ba + off, bp + off)
            plate = np.abs(e) - 2.6
            phi = np.arctan2(side * x, -(y - cy))
            u = np.clip((L + 10 - z) / (150 * s), 0, 1)
            lo_phi = 0.52 + 0.18 * u
            hi_phi = 1.3 - 0.5 * u
            ang = np.maximum(lo_phi - phi, phi - hi_phi) * 60.0
            zlim = np.maximum(z - (L + 12), (L - 150 * s) - z)
            return np.maximum(np.maximum(plate, ang), zlim)

        lo = (min(side * 30, side * (A.ac0 + 70)), -A.bp0 - 60, L - 155 * s)
        hi = (max(side * 30, side * (A.ac0 + 70)), 0.3 * A.ba0, L + 15)
        scene.add("bones", _region(scapula, lo, hi), A.cortex_hu * 0.75, "cortical_bone",
                  _allow("muscle", "fat", "skin"))


# ==========================================================================================
# Which findings a patient has: latent conditions give realistic co-occurrence
# ==========================================================================================
@dataclass
class _Plan:
    findings: set[str]
    conditions: set[str]


def _draw_plan(rng: np.random.Generator, age: int, sex: str) -> _Plan:
    """Normal studies are common (about 30%) and become rarer with age; disease comes in patterns
    (atherosclerosis, smoking, heart failure, infection, malignancy) plus incidental findings."""
    found: set[str] = set()
    cond: set[str] = set()
    p_normal = float(np.clip(0.56 - 0.0075 * (age - 30), 0.1, 0.56))
    if rng.random() < p_normal:
        return _Plan(found, cond)

    def maybe(name: str, p: float) -> None:
        if rng.random() < p:
            found.add(name)

    if rng.random() < 0.85 / (1 + math.exp(-(age - 63) / 7)):
        cond.add("atherosclerosis")
        maybe("Arterial wall calcification", 0.9)
        maybe("Coronary artery wall calcification", 0.72)
    if rng.random() < 0.16 + 0.16 * (age > 55) + 0.06 * (sex == "M"):
        cond.add("smoker")
        maybe("Emphysema", 0.75)
        maybe("Lung nodule", 0.3)
        maybe("Bronchiectasis", 0.12)
    if rng.random() < 0.04 + 0.006 * max(0, age - 50):
        cond.add("heart failure")
        maybe("Cardiomegaly", 0.85)
        maybe("Pleural effusion", 0.6)
        maybe("Interlobular septal thickening", 0.45)
        maybe("Pericardial effusion", 0.3)
        maybe("Lung opacity", 0.35)
        maybe("Medical material", 0.3)
    if rng.random() < 0.13:
        cond.add("infection")
        maybe("Consolidation", 0.72)
        maybe("Lung opacity", 0.6)
        maybe("Pleural effusion", 0.3)
        maybe("Atelectasis", 0.3)
        maybe("Lymphadenopathy", 0.3)
    if rng.random() < 0.04 + 0.003 * max(0, age - 45):
        cond.add("malignancy")
        maybe("Lung mass", 0.6)
        maybe("Lung nodule", 0.55)
        maybe("Lymphadenopathy", 0.6)
        maybe("Pleural effusion", 0.25)
        maybe("Medical material", 0.35)
    for name, p in [("Lung nodule", 0.2), ("Atelectasis", 0.14), ("Hiatal hernia", 0.04 + 0.004 * max(0, age - 45)),
                    ("Pericardial effusion", 0.04), ("Lymphadenopathy", 0.07), ("Bronchiectasis", 0.06),
                    ("Interlobular septal thickening", 0.035), ("Lung opacity", 0.08), ("Pneumothorax", 0.05),
                    ("Medical material", 0.06), ("Cardiomegaly", 0.02 + 0.002 * max(0, age - 50)),
                    ("Lung mass", 0.015), ("Pleural effusion", 0.04)]:
        maybe(name, p)
    if "Pleural effusion" in found:
        maybe("Atelectasis", 0.5)
    if not found:
        names = ["Lung nodule", "Atelectasis", "Arterial wall calcification", "Hiatal hernia", "Lung opacity",
                 "Emphysema", "Lymphadenopathy", "Bronchiectasis", "Pneumothorax", "Consolidation"]
        w = np.array([5, 4, 3, 2, 2, 2, 1.5, 1, 1, 1.5])
        found.add(names[rng.choice(len(names), p=w / w.sum())])
    return _Plan(found, cond)


def _choose(rng: np.random.Generator, options: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    w = np.ones(len(options)) if weights is None else np.asarray(weights, float)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def _random_rot(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q


def _lobe_weights(lobes: Sequence[str], upper: float = 1.0, lower: float = 1.0) -> list[float]:
    return [(upper if "upper" in lb else lower if "lower" in lb else 0.6) for lb in lobes]


def _pleural_band(A: _Anatomy, side: str, depth: float, span: float, posterior: bool,
                  z_bottom: float | None = None) -> Callable[..., np.ndarray]:
    """Signed distance of a crescent along the posterior (dependent) or anterior chest wall."""
    sign = 1.0 if side == "right" else -1.0
    z_bot = -1.25 * A.dia_depth + (0 if side == "right" else A.dome_left) if z_bottom is None else z_bottom
    z_top = z_bot + span

    def fn(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        a, ba, bp, cy = A.profile(z)
        q = np.sqrt(np.clip(1 - (x / a) ** 2, 0, 1))
        lateral = 1 - 0.4 * np.clip(np.abs(x) / a, 0, 1) ** 2
        if posterior:
            dist = y - (cy - bp * q)
            d = depth * np.clip((z_top - z) / span, 0, 1) ** 0.55 * lateral
        else:
            dist = (cy + ba * q) - y
            d = depth * (0.6 + 0.4 * np.clip((z - z_bot) / span, 0, 1)) * lateral
        sd = np.maximum(dist - d, A.lung_sd(x, y, z))
        sd = np.maximum(sd, -sign * x)
        return sd if posterior else np.minimum(sd, np.maximum(np.maximum(A.apex_top(x, y) - z - 0.5 * depth,
                                                                         A.lung_sd(x, y, z)), -sign * x))

    return fn


def _build_findings(scene: _Scene, A: _Anatomy, plan: _Plan, rng: np.random.Generator, grid: _Grid,
                    bronchi: dict[str, list[_Branch]], arteries: dict[str, list[_Branch]],
                    pre: dict[str, _Spec]) -> None:
    s, L = A.s, A.L
    lung_lo = (-A.ac0, -A.bp0 * 1.1, -A.dia_depth * 1.4 + A.dome_left)
    lung_hi = (A.ac0, A.ba0 * 1.1, L + 5)
    lesion_hu = 70.0 if A.contrast else rng.uniform(28, 42)
    F = plan.findings

    def place(margin: float, lobe: str | None = None, where: Callable[[np.ndarray], np.ndarray] | None = None,
              side: str | None = None) -> tuple[np.ndarray, str] | None:
        for m in (margin, margin * 0.6, 2.0):
            pts = A.sample_lung(rng, 1, m, lobe=lobe, side=side, where=where)
            if len(pts):
                return pts[0], A.lobe_of(pts[0])
        return None

    # ---- pleural effusion (and the passive atelectasis it causes) ----------------------------
    eff_sides: dict[str, tuple[float, float]] = {}
    if "Pleural effusion" in F:
        p_bi = 0.7 if "heart failure" in plan.conditions else 0.3
        sides = ["right", "left"] if rng.random() < p_bi else [_choose(rng, ["right", "left"], [0.62, 0.38])]
        for side in sides:
            sev = _choose(rng, ["small", "moderate", "large"], [0.5, 0.35, 0.15])
            depth = {"small": rng.uniform(14, 24), "moderate": rng.uniform(28, 44), "large": rng.uniform(52, 75)}[sev] * s
            span = {"small": 120.0, "moderate": 175.0, "large": 235.0}[sev] * s
            eff_sides[side] = (depth, span)
            fn = _pleural_band(A, side, depth, span, posterior=True)
            sign = 1 if side == "right" else -1
            z_bot = -1.25 * A.dia_depth
            spec = scene.spec(_Spec("Pleural effusion", np.array([sign * 0.55 * A.ac0, -A.bp0 + depth / 2, z_bot + 0.3 * span]),
                                    round(depth), side, None, sev, {"thickness_mm": round(depth)}, (_T["fluid"],)))
            scene.add("pleura", _region(fn, lung_lo, lung_hi), rng.uniform(6, 18), "fluid",
                      _allow("lung", "lung_vessel", "airway", "ground_glass", "low_attenuation", "lesion"), spec)

    # ---- atelectasis --------------------------------------------------------------------------
    if "Atelectasis" in F:
        n = 1 + int(rng.random() < 0.3)
        for i in range(n):
            side = _choose(rng, ["right", "left"], [0.55, 0.45])
            if eff_sides and i == 0:
                side = _choose(rng, list(eff_sides))
            sign = 1 if side == "right" else -1
            if side in eff_sides:
                depth, span = eff_sides[side]
                band = _pleural_band(A, side, depth + 11 * s, span * 0.9, posterior=True)
                spec = scene.spec(_Spec("Atelectasis", np.array([sign * 0.5 * A.ac0, -A.bp0 + depth + 6, -A.dia_depth * 0.6]),
                                        round(depth * 0.6 + 20), side, f"{side} lower lobe", "passive",
                                        {"type": "passive", "adjacent": "pleural effusion"}, (_T["lesion"],)))
                scene.add("lung_findings", _region(band, lung_lo, lung_hi), rng.uniform(15, 35), "lesion",
                          _allow("lung", "lung_vessel", "airway", "ground_glass", "low_attenuation"), spec)
                continue
            kind = _choose(rng, ["plate", "dependent"], [0.6, 0.4])
            if kind == "dependent":
                depth = rng.uniform(9, 16) * s
                band = _pleural_band(A, side, depth, 95 * s, posterior=True)
                spec = scene.spec(_Spec("Atelectasis", np.array([sign * 0.5 * A.ac0, -A.bp0 + depth / 2, -A.dia_depth * 0.7]),
                                        round(depth), side, f"{side} lower lobe", "mild", {"type": "dependent"},
                                        (_T["lesion"],)))
                scene.add("lung_findings", _region(band, lung_lo, lung_hi), rng.uniform(12, 32), "lesion",
                          _allow("lung", "lung_vessel", "airway", "ground_glass", "low_attenuation"), spec)
                continue
            lobes = [f"{side} lower lobe", "right middle lobe" if side == "right" else "left upper lobe"]
            lobe = _choose(rng, lobes, [0.7, 0.3])
            where = (lambda p: p[:, 2] < A.horizontal_z() - 10) if lobe == "left upper lobe" else None
            got = place(10 * s, lobe, where)
            if got is None:
                continue
            c, lobe = got
            length = rng.uniform(45, 75) * s
            thick = rng.uniform(5.5, 8.0)
            axis = np.array([sign * 0.8, rng.uniform(-0.4, 0.4), rng.uniform(-0.35, 0.35)])
            rot = _frame(axis)
            plate = _Ellipsoid(c, (length / 2, length * rng.uniform(0.22, 0.32), thick / 2), rot)
            sev = "subsegmental" if length < 60 else "segmental"
            spec = scene.spec(_Spec("Atelectasis", c, round(length), side, lobe, sev, {"type": "plate"}, (_T["lesion"],)))
            scene.add("lung_findings", plate, rng.uniform(5, 30), "lesion", _IN_LUNG, spec)

    # ---- nodules and masses -------------------------------------------------------------------
    if "Lung nodule" in F:
        count = int(_choose(rng, [1, 2, 3], [0.65, 0.22, 0.13]))
        for _ in range(count):
            d = float(np.clip(rng.lognormal(math.log(10), 0.4), 6, 26))
            kind = _choose(rng, ["solid", "ground-glass", "part-solid"], [0.72, 0.16, 0.12])
            lobe = _choose(rng, LOBES, _lobe_weights(LOBES, upper=1.5))
            got = place(d / 2 + 3, lobe)
            if got is None:
                continue
            c, lobe = got
            rot = _random_rot(rng)
            r = d / 2
            spec = scene.spec(_Spec("Lung nodule", c, round(d), "right" if c[0] > 0 else "left", lobe, None,
                                    {"type": kind}, (_T["lesion"], _T["ground_glass"])))
            parts = [_Ellipsoid(c, (r, r * rng.uniform(0.8, 1.0), r * rng.uniform(0.8, 1.0)), rot)]
            if d > 9 and rng.random() < 0.6:
                parts.append(_Ellipsoid(c + rot[:, 1] * r * 0.45, (r * 0.6,) * 3))
            for part in parts:
                if kind == "solid":
                    scene.add("lung_findings", part, lesion_hu, "lesion", _IN_LUNG, spec)
                else:
                    scene.add("lung_findings", part, rng.uniform(-600, -480), "ground_glass", _allow("lung"), spec, "raise")
            if kind == "part-solid":
                scene.add("lung_findings", _Ellipsoid(c, (r * 0.45,) * 3), lesion_hu, "lesion",
                          _allow("lung", "ground_glass", "lung_vessel"), spec)
    if "Lung mass" in F:
        d = rng.uniform(32, 62) * s
        lobe = _choose(rng, LOBES, _lobe_weights(LOBES, upper=1.6))
        got = place(d * 0.35, lobe)
        if got is not None:
            c, lobe = got
            r = d / 2
            spec = scene.spec(_Spec("Lung mass", c, round(d), "right" if c[0] > 0 else "left", lobe, None,
                                    {"margin": _choose(rng, ["lobulated", "spiculated"]),
                                     "short_mm": round(d * rng.uniform(0.7, 0.9))}, (_T["lesion"],)))
            parts = [_Ellipsoid(c, (r * 0.85, r * 0.72, r * 0.78), _random_rot(rng))]
            for _ in range(int(rng.integers(4, 7))):
                off = rng.normal(size=3)
                parts.append(_Ellipsoid(c + off / np.linalg.norm(off) * r * rng.uniform(0.45, 0.65),
                                        r * rng.uniform(0.3, 0.5, 3), _random_rot(rng)))
            for part in parts:
                scene.add("lung_findings", part, lesion_hu, "lesion", _IN_LUNG, spec)
            for _ in range(int(rng.integers(8, 15))):
                v = rng.normal(size=3)
                v /= np.linalg.norm(v)
                a = c + v * r * 0.8
                scene.add("lung_findings", _Capsule(a, a + v * rng.uniform(8, 20), 1.6, 0.6), lesion_hu, "lesion",
                          _IN_LUNG, spec)
            if d > 45:
                scene.add("lung_findings", _Ellipsoid(c, (r * 0.4,) * 3), rng.uniform(5, 18), "lesion",
                          _allow("lesion"), spec)

    # ---- airspace disease: consolidation and ground glass -----------------------------------
    if "Consolidation" in F:
        lobe = _choose(rng, LOBES, _lobe_weights(LOBES, upper=0.7, lower=1.6))
        side = lobe.split()[0]
        lobar = rng.random() < 0.25
        got = place(12, lobe, where=lambda p: A.lung_sd(*(p[:, i].astype(np.float32) for i in range(3))) > -40)
        if got is not None:
            c, lobe = got
            rad = np.array([rng.uniform(24, 38), rng.uniform(20, 32), rng.uniform(22, 38)]) * s * (1.6 if lobar else 1.0)
            blobs = [_Ellipsoid(c, rad, _random_rot(rng))]
            for _ in range(int(rng.integers(3, 6))):
                blobs.append(_Ellipsoid(c + rng.normal(0, 0.45, 3) * rad, rad * rng.uniform(0.35, 0.7, 3), _random_rot(rng)))
            sign = 1.0 if side == "right" else -1.0

            def in_lobe(x: np.ndarray, y: np.ndarray, z: np.ndarray, lobe: str = lobe) -> np.ndarray:
                zo = A.oblique_z(y, side, x)
                d = (z - zo) * 0.7 if "lower" in lobe else (zo - z) * 0.7
                if lobe == "right upper lobe":
                    d = np.maximum(d, A.horizontal_z() - z)
                elif lobe == "right middle lobe":
                    d = np.maximum(d, z - A.horizontal_z())
                return np.maximum(d, -sign * x)

            spec = scene.spec(_Spec("Consolidation", c, round(2 * rad.max()), side, lobe,
                                    "lobar" if lobar else _choose(rng, ["segmental", "patchy"]), {},
                                    (_T["lesion"], _T["airway"])))
            for b in blobs:
                shape = _region(lambda x, y, z, b=b: np.maximum(np.maximum(b.sd(x, y, z), in_lobe(x, y, z)),
                                                                A.lung_sd(x, y, z)), b.lo, b.hi)
                scene.add("lung_findings", shape, lesion_hu + rng.uniform(-5, 10), "lesion", _IN_LUNG, spec)
            # Air bronchograms: the airways inside stay aerated against the opaque lung.
            for br in bronchi.get(side, []):
                mid = [np.float32(v) for v in (br.a + br.b) / 2]
                if 1 <= br.depth <= 7 and min(float(b.sd(*mid)) for b in blobs) < 0:
                    scene.add("lung_findings", _Capsule(br.a, br.b, max(br.ra, 1.4), max(br.rb, 1.2)), -930.0,
                              "airway", _allow("lesion"), spec)
    if "Lung opacity" in F:
        diffuse = "heart failure" in plan.conditions or rng.random() < 0.3
        n = int(rng.integers(3, 7)) if diffuse else int(rng.integers(1, 4))
        hu = rng.uniform(-610, -480)
        for _ in range(n):
            lobe = _choose(rng, LOBES, _lobe_weights(LOBES, upper=0.9, lower=1.3))
            got = place(8, lobe, where=lambda p: A.lung_sd(*(p[:, i].astype(np.float32) for i in range(3))) > -45)
            if got is None:
                continue
            c, lobe = got
            rad = rng.uniform(14, 32, 3) * s
            spec = scene.spec(_Spec("Lung opacity", c, round(2 * rad.max()), "right" if c[0] > 0 else "left", lobe,
                                    "diffuse" if diffuse else "patchy", {"type": "ground-glass"},
                                    (_T["ground_glass"],)))
            for k in range(int(rng.integers(2, 4))):
                cc = c + (rng.normal(0, 0.35, 3) * rad if k else 0)
                scene.add("lung_findings", _Ellipsoid(cc, rad * rng.uniform(0.6, 1.0, 3), _random_rot(rng)), hu,
                          "ground_glass", _allow("lung"), spec, "raise")

    # ---- emphysema ------------------------------------------------------------------------------
    if "Emphysema" in F:
        kind = _choose(rng, ["centrilobular", "paraseptal", "panlobular"], [0.65, 0.2, 0.15])
        sev = _choose(rng, ["mild", "moderate", "severe"], [0.45, 0.35, 0.2])
        count = {"mild": 50, "moderate": 120, "severe": 230}[sev]
        rmax = {"mild": 6.0, "moderate": 8.0, "severe": 10.0}[sev]
        if kind == "paraseptal":
            where = lambda p: A.lung_sd(*(p[:, i].astype(np.float32) for i in range(3))) > -9  # noqa: E731
            zone = "upper lobes, subpleural"
        elif kind == "panlobular":
            where = lambda p: p[:, 2] < 0.45 * L  # noqa: E731
            zone = "lower lobes"
        else:
            where = lambda p: p[:, 2] > 0.42 * L  # noqa: E731
            zone = "upper lobes"
        if kind == "paraseptal":
            upper = where
            where = lambda p: upper(p) & (p[:, 2] > 0.35 * L)  # noqa: E731
        pts = A.sample_lung(rng, count, margin=1.0, where=where)
        if len(pts):
            spec = scene.spec(_Spec("Emphysema", pts.mean(axis=0), round(2 * rmax), "bilateral", zone, sev,
                                    {"type": kind}, (_T["low_attenuation"],)))
            for p in pts:
                r = rng.uniform(3.0, rmax) * (1.3 if kind != "centrilobular" else 1.0)
                scene.add("lung_findings", _Ellipsoid(p, (r, r * rng.uniform(0.7, 1), r * rng.uniform(0.7, 1)),
                                                      _random_rot(rng)),
                          rng.uniform(-990, -960), "low_attenuation", _allow("lung", "lung_vessel"), spec)
            if sev == "severe":
                for _ in range(int(rng.integers(1, 3))):
                    got = place(2, where=lambda p: (A.lung_sd(*(p[:, i].astype(np.float32) for i in range(3))) > -14)
                                & (p[:, 2] > 0.6 * L))
                    if got is not None:
                        scene.add("lung_findings", _Ellipsoid(got[0], (rng.uniform(12, 22) * s,) * 3), -995.0,
                                  "low_attenuation", _allow("lung", "lung_vessel"), spec)

    # ---- bronchiectasis -----------------------------------------------------------------------
    if "Bronchiectasis" in F:
        lobe = _choose(rng, LOBES, _lobe_weights(LOBES, upper=0.4, lower=1.6))
        side = lobe.split()[0]
        chosen = [br for br in bronchi.get(side, []) if 1 <= br.depth <= 6 and A.lobe_of((br.a + br.b) / 2) == lobe]
        if len(chosen) < 4:
            chosen = [br for br in bronchi.get(side, []) if 2 <= br.depth <= 6 and A.lobe_of((br.a + br.b) / 2).endswith("lower lobe")]
            lobe = f"{side} lower lobe"
        if chosen:
            kind = _choose(rng, ["cylindrical", "varicose", "cystic"], [0.65, 0.25, 0.1])
            mids = np.array([(br.a + br.b) / 2 for br in chosen])
            lumen = [max(2.3 * br.ra, 3.4) for br in chosen]
            spec = scene.spec(_Spec("Bronchiectasis", mids.mean(axis=0), round(2 * max(lumen)), side, lobe,
                                    _choose(rng, ["mild", "moderate"]), {"type": kind},
                                    (_T["lesion"], _T["airway"])))
            for br, lr in zip(chosen, lumen):
                wall = max(1.6, 0.35 * lr)
                k = 3 if kind == "varicose" else 1
                for j in range(k):
                    a = br.a + (br.b - br.a) * j / k
                    b = br.a + (br.b - br.a) * (j + 1) / k
                    rr = lr * (1.25 if (kind == "varicose" and j % 2) else 1.0)
                    scene.add("lung_findings", _Capsule(a, b, rr + wall), 45.0, "lesion", _IN_LUNG, spec)
                    scene.add("lung_findings", _Capsule(a, b, rr), -960.0, "airway",
                              _allow("lesion", "lung", "lung_vessel", "airway"), spec)
                if kind == "cystic":
                    scene.add("lung_findings", _Ellipsoid(br.b, (lr * 1.8,) * 3), 45.0, "lesion", _IN_LUNG, spec)
                    scene.add("lung_findings", _Ellipsoid(br.b, (lr * 1.8 - wall,) * 3), -960.0, "airway",
                              _allow("lesion"), spec)

    # ---- interlobular septal thickening ----------------------------------------------------
    if "Interlobular septal thickening" in F:
        from scipy.spatial import cKDTree

        sev = _choose(rng, ["mild", "moderate", "marked"], [0.4, 0.4, 0.2])
        gap, width = {"mild": (17.0, 1.3), "moderate": (15.0, 1.6), "marked": (13.0, 2.0)}[sev]
        zcap = rng.uniform(0.45, 0.6) * L
        lo = np.array([-A.ac0, -A.bp0, -1.4 * A.dia_depth + A.dome_left])
        hi = np.array([A.ac0, A.ba0, zcap])
        n = int(np.prod(hi - lo) / gap ** 3)
        seeds = rng.uniform(lo, hi, size=(n, 3))
        tree = cKDTree(seeds)

        def septa(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            region = np.maximum(A.lung_sd(x, y, z), -A.lung_sd(x, y, z) - 14.0)
            region = np.maximum(region, z - zcap)
            out = np.array(region, np.float32, copy=True)
            idx = np.nonzero(region < 1.0)
            if len(idx[0]):
                pts = np.column_stack([np.broadcast_to(x, region.shape)[idx], np.broadcast_to(y, region.shape)[idx],
                                       np.broadcast_to(z, region.shape)[idx]])
                dist, nn = tree.query(pts, k=2)
                s1, s2 = seeds[nn[:, 0]], seeds[nn[:, 1]]
                edge = (dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2 * np.linalg.norm(s2 - s1, axis=1) + 1e-6)
                out[idx] = np.maximum(region[idx], edge - width / 2)
            return out

        spec = scene.spec(_Spec("Interlobular septal thickening", np.array([0.0, -0.3 * A.bp0, 0.15 * L]),
                                round(zcap + A.dia_depth), "bilateral", "lower lobes", sev, {},
                                (_T["lesion"],)))
        shape = _region(septa, lo, hi)
        scene.add("lung_findings", shape, -150.0, "lesion", _allow("lung", "ground_glass"), spec)

    # ---- pneumothorax ---------------------------------------------------------------------------
    if "Pneumothorax" in F:
        side = _choose(rng, ["right", "left"], [0.55, 0.45])
        sev = _choose(rng, ["small", "moderate", "large"], [0.55, 0.3, 0.15])
        depth = {"small": rng.uniform(10, 18), "moderate": rng.uniform(22, 34), "large": rng.uniform(40, 58)}[sev]
        fn = _pleural_band(A, side, depth, 0.9 * L, posterior=False)
        sign = 1 if side == "right" else -1
        spec = scene.spec(_Spec("Pneumothorax", np.array([sign * 0.45 * A.ac0, A.ba0 - depth / 2, 0.5 * L]),
                                round(depth), side, None, sev, {"thickness_mm": round(depth)}, (_T["pleural_air"],)))
        scene.add("pleura", _region(fn, lung_lo, lung_hi), -1000.0, "pleural_air",
                  _allow("lung", "lung_vessel", "airway", "ground_glass", "low_attenuation", "lesion"), spec)
        line = _region(lambda x, y, z: np.abs(fn(x, y, z) - 1.0) - 0.6, lung_lo, lung_hi)
        line.amp = min(1.0, 1.5 / grid.h)
        scene.add("pleura", line, -100.0, "lung", _allow("lung", "lung_vessel"))

    # ---- mediastinum: nodes, hernia ---------------------------------------------------------
    if "Lymphadenopathy" in F:
        cz, yt = A.carina_z, float(A.y_vb(A.carina_z)) + 44 * s
        stations = {
            "right lower paratracheal": (17 * s, yt + 4 * s, cz + 16),
            "subcarinal": (-3 * s, yt - 10 * s, cz - 24),
            "right hilar": tuple(A.hilum["right"] + (8, 8, -6)),
            "left hilar": tuple(A.hilum["left"] + (-6, 8, -2)),
            "aortopulmonary window": (-18 * s, 2 * s, cz + 14),
            "prevascular": (-6 * s, 36 * s, cz + 26),
            "left axillary": (-(A.ac0 + 30 * s), 0.0, 0.62 * L),
        }
        names = list(stations)
        k = int(rng.integers(1, 5))
        picked = rng.choice(len(names), size=k, replace=False, p=np.array([3, 3, 2, 2, 1.5, 1, 0.6]) / 13.1)
        for i in picked:
            st = names[int(i)]
            short = rng.uniform(12, 24) * (1.0 if "axillary" not in st else 0.9)
            rad = np.array([short * rng.uniform(1.15, 1.5), short, short * rng.uniform(1.0, 1.3)]) / 2
            c = np.asarray(stations[st], float)
            spec = scene.spec(_Spec("Lymphadenopathy", c, round(2 * rad.max()), None, None, None,
                                    {"station": st, "short_axis_mm": round(short), "long_axis_mm": round(2 * rad.max())},
                                    (_T["lesion"],)))
            scene.add("nodes", _Ellipsoid(c, rad, _random_rot(rng)), lesion_hu + 5, "lesion",
                      _allow("fat", "lung", "lung_vessel", "muscle"), spec)
    else:
        cz, yt = A.carina_z, float(A.y_vb(A.carina_z)) + 44 * s
        for c in [(15 * s, yt + 4 * s, cz + 16), (-3 * s, yt - 10 * s, cz - 24)][: int(rng.integers(0, 3))]:
            scene.add("nodes", _Ellipsoid(c, rng.uniform(2.5, 4.0, 3)), lesion_hu, "lesion", _allow("fat"))

    if "Hiatal hernia" in F:
        sev = _choose(rng, ["small", "moderate", "large"], [0.5, 0.35, 0.15])
        d = {"small": rng.uniform(28, 38), "moderate": rng.uniform(40, 54), "large": rng.uniform(56, 72)}[sev] * s
        r = d / 2
        c = np.array([-14 * s, float(A.y_vb(0.0)) + 20 * s + r * 0.8, A.dome_left + r * 0.5])
        spec = scene.spec(_Spec("Hiatal hernia", c, round(d), None, None, sev, {}, (_T["gut"], _T["gut_air"])))
        ok = _allow("fat", "lung", "lung_vessel", "gut", "muscle", "lesion", "ground_glass", "fluid", "organ", "gut_air")
        outer = _Ellipsoid(c, (r * 1.1, r, r * 0.9))
        inner = _Ellipsoid(c, (r * 1.1 - 4, r - 4, r * 0.9 - 4))
        scene.add("heart", outer, 42.0, "gut", ok, spec)
        scene.add("heart", inner, rng.uniform(10, 30), "gut", _allow("gut"), spec)
        level = c[1] + r * rng.uniform(-0.3, 0.2)
        scene.add("heart", _region(lambda x, y, z: np.maximum(inner.sd(x, y, z), level - y), inner.lo, inner.hi),
                  -1000.0, "gut_air", _allow("gut"), spec)
        neck = _Capsule(c - (0, 0, r * 0.6), (-0.28 * A.ac0, 0.1 * A.ba0 - 8, A.dome_left - 22), r * 0.55)
        scene.add("heart", neck, 42.0, "gut", ok, spec)

    # ---- calcification ---------------------------------------------------------------------------
    if "Arterial wall calcification" in F:
        sev = _choose(rng, ["mild", "moderate", "severe"], [0.45, 0.35, 0.2])
        count = {"mild": int(rng.integers(4, 8)), "moderate": int(rng.integers(10, 18)), "severe": int(rng.integers(22, 36))}[sev]
        ap = A.aorta_path
        spec = scene.spec(_Spec("Arterial wall calcification", ap[len(ap) // 3], 0.0, None, None, sev,
                                {"vessels": ["aortic arch", "descending aorta"]}, (_T["calcium"],)))
        sizes = []
        for _ in range(count):
            i = int(rng.integers(6, 34))
            t = ap[i + 1] - ap[i]
            t /= np.linalg.norm(t)
            fr = _frame(t)
            ang = rng.uniform(0, 2 * math.pi)
            rr = A.aorta_r * np.interp(i, [0, 12, 20, len(ap) - 1], [1.12, 1.0, 0.92, 0.85])
            p = ap[i] + (fr[:, 1] * math.cos(ang) + fr[:, 2] * math.sin(ang)) * (rr - 0.6)
            size = rng.uniform(3.5, 8.0)
            sizes.append(size)
            scene.add("calcium", _Ellipsoid(p, (size / 2, 1.9, 1.9), fr), rng.uniform(600, 1150), "calcium",
                      _allow("blood", "fat", "lung", "lung_vessel", "lesion", "myocardium"), spec)
        spec.size_mm = round(max(sizes))
    if "Coronary artery wall calcification" in F:
        paths = _coronary_paths(A)
        sev = _choose(rng, ["mild", "moderate", "severe"], [0.45, 0.35, 0.2])
        vessels = list(rng.choice(["LAD", "LCx", "RCA"], size=int(_choose(rng, [1, 2, 3], [0.4, 0.35, 0.25])),
                                  replace=False, p=[0.5, 0.2, 0.3]))
        per = {"mild": (1, 3), "moderate": (3, 5), "severe": (5, 8)}[sev]
        spec = scene.spec(_Spec("Coronary artery wall calcification", paths[vessels[0]][3], 0.0, None, None, sev,
                                {"vessels": sorted(vessels)}, (_T["calcium"],)))
        sizes = []
        for v in vessels:
            for _ in range(int(rng.integers(per[0], per[1] + 1))):
                p = paths[v][int(rng.integers(0, 9))]
                size = rng.uniform(3.2, 5.6)
                sizes.append(size)
                scene.add("calcium", _Ellipsoid(p, (size / 2,) * 3), rng.uniform(600, 1150), "calcium",
                          _allow("blood", "fat", "myocardium", "fluid", "lung"), spec)
        spec.size_mm = round(max(sizes))

    # ---- devices ----------------------------------------------------------------------------------
    if "Medical material" in F:
        if "heart failure" in plan.conditions:
            kind = "pacemaker"
        elif "malignancy" in plan.conditions:
            kind = "port"
        else:
            kind = _choose(rng, ["pacemaker", "port", "sternotomy"], [0.35, 0.35, 0.3])
        _build_device(scene, A, rng, kind)


def _build_device(scene: _Scene, A: _Anatomy, rng: np.random.Generator, kind: str) -> None:
    s, L, hc = A.s, A.L, A.heart_c
    metal = rng.uniform(2600, 3071)
    keep = (_T["metal"],)
    if kind == "sternotomy":
        y_m, y_b, z_top, z_bot = A.sternum
        zs = np.linspace(z_top - 20 * s, z_bot + 12 * s, int(rng.integers(5, 8)))
        spec = scene.spec(_Spec("Medical material", np.array([0.0, y_b, zs.mean()]), round(z_top - z_bot), None, None,
                                None, {"device": "sternotomy wires"}, keep))
        for z in zs:
            yc = y_m if z > z_top - 45 * s else y_b
            th = np.linspace(0, 2 * math.pi, 13)
            loop = np.column_stack([np.cos(th) * 18 * s, yc + np.sin(th) * 9 * s, np.full_like(th, z)])
            for cap in _chain(loop, 0.9):
                scene.add("metal", cap, metal, "metal", None, spec)
            scene.add("metal", _Ellipsoid((0, yc + 9 * s, z), (2.5, 2.5, 2.0)), metal, "metal", None, spec)
        return
    side = _choose(rng, ["left", "right"], [0.8, 0.2] if kind == "pacemaker" else [0.25, 0.75])
    sign = 1 if side == "right" else -1
    zg = A.notch_z - rng.uniform(25, 45) * s
    _, ba, _, cy = (float(v[0]) for v in A.profile(np.array([zg])))
    yg = cy + ba + RIB + A.muscle[0] + max(A.fat[0] * 0.55, 6)
    gen_c = np.array([sign * 0.55 * A.ac0, yg, zg])
    subclavian = [sign * 40 * s, 18 * s, A.notch_z - 4]
    svc = [[26 * s, 10 * s, A.carina_z + 40], [25 * s, 11 * s, hc[2] + 45 * s]]
    if kind == "pacemaker":
        spec = scene.spec(_Spec("Medical material", gen_c, 50.0, side, None, None,
                                {"device": "pacemaker", "leads": ["right atrium", "right ventricle"]}, keep))
        scene.add("metal", _Box(gen_c, (24 * s, 21 * s, 4.2), 3.5, _frame([1.0, 0.0, 0.25])), metal, "metal", None, spec)
        ra = hc + A.heart_rot @ np.array([-0.35 * A.heart_r[0], -0.2 * A.heart_r[1], 0.55 * A.heart_r[2]])
        rv = hc + A.heart_rot @ np.array([0.55 * A.heart_r[0], 0.35 * A.heart_r[1], 0.0])
        for tip in (ra, rv):
            path = _smooth_path([gen_c + (sign * -18 * s, -3, 6), subclavian, svc[0], svc[1], tip], 22)
            for cap in _chain(path, 1.1):
                scene.add("metal", cap, metal * 0.9, "metal", None, spec)
        return
    spec = scene.spec(_Spec("Medical material", gen_c, 28.0, side, None, None,
                            {"device": "port catheter", "tip": "cavoatrial junction"}, keep))
    scene.add("metal", _Ellipsoid(gen_c, (13 * s, 13 * s, 7)), rng.uniform(1400, 2400), "metal", None, spec)
    path = _smooth_path([gen_c, subclavian, svc[0], svc[1]], 18)
    for cap in _chain(path, 1.4):
        scene.add("metal", cap, rng.uniform(700, 1000), "metal", None, spec)


# ==========================================================================================
# Rendering: paint slab by slab, then point-spread blur and correlated noise
# ==========================================================================================
#: Voxels per slab; a demo volume is one slab, a 512x512x300 volume about fourteen.
_SLAB_VOXELS = 6_000_000


def _psf_sigma(spacing: np.ndarray) -> np.ndarray:
    """Blur in voxels: the scanner's ~0.7 mm in-plane / half-slice point spread, at least 0.45 voxel."""
    psf_mm = np.array([0.7, 0.7, max(0.7, 0.5 * float(spacing[2]))])
    return np.sqrt(0.45 ** 2 + (psf_mm / spacing) ** 2)


def _kernel_norm(sigma: float, truncate: float) -> float:
    radius = int(truncate * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    return float(np.sqrt((k ** 2).sum()))


def _render(scene: _Scene, grid: _Grid, seed: int, index: int, noise_hu: float) -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import gaussian_filter

    nx, ny, nz = grid.shape
    for spec in scene.specs:
        bb = grid.voxel_bbox(spec.lo, spec.hi) if np.all(np.isfinite(spec.lo)) else None
        spec.record = _MaskRecord(bb, spec.keep) if bb is not None else None
    ops = scene.ordered()
    boxes = grid.voxel_bboxes(np.clip([op.shape.lo for op in ops], -_BIG, _BIG),
                              np.clip([op.shape.hi for op in ops], -_BIG, _BIG))
    truncate = 2.5   # at half-voxel sigmas the tails beyond 2.5 sigma are invisible and cost a third of the time
    sigma = _psf_sigma(grid.spacing)
    white = noise_hu / float(np.prod([_kernel_norm(sg, truncate) for sg in sigma]))
    halo = int(truncate * sigma[2] + 0.5) + 1
    slab = max(8, _SLAB_VOXELS // (nx * ny))
    xp, yp = grid.patient_coords()
    xw, yw = grid.world_xy()
    hu_out = np.empty(grid.shape, np.int16)
    tissue_out = np.empty(grid.shape, np.uint8)
    for k0 in range(0, nz, slab):
        k1 = min(nz, k0 + slab)
        a, b = (max(0, k0 - halo), min(nz, k1 + halo)) if slab < nz else (0, nz)
        canvas = _Canvas(grid, a, b, xp, yp, xw, yw)
        for op, bb in zip(ops, boxes):
            if bb is None or bb[2][0] >= b or bb[2][1] <= a:
                continue
            canvas.paint(op.shape, op.value, op.tissue, allow=op.allow,
                         record=op.spec.record if op.spec is not None else None, mode=op.mode, bbox=bb)
        hu = canvas.hu
        for k in range(a, b):  # noise seeded per slice: identical whatever the slab size
            rng = np.random.default_rng([seed, index, 0x5EED, k])
            hu[:, :, k - a] += rng.standard_normal((nx, ny), dtype=np.float32) * np.float32(white)
        hu = gaussian_filter(hu, sigma, mode="nearest", truncate=truncate)
        np.clip(hu, -1024, 3071, out=hu)
        hu_out[:, :, k0:k1] = np.rint(hu[:, :, k0 - a:k1 - a])
        tissue_out[:, :, k0:k1] = canvas.tissue[:, :, k0 - a:k1 - a]
    return hu_out, tissue_out


# ==========================================================================================
# One case
# ==========================================================================================
def _streams(seed: int, index: int) -> list[np.random.Generator]:
    """Independent random streams (demographics, plan, anatomy, findings, report), so that changing
    how a report is worded never moves a nodule."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)])
    return [np.random.default_rng(c) for c in ss.spawn(5)]


def _demographics(rng: np.random.Generator) -> tuple[str, int, bool]:
    sex = "M" if rng.random() < 0.52 else "F"
    age = int(np.clip(round(rng.normal(58, 15)), 20, 92))
    contrast = bool(rng.random() < 0.35)
    return sex, age, contrast


def case_plan(seed: int, index: int) -> tuple[str, int, bool, set[str]]:
    """Sex, age, contrast and the finding labels of a case, without painting it (cheap)."""
    r_demo, r_plan, *_ = _streams(seed, index)
    sex, age, contrast = _demographics(r_demo)
    return sex, age, contrast, set(_draw_plan(r_plan, age, sex).findings)


def _check_geometry(shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    try:
        shp = tuple(int(v) for v in shape)
        spc = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise PhantomError(f"Phantom shape {shape!r} and spacing {spacing!r} must be three numbers each.") from None
    if len(shp) != 3 or any(v < 16 or v > 2048 for v in shp):
        raise PhantomError(f"Phantom shape {shp} must be three voxel counts between 16 and 2048.")
    if len(spc) != 3 or any(not math.isfinite(v) or v < 0.2 or v > 10 for v in spc):
        raise PhantomError(f"Phantom spacing {spc} must be three voxel sizes between 0.2 and 10 mm.")
    return shp, spc  # type: ignore[return-value]


#: A finding smaller than this once painted (mm^3; hidden behind another, or cut by the field of
#: view) is not labelled: the labels promise what a reader can see.
_MIN_VISIBLE_MM3 = {"Lung nodule": 90.0, "Arterial wall calcification": 15.0, "Coronary artery wall calcification": 10.0,
                    "Medical material": 20.0, "Lymphadenopathy": 400.0, "Lung opacity": 1500.0, "Consolidation": 3000.0,
                    "Atelectasis": 1200.0, "Pleural effusion": 5000.0, "Pneumothorax": 5000.0, "Pericardial effusion": 5000.0,
                    "Emphysema": 2000.0, "Bronchiectasis": 600.0, "Interlobular septal thickening": 5000.0,
                    "Lung mass": 8000.0, "Cardiomegaly": 1e5, "Hiatal hernia": 8000.0}


def generate_case(seed: int, index: int, shape: tuple[int, int, int] = DEMO_SHAPE,
                  spacing: tuple[float, float, float] = DEMO_SPACING) -> PhantomCase:
    """Build case ``index`` of corpus ``seed``: the same arguments always give the same case."""
    shape, spacing = _check_geometry(shape, spacing)
    r_demo, r_plan, r_anat, r_find, r_text = _streams(seed, index)
    sex, age, contrast = _demographics(r_demo)
    plan = _draw_plan(r_plan, age, sex)
    cardiomegaly = "Cardiomegaly" in plan.findings
    heart_scale = r_plan.uniform(1.3, 1.5) if cardiomegaly else r_plan.uniform(0.9, 1.04)
    gap = r_plan.uniform(7, 18) if "Pericardial effusion" in plan.findings else 2.4
    noise_hu = r_plan.uniform(8, 20)
    A = _Anatomy(r_anat, sex, age, contrast, heart_scale)
    A.pericardial_gap = gap
    fov_z = shape[2] * spacing[2]
    centre_z = max(A.L + r_anat.uniform(8, 35) - fov_z / 2, 0.42 * A.L - 10)
    grid = _Grid(shape, spacing, shift=(r_anat.uniform(-8, 8), 16 + r_anat.uniform(-6, 8), -centre_z),
                 theta=float(np.clip(r_anat.normal(0, 0.035), -0.09, 0.09)))

    # Cardiothoracic ratio: heart width over the inner thoracic width at the heart's level.
    ctr = A.heart_ext[0] / float(A.profile(np.array([A.heart_c[2]]))[0][0])
    scene = _Scene()
    heart_spec = None
    if cardiomegaly:
        sev = "mild" if ctr < 0.57 else "moderate" if ctr < 0.61 else "marked"
        heart_spec = scene.spec(_Spec("Cardiomegaly", A.heart_c.copy(), round(2 * A.heart_ext[0]), None, None, sev,
                                      {}, (_T["myocardium"], _T["blood"])))
    peri_spec = None
    if "Pericardial effusion" in plan.findings:
        sev = "small" if gap < 10 else "moderate" if gap < 15 else "large"
        peri_spec = scene.spec(_Spec("Pericardial effusion", A.heart_c.copy(), round(gap), None, None, sev,
                                     {"thickness_mm": round(gap)}, (_T["fluid"],)))
    bronchi: dict[str, list[_Branch]] = {}
    arteries: dict[str, list[_Branch]] = {}
    _build_anatomy(scene, A, grid, r_anat, gap, heart_spec, peri_spec, bronchi, arteries)
    _build_findings(scene, A, plan, r_find, grid, bronchi, arteries, {})
    hu, tissue = _render(scene, grid, seed, index, noise_hu)

    findings: list[PhantomFinding] = []
    voxel_mm3 = float(np.prod(spacing))
    for spec in scene.specs:
        rec = spec.record
        if rec is None:
            continue
        (x0, x1), (y0, y1), (z0, z1) = rec.bbox
        crop = rec.crop & np.isin(tissue[x0:x1, y0:y1, z0:z1], rec.keep)
        if crop.sum() * voxel_mm3 < _MIN_VISIBLE_MM3.get(spec.name, 100.0):
            continue  # outside the field of view or hidden by another finding: not visible, so not labelled
        if spec.lobe == "left upper lobe" and spec.center[2] < A.horizontal_z():
            spec.detail["lingula"] = True
        if spec.name == "Cardiomegaly":
            spec.detail["ctr"] = round(ctr, 2)
        cv = grid.patient_to_voxel(spec.center)[0]
        cw = grid.patient_to_world(spec.center)[0]
        findings.append(PhantomFinding(
            name=spec.name, center_vox=tuple(int(round(v)) for v in cv), center_mm=tuple(round(float(v), 1) for v in cw),
            size_mm=float(spec.size_mm), side=spec.side, lobe=spec.lobe, severity=spec.severity, detail=spec.detail,
            bbox=rec.bbox, mask_crop=crop, volume_shape=shape))
    labels = {name: 0 for name in PHANTOM_FINDINGS}
    for f in findings:
        labels[f.name] = 1
    case_id = phantom_case_id(seed, index)
    report = write_report(findings, sex=sex, age=age, contrast=contrast, slice_mm=spacing[2],
                          conditions=plan.conditions, rng=r_text, ctr=ctr)
    volume = Volume(hu=hu, spacing=tuple(float(v) for v in spacing), affine=grid.affine.copy(),
                    metadata={"modality": "CT", "synthetic": True, "generator": "medfinder.phantoms",
                              "contrast": contrast, "sex": sex, "age": age},
                    source=case_id)
    return PhantomCase(case_id=case_id, volume=volume, report=report, labels=labels, findings=findings,
                       sex=sex, age=age, contrast=contrast, tissue=tissue)


# ==========================================================================================
# Reports: Technique / Findings / Impression, organ by organ, in varied wording
# ==========================================================================================
#: Ways an absent finding is negated (several phrasings, as radiologists write them).
NEGATIONS: dict[str, tuple[str, ...]] = {
    "Pleural effusion": ("No pleural effusion.", "No pleural effusion or pleural thickening is seen.",
                         "There is no pleural fluid.", "Pleural effusion-thickening is not seen."),
    "Pneumothorax": ("No pneumothorax.", "No pneumothorax is seen.", "There is no pneumothorax."),
    "Lung nodule": ("No pulmonary nodule.", "No suspicious pulmonary nodules are identified.",
                    "There is no nodular lesion in either lung."),
    "Lung mass": ("No lung mass.", "No mass lesion is seen in the lungs.", "There is no pulmonary mass."),
    "Consolidation": ("No consolidation.", "No airspace consolidation.", "There is no focal consolidation."),
    "Lung opacity": ("No ground-glass opacity.", "No infiltrate or ground-glass opacity is seen.",
                     "There are no areas of ground-glass density."),
    "Emphysema": ("No emphysema.", "No emphysematous changes are seen."),
    "Atelectasis": ("No atelectasis.", "No atelectasis or volume loss.", "There is no atelectasis."),
    "Bronchiectasis": ("No bronchiectasis.", "The bronchi are of normal calibre without bronchiectasis."),
    "Interlobular septal thickening": ("No interlobular septal thickening.", "No septal thickening is seen."),
    "Cardiomegaly": ("Heart size is normal.", "The heart is not enlarged.", "No cardiomegaly.",
                     "Cardiac size is within normal limits."),
    "Pericardial effusion": ("No pericardial effusion.", "No pericardial effusion or thickening.",
                             "Pericardial effusion or thickening is not observed."),
    "Lymphadenopathy": ("No enlarged lymph nodes in the mediastinum or hila.", "No mediastinal or hilar lymphadenopathy.",
                        "Mediastinal and hilar lymph nodes are not enlarged by size criteria."),
    "Arterial wall calcification": ("No calcified plaque in the aortic wall.",
                                    "The thoracic aorta is normal in calibre, without wall calcification.",
                                    "No atherosclerotic calcification of the aorta."),
    "Coronary artery wall calcification": ("No coronary artery calcification.", "The coronary arteries show no calcification."),
    "Hiatal hernia": ("No hiatal hernia.", "There is no hiatus hernia."),
    "Medical material": ("No lines, tubes or devices.", "No medical devices are seen."),
}

#: How often an absent finding is negated explicitly (the rest are simply not mentioned).
_NEGATE_P = {"Pleural effusion": 0.85, "Pneumothorax": 0.5, "Lung nodule": 0.6, "Lung mass": 0.3, "Consolidation": 0.5,
             "Lung opacity": 0.35, "Emphysema": 0.35, "Atelectasis": 0.3, "Bronchiectasis": 0.2,
             "Interlobular septal thickening": 0.15, "Cardiomegaly": 0.8, "Pericardial effusion": 0.75,
             "Lymphadenopathy": 0.8, "Arterial wall calcification": 0.4, "Coronary artery wall calcification": 0.35,
             "Hiatal hernia": 0.3, "Medical material": 0.1}

_MEDIASTINUM = ("Cardiomegaly", "Pericardial effusion", "Arterial wall calcification", "Coronary artery wall calcification",
                "Lymphadenopathy", "Hiatal hernia", "Medical material")
_LUNGS = ("Emphysema", "Lung mass", "Lung nodule", "Consolidation", "Lung opacity", "Atelectasis", "Bronchiectasis",
          "Interlobular septal thickening")
_PLEURA = ("Pleural effusion", "Pneumothorax")

_INDICATIONS = {
    "heart failure": ("shortness of breath", "exertional dyspnoea and leg swelling", "orthopnoea"),
    "infection": ("fever and productive cough", "cough and fever for five days", "raised inflammatory markers and cough"),
    "malignancy": ("weight loss and haemoptysis", "unintentional weight loss", "persistent cough and weight loss"),
    "smoker": ("long-term smoker with chronic cough", "smoking history, progressive dyspnoea", "chronic cough"),
    "atherosclerosis": ("atypical chest pain", "hypertension, chest discomfort"),
    None: ("chest pain", "cough", "preoperative assessment", "dyspnoea", "routine evaluation", "palpitations"),
}

_CORONARY_NAMES = {"LAD": "left anterior descending", "LCx": "circumflex", "RCA": "right coronary"}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class _Writer:
    """Sentence choices for one report (its own random stream)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def lobe(self, f: PhantomFinding) -> str:
        if not f.lobe:
            return "lung"
        if f.detail.get("lingula"):
            return self.pick(["lingula of the left lung", "lingular segment of the left upper lobe"])
        side, level = f.lobe.split()[:2]
        if f.lobe in LOBES:
            return self.pick([f.lobe, f"{level} lobe of the {side} lung", f"{side} lung {level} lobe"])
        return f.lobe

    def lobes(self, fs: Sequence[PhantomFinding]) -> str:
        seen: list[str] = []
        for f in fs:
            name = "lingula" if f.detail.get("lingula") else (f.lobe or "lung")
            if name not in seen:
                seen.append(name)
        return _join(seen)

    # ---- present findings ------------------------------------------------------------------
    def present(self, name: str, fs: list[PhantomFinding], ctr: float) -> list[str]:
        p, f = self.pick, fs[0]
        if name == "Lung nodule":
            fs = sorted(fs, key=lambda g: -g.size_mm)
            f = fs[0]
            kind = {"solid": "solid", "ground-glass": p(["ground-glass", "non-solid", "pure ground-glass"]),
                    "part-solid": p(["part-solid", "subsolid"])}[f.detail["type"]]
            size = int(f.size_mm)
            if len(fs) == 1:
                return [p([f"A {size} mm {kind} nodule is seen in the {self.lobe(f)}.",
                           f"There is a {kind} pulmonary nodule measuring {size} mm in the {self.lobe(f)}.",
                           f"{_cap(kind)} nodule, {size} mm in diameter, in the {self.lobe(f)}.",
                           f"In the {self.lobe(f)}, a {size} mm {kind} nodular lesion is noted."])]
            others = _join([f"{int(g.size_mm)} mm in the {self.lobe(g)}" for g in fs[1:]])
            return [p([f"{len(fs)} pulmonary nodules are present; the largest is a {size} mm {kind} nodule in the "
                       f"{self.lobe(f)}, others measure {others}.",
                       f"Multiple lung nodules: {size} mm ({kind}) in the {self.lobe(f)}, and {others}."])]
        if name == "Lung mass":
            a, b = int(f.size_mm), int(f.detail.get("short_mm", f.size_mm * 0.8))
            m = f.detail.get("margin", "lobulated")
            return [p([f"A {a} x {b} mm {m} mass is present in the {self.lobe(f)}.",
                       f"There is a mass lesion measuring {a} x {b} mm in the {self.lobe(f)}, with {m} margins.",
                       f"A {m} soft-tissue mass of {a} x {b} mm occupies the {self.lobe(f)}."])]
        if name == "Pleural effusion":
            by = {g.side: g for g in fs}
            if len(by) == 2:
                r, l_ = by["right"], by["left"]
                return [p([f"Bilateral pleural effusions, {r.severity} on the right ({int(r.size_mm)} mm) and "
                           f"{l_.severity} on the left ({int(l_.size_mm)} mm).",
                           f"There are bilateral pleural effusions measuring {int(r.size_mm)} mm on the right and "
                           f"{int(l_.size_mm)} mm on the left in maximal thickness."])]
            return [p([f"{_cap(f.severity or '')} {f.side} pleural effusion with a maximum thickness of {int(f.size_mm)} mm.",
                       f"There is a {f.severity} pleural effusion on the {f.side}, {int(f.size_mm)} mm thick.",
                       f"{_cap(f.severity or '')} {f.side}-sided pleural effusion, measuring {int(f.size_mm)} mm in depth."])]
        if name == "Pneumothorax":
            return [p([f"{_cap(f.severity or '')} {f.side} pneumothorax, measuring {int(f.size_mm)} mm at its greatest depth.",
                       f"There is a {f.side}-sided pneumothorax ({f.severity}, {int(f.size_mm)} mm).",
                       f"Air in the {f.side} pleural space, up to {int(f.size_mm)} mm deep, consistent with a {f.severity} pneumothorax."])]
        if name == "Consolidation":
            if f.severity == "lobar":
                return [p([f"Lobar consolidation of the {self.lobe(f)} with air bronchograms.",
                           f"There is dense consolidation throughout much of the {self.lobe(f)}, with air bronchograms."])]
            return [p([f"{_cap(f.severity or '')} consolidation with air bronchograms in the {self.lobe(f)}.",
                       f"There is an area of consolidation in the {self.lobe(f)} containing air bronchograms.",
                       f"Airspace consolidation involving the {self.lobe(f)}."])]
        if name == "Lung opacity":
            where = self.lobes(fs)
            if f.severity == "diffuse":
                return [p([f"Diffuse ground-glass opacities in both lungs, most pronounced in the {where}.",
                           f"Widespread areas of ground-glass density, most marked in the {where}."])]
            return [p([f"Patchy ground-glass opacities in the {where}.",
                       f"Areas of ground-glass density are seen in the {where}.",
                       f"Ground-glass opacification in the {where}."])]
        if name == "Emphysema":
            kind, zone = f.detail["type"], f.lobe or "upper lobes"
            sents = [p([f"{_cap(f.severity or '')} {kind} emphysema, predominantly in the {zone}.",
                        f"{_cap(kind)} emphysematous changes are present in the {zone} ({f.severity}).",
                        f"There are {f.severity} {kind} emphysematous areas in both lungs, {zone} predominant."])]
            if f.severity == "severe":
                sents.append(p(["Apical bullae are also present.", "Subpleural bullae are seen at the apices."]))
            return sents
        if name == "Atelectasis":
            out = []
            for g in fs:
                t = g.detail.get("type")
                if t == "passive":
                    out.append(p([f"Passive atelectasis of the adjacent {g.side} lower lobe.",
                                  f"Compressive atelectasis in the {g.side} lower lobe adjacent to the effusion."]))
                elif t == "dependent":
                    out.append(p([f"Dependent atelectasis in the posterior basal {g.side} lower lobe.",
                                  f"Mild posterior basal volume loss (atelectasis) in the {g.side} lower lobe."]))
                else:
                    out.append(p([f"{p(['Linear', 'Plate-like'])} atelectasis in the {self.lobe(g)}.",
                                  f"{_cap(g.severity or 'subsegmental')} atelectasis is seen in the {self.lobe(g)}.",
                                  f"Band-like atelectatic changes in the {self.lobe(g)}."]))
            return out
        if name == "Bronchiectasis":
            kind = f.detail["type"]
            return [p([f"{_cap(kind)} bronchiectasis with bronchial wall thickening in the {self.lobe(f)}.",
                       f"Dilated, thick-walled bronchi in the {self.lobe(f)}, consistent with {kind} bronchiectasis.",
                       f"Bronchiectatic changes ({kind}) are seen in the {self.lobe(f)}."])]
        if name == "Interlobular septal thickening":
            return [p([f"{_cap(f.severity or '')} interlobular septal thickening in both lower lobes, predominantly subpleural.",
                       f"Smooth thickening of the interlobular septa at both lung bases ({f.severity}).",
                       "Thickened interlobular septa are seen bilaterally in the lower zones."])]
        if name == "Cardiomegaly":
            return [p([f"The heart is enlarged (cardiothoracic ratio about {ctr:.2f}).", "Cardiomegaly.",
                       f"Enlarged cardiac silhouette with a cardiothoracic ratio of {ctr:.2f}.",
                       f"Cardiac size is increased ({f.severity} cardiomegaly)."])]
        if name == "Pericardial effusion":
            return [p([f"{_cap(f.severity or '')} pericardial effusion measuring {int(f.size_mm)} mm in thickness.",
                       f"There is a pericardial effusion, up to {int(f.size_mm)} mm thick.",
                       f"Fluid in the pericardial sac (pericardial effusion), {int(f.size_mm)} mm."])]
        if name == "Arterial wall calcification":
            return [p([f"{_cap(f.severity or '')} calcified atherosclerotic plaques in the wall of the thoracic aorta.",
                       f"Atherosclerotic calcifications of the aortic arch and descending aorta ({f.severity}).",
                       f"There is {f.severity} calcification of the aortic wall."])]
        if name == "Coronary artery wall calcification":
            vessels = _join([_CORONARY_NAMES[v] for v in f.detail["vessels"]])
            plural = "arteries" if len(f.detail["vessels"]) > 1 else "artery"
            return [p([f"Calcified plaques in the {vessels} coronary {plural}.",
                       f"Coronary artery calcifications ({f.severity}) involving the {vessels} {plural}.",
                       f"{_cap(f.severity or '')} coronary artery wall calcification in the {vessels} {plural}."])]
        if name == "Lymphadenopathy":
            fs = sorted(fs, key=lambda g: -g.detail["short_axis_mm"])
            big = fs[0]
            stations = _join([g.detail["station"] for g in fs])
            n = "s" if len(fs) > 1 else ""
            return [p([f"Enlarged lymph node{n} at the {stations} station{n}, the largest measuring "
                       f"{big.detail['short_axis_mm']} mm in short axis.",
                       f"Lymphadenopathy: {stations} node{n} up to {big.detail['long_axis_mm']} x "
                       f"{big.detail['short_axis_mm']} mm.",
                       f"Pathologically enlarged {stations} lymph node{n} ({big.detail['short_axis_mm']} mm short axis)."])]
        if name == "Hiatal hernia":
            return [p([f"{_cap(f.severity or '')} hiatal hernia.",
                       f"A {f.severity} sliding hiatus hernia is present ({int(f.size_mm)} mm).",
                       f"Part of the stomach has herniated through the oesophageal hiatus (hiatal hernia), "
                       f"measuring {int(f.size_mm)} mm."])]
        if name == "Medical material":
            dev = f.detail["device"]
            if dev == "pacemaker":
                return [p([f"A {f.side} pectoral pacemaker with leads in the right atrium and right ventricle.",
                           f"Cardiac pacemaker generator in the {f.side} chest wall; its leads end in the right atrium "
                           "and right ventricle.",
                           "Pacemaker device with transvenous leads in the right heart."])]
            if dev == "port catheter":
                return [p([f"A {f.side}-sided venous port catheter with its tip at the cavoatrial junction.",
                           f"Port catheter via the {f.side} subclavian vein, tip at the junction of the superior vena "
                           "cava and right atrium."])]
            return [p(["Median sternotomy wires.", "Sternal cerclage wires from a previous sternotomy.",
                       "Post-sternotomy wire sutures in the sternum."])]
        raise KeyError(name)

    def impression(self, name: str, fs: list[PhantomFinding], ctr: float) -> str:
        p, f = self.pick, fs[0]
        if name == "Lung nodule":
            f = max(fs, key=lambda g: g.size_mm)
            many = "Multiple pulmonary nodules" if len(fs) > 1 else "Pulmonary nodule"
            follow = p([" Follow-up CT is recommended.", " Comparison with prior imaging or follow-up is advised.", ""])
            return f"{many}, the largest {int(f.size_mm)} mm in the {self.lobe(f)}.{follow}"
        if name == "Lung mass":
            return p([f"{int(f.size_mm)} mm mass in the {self.lobe(f)}, suspicious for malignancy; tissue diagnosis is advised.",
                      f"Lung mass in the {self.lobe(f)} ({int(f.size_mm)} mm)."])
        if name == "Pleural effusion":
            sides = {g.side for g in fs}
            return "Bilateral pleural effusions." if len(sides) == 2 else f"{_cap(f.severity or '')} {f.side} pleural effusion."
        if name == "Pneumothorax":
            return f"{_cap(f.side or '')} pneumothorax ({f.severity})."
        if name == "Consolidation":
            return p([f"Consolidation in the {self.lobe(f)}, likely infectious; clinical correlation is recommended.",
                      f"{_cap(self.lobe(f))} consolidation, compatible with pneumonia in the appropriate clinical setting."])
        if name == "Lung opacity":
            return p([f"Ground-glass opacities in the {self.lobes(fs)}.", "Ground-glass opacities, likely inflammatory."])
        if name == "Emphysema":
            return f"{_cap(f.severity or '')} {f.detail['type']} emphysema."
        if name == "Atelectasis":
            return p(["Atelectasis.", f"Atelectatic changes in the {self.lobes(fs)}."])
        if name == "Bronchiectasis":
            return f"Bronchiectasis in the {self.lobe(f)}."
        if name == "Interlobular septal thickening":
            return p(["Interlobular septal thickening, which may reflect interstitial oedema.",
                      "Basal interlobular septal thickening."])
        if name == "Cardiomegaly":
            return p(["Cardiomegaly.", "Enlarged heart.", f"Cardiomegaly (CTR {ctr:.2f})."])
        if name == "Pericardial effusion":
            return f"{_cap(f.severity or '')} pericardial effusion."
        if name == "Arterial wall calcification":
            return p(["Aortic atherosclerosis.", "Calcified atheroma of the thoracic aorta."])
        if name == "Coronary artery wall calcification":
            return p(["Coronary artery calcification.", "Coronary atherosclerotic calcification."])
        if name == "Lymphadenopathy":
            return p(["Mediastinal lymphadenopathy.", "Enlarged mediastinal/hilar lymph nodes."]) if any(
                "axillary" not in g.detail["station"] for g in fs) else "Axillary lymphadenopathy."
        if name == "Hiatal hernia":
            return f"{_cap(f.severity or '')} hiatal hernia."
        if name == "Medical material":
            return {"pacemaker": "Pacemaker in place.", "port catheter": "Port catheter in satisfactory position."}.get(
                f.detail["device"], "Median sternotomy.")
        raise KeyError(name)


_IMPRESSION_ORDER = ("Lung mass", "Consolidation", "Pneumothorax", "Pleural effusion", "Cardiomegaly",
                     "Pericardial effusion", "Lung nodule", "Lymphadenopathy", "Lung opacity", "Interlobular septal thickening",
                     "Emphysema", "Bronchiectasis", "Atelectasis", "Hiatal hernia", "Arterial wall calcification",
                     "Coronary artery wall calcification", "Medical material")


def write_report(findings: Sequence[PhantomFinding], *, sex: str, age: int, contrast: bool, slice_mm: float,
                 conditions: Iterable[str], rng: np.random.Generator, ctr: float) -> str:
    """A chest CT report stating every finding (size, side, lobe) and negating a sample of the others."""
    w = _Writer(rng)
    p = w.pick
    by: dict[str, list[PhantomFinding]] = {}
    for f in findings:
        by.setdefault(f.name, []).append(f)
    conds = [c for c in ("heart failure", "infection", "malignancy", "smoker", "atherosclerosis") if c in set(conditions)]
    indication = p(_INDICATIONS[conds[0] if conds and rng.random() < 0.8 else None])
    person = {"M": p(["man", "male"]), "F": p(["woman", "female"])}[sex]
    thick = f"{slice_mm:g}"
    technique = p([
        f"{'Contrast-enhanced' if contrast else 'Non-contrast'} CT of the chest from the thoracic inlet to the upper "
        f"abdomen, reconstructed at {thick} mm.",
        f"Axial {thick} mm sections of the thorax were obtained {'after intravenous contrast' if contrast else 'without intravenous contrast'}.",
        f"Thoracic CT {'with' if contrast else 'without'} IV contrast; {thick} mm axial reconstructions with coronal reformats.",
    ])

    def negate(name: str) -> str | None:
        if name in by or rng.random() >= _NEGATE_P[name]:
            return None
        return p(NEGATIONS[name])

    def group(names: Sequence[str]) -> list[str]:
        out: list[str] = []
        for name in names:
            if name in by:
                out.extend(w.present(name, by[name], ctr))
            else:
                neg = negate(name)
                if neg:
                    out.append(neg)
        return out

    airway = p(["The trachea and both main bronchi are patent.", "The trachea and main bronchi are of normal calibre and patent.",
                "Central airways are patent."])
    media = [airway]
    heart_and_vessels = group(_MEDIASTINUM)
    if "Arterial wall calcification" not in by and not any("aorta" in t for t in heart_and_vessels):
        media.append(p(["The thoracic aorta is of normal calibre.", "Normal calibre of the thoracic aorta and main pulmonary artery."]))
    media += heart_and_vessels
    if "Hiatal hernia" not in by:
        media.append(p(["The oesophagus is unremarkable.", "Thoracic oesophagus of normal calibre without wall thickening."]))
    headings = rng.random() < 0.5
    lung = [p(["Lung parenchyma:", "In the lung window:"])] if not headings and rng.random() < 0.4 else []
    lung_sents = group(_LUNGS)
    if not any(n in by for n in _LUNGS):
        lung_sents.insert(0, p(["Both lungs are clear and well aerated.", "Normal aeration of both lungs.",
                                "The lung parenchyma is unremarkable."]))
    lung += lung_sents
    pleura = group(_PLEURA)
    abdomen = p(["The visualised upper abdominal organs are unremarkable.", "No abnormality in the included upper abdomen.",
                 "The imaged liver, spleen and adrenal glands are normal."])
    bones = p(["Degenerative changes of the thoracic spine.", "Mild spondylotic changes of the thoracic spine; no destructive bone lesion."]) \
        if age >= 55 else p(["No destructive bone lesion.", "The osseous structures are intact."])

    paragraphs = [("Mediastinum and heart", media), ("Lungs", lung), ("Pleura", pleura),
                  ("Upper abdomen", [abdomen]), ("Bones and soft tissues", [bones])]
    findings_text = "\n".join((f"{h}: " if headings else "") + " ".join(sents) for h, sents in paragraphs if sents)
    present = [n for n in _IMPRESSION_ORDER if n in by]
    if present:
        impression = "\n".join(f"{i + 1}. {w.impression(n, by[n], ctr)}" for i, n in enumerate(present))
    else:
        impression = p(["No acute cardiopulmonary abnormality.", "Normal CT of the chest.",
                        "Thoracic CT within normal limits."])
    head = p(["CLINICAL INFORMATION", "Indication", "History"])
    return (f"{head}: {age}-year-old {person}, {indication}.\n"
            f"TECHNIQUE: {technique}\n"
            f"{p(['COMPARISON: None.', 'Comparison: none available.', ''])}\n"
            f"FINDINGS:\n{findings_text}\n"
            f"IMPRESSION:\n{impression}").replace("\n\n", "\n")


# ==========================================================================================
# A corpus on disk: NIfTI volumes and a manifest, written in parallel
# ==========================================================================================
#: The image column of a manifest whose phantoms were not written to disk (``medfinder.recipe``):
#: ``phantom:SEED:INDEX``, painted again when it is loaded (``phantom_volume``).
PHANTOM_SCHEME = "phantom"


def phantom_case_id(seed: int, index: int) -> str:
    """Case ``index`` of corpus ``seed``'s id; it also decides the case's split (``split_of``)."""
    return f"phantom-{seed}-{index:05d}"


def phantom_path(seed: int, index: int) -> Path:
    """The stand-in image path of phantom ``index`` of corpus ``seed`` (see ``phantom_volume``)."""
    return Path(f"{PHANTOM_SCHEME}:{seed}:{index}")


def _phantom_address(path: str | Path) -> tuple[int, int] | None:
    # read_manifest puts the manifest's folder in front, so only the last part counts
    parts = Path(path).name.split(":")
    if len(parts) != 3 or parts[0] != PHANTOM_SCHEME:
        return None
    try:
        seed, index = int(parts[1]), int(parts[2])
    except ValueError:
        return None
    return (seed, index) if seed >= 0 and index >= 0 else None


def is_phantom_path(path: str | Path) -> bool:
    """Whether ``path`` names a phantom (``phantom:SEED:INDEX``, possibly behind a folder)."""
    return _phantom_address(path) is not None


def phantom_volume(path: str | Path) -> Volume:
    """The volume a ``phantom_path`` stands for, painted again: the same case, voxel for voxel."""
    address = _phantom_address(path)
    if address is None:
        raise PhantomError(f"{path} is not a phantom path ({PHANTOM_SCHEME}:SEED:INDEX).")
    return generate_case(*address).volume


def manifest_columns() -> list[str]:
    return [*MANIFEST_HEAD, *PHANTOM_FINDINGS, *MANIFEST_TAIL]


def _write_one(task: tuple[int, int, tuple[int, int, int], tuple[float, float, float], str, int]) -> list[str]:
    import nibabel as nib

    seed, index, shape, spacing, images, compresslevel = task
    case = generate_case(seed, index, shape, spacing)
    name = f"{case.case_id}.nii.gz"
    img = nib.Nifti1Image(case.volume.hu, case.volume.affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"medfinder synthetic chest CT"
    path = Path(images) / name
    tmp = path.with_name(f".{name}.part")
    with open(tmp, "wb") as fh:
        import gzip

        with gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=compresslevel, mtime=0) as gz:
            gz.write(img.to_bytes())
    os.replace(tmp, path)
    return case.manifest_row(f"images/{name}")


def write_corpus(n: int, seed: int, out: Path, shape: tuple[int, int, int] = DEMO_SHAPE,
                 spacing: tuple[float, float, float] = DEMO_SPACING, workers: int = 2,
                 compresslevel: int = 1, progress: bool = True) -> Path:
    """Write ``n`` cases of corpus ``seed`` under ``out`` and return the manifest path.

    Images go to ``out/images/<case_id>.nii.gz`` (int16 HU, the Volume's RAS affine) and
    ``out/manifest.csv`` lists ``case_id,image,report``, one 0/1 column per finding label in
    ``PHANTOM_FINDINGS`` order, then ``sex,age``. Every case depends only on (seed, index), so
    the output is the same whatever the number of workers.
    """
    from tqdm import tqdm

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PhantomError(f"The number of phantom cases must be a positive whole number, not {n!r}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PhantomError(f"The number of workers must be a positive whole number, not {workers!r}.")
    shape, spacing = _check_geometry(shape, spacing)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PhantomError(f"Output folder {out} exists and is not a folder.")
    images = out / "images"
    try:
        images.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PhantomError(f"Output folder {out} cannot be created ({exc.strerror}).") from None
    tasks = [(int(seed), i, shape, spacing, str(images), int(compresslevel)) for i in range(n)]
    rows: list[list[str]] = []
    bar = tqdm(total=n, desc="phantoms", unit="case", disable=not progress)
    if workers == 1 or n == 1:
        for task in tasks:
            rows.append(_write_one(task))
            bar.update()
    else:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=min(workers, n), mp_context=ctx) as pool:
            for row in pool.map(_write_one, tasks, chunksize=1):
                rows.append(row)
                bar.update()
    bar.close()
    return write_manifest(out / "manifest.csv", rows)


def write_manifest(manifest: Path, rows: Sequence[Sequence[str]]) -> Path:
    """Write ``PhantomCase.manifest_row`` rows under ``manifest_columns()``, replacing ``manifest`` whole."""
    tmp = manifest.with_name(f".{manifest.name}.part")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(manifest_columns())
        writer.writerows(rows)
    os.replace(tmp, manifest)
    return manifest


# ==========================================================================================
# Example renders for the README (made with medfinder.viewer)
# ==========================================================================================
def _find_cases(seed: int, want: set[str], avoid: frozenset[str] = frozenset(), normal: bool = False,
                contrast: bool | None = None) -> Iterable[int]:
    for index in range(5000):
        sex, age, con, labels = case_plan(seed, index)
        if contrast is not None and con != contrast:
            continue
        if (normal and not labels) or (not normal and want <= labels and not (labels & avoid)):
            yield index


def _example(seed: int, want: set[str], ok: Callable[[PhantomCase], bool], **kw: Any) -> PhantomCase:
    for index in _find_cases(seed, want, **kw):
        case = generate_case(seed, index)
        if ok(case):
            return case
    raise PhantomError(f"No phantom case of seed {seed} shows {sorted(want)} clearly enough for an example.")


def _largest(case: PhantomCase, name: str) -> PhantomFinding | None:
    found = [f for f in case.findings if f.name == name]
    return max(found, key=lambda f: f.voxel_count) if found else None


def render_examples(out_dir: Path, seed: int = 2024) -> list[Path]:
    """Four example slices (axial/coronal, lung/mediastinal window, with and without findings)."""
    from .viewer import WINDOW_PRESETS, render_slice

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lung_w, lung_l = WINDOW_PRESETS["lung"]
    med_w, med_l = WINDOW_PRESETS["mediastinum"]

    def save(case: PhantomCase, plane: str, index: int, window: tuple[float, float], name: str) -> Path:
        path = out_dir / name
        render_slice(case.volume, plane, int(index), window[0], window[1]).save(path)
        return path

    normal = _example(seed, set(), lambda c: True, normal=True)
    heart_z = int(np.argmax(np.isin(normal.tissue, [_T["myocardium"]]).sum(axis=(0, 1))))
    made = [save(normal, "axial", heart_z + 6, (lung_w, lung_l), "phantom_lung_normal.png")]

    def big_nodule(c: PhantomCase) -> bool:
        f = _largest(c, "Lung nodule")
        return f is not None and f.size_mm >= 12 and f.detail.get("type") == "solid"

    sick = _example(seed, {"Lung nodule", "Emphysema"}, big_nodule, avoid=frozenset({"Pleural effusion"}))
    made.append(save(sick, "axial", sick_z := _largest(sick, "Lung nodule").center_vox[2], (lung_w, lung_l),
                     "phantom_lung_findings.png"))
    del sick_z

    def heart_and_fluid(c: PhantomCase) -> bool:
        return _largest(c, "Pleural effusion") is not None and _largest(c, "Cardiomegaly") is not None

    heart = _example(seed, {"Cardiomegaly", "Pleural effusion"}, heart_and_fluid, contrast=True)
    fluid = sum(f.mask() for f in heart.findings if f.name == "Pleural effusion").sum(axis=(0, 1))
    cardio = _largest(heart, "Cardiomegaly").mask().sum(axis=(0, 1))
    made.append(save(heart, "axial", int(np.argmax(fluid * (cardio > 0.7 * cardio.max()))), (med_w, med_l),
                     "phantom_mediastinum_axial.png"))

    def posterior_mass(c: PhantomCase) -> bool:
        f = _largest(c, "Lung mass")
        return f is not None and f.center_vox[1] < 0.5 * c.volume.hu.shape[1]

    mass = _example(seed, {"Lung mass", "Pleural effusion"}, posterior_mass)
    made.append(save(mass, "coronal", _largest(mass, "Lung mass").center_vox[1], (lung_w, lung_l),
                     "phantom_coronal_findings.png"))
    return made


# ==========================================================================================
# Command line
# ==========================================================================================
def main(argv: Sequence[str] | None = None) -> int:
    parser = CliParser(prog="python -m medfinder.phantoms",
                       description="Write synthetic chest CT cases with reports and labels.")
    parser.add_argument("--n", type=int, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (same seed, same cases)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=list(DEMO_SHAPE))
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=list(DEMO_SPACING))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--render", type=Path, metavar="DIR", help="write the four example PNGs to DIR instead")
    args = parser.parse_args(argv)

    def run() -> int:
        if args.render is not None:
            for path in render_examples(args.render):
                print(path)
            return 0
        if args.n is None or args.out is None:
            parser.error("--n and --out are required (or --render DIR)")
        print(write_corpus(args.n, args.seed, args.out, tuple(args.shape), tuple(args.spacing), args.workers))
        return 0

    return run_guarded(run)


if __name__ == "__main__":
    raise SystemExit(main())
