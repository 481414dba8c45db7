"""Shapes with an approximate signed distance (< 0 inside) in the patient frame, in mm.

Painting needs only a bounding box and a signed distance per shape: the distance gives the soft
partial-volume edge, the box keeps each shape's work to the voxels it can reach. Anatomy and
findings are all built from these few primitives and implicit regions.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np


class Shape:
    """Something paintable: a patient-frame bounding box and a signed distance (< 0 inside)."""

    lo: np.ndarray
    hi: np.ndarray
    amp: float = 1.0  # < 1 for structures thinner than a voxel: their partial volume is smaller

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _OrientedShape(Shape):
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


class Capsule(Shape):
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


class Ellipsoid(_OrientedShape):
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


class Box(_OrientedShape):
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


class Region(Shape):
    """Any implicit region: a signed-distance function and the box it lives in."""

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                 lo: Sequence[float], hi: Sequence[float]):
        self.fn = fn
        self.lo, self.hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.fn(x, y, z)


class _Layer(Shape):
    """A shape offset inwards from a shared distance field: skin then fat reuse one body outline."""

    def __init__(self, base: Shape, inset: float, memo: dict[str, Any]):
        self.base, self.inset, self.memo = base, float(inset), memo
        self.lo, self.hi = base.lo, base.hi

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        key = (x.__array_interface__["data"][0], x.shape, y.__array_interface__["data"][0], z.shape,
               float(z.flat[0]), float(z.flat[-1]))
        if self.memo.get("key") != key:
            self.memo["key"], self.memo["sd"] = key, self.base.sd(x, y, z)
        return self.memo["sd"] + np.float32(self.inset) if self.inset else self.memo["sd"]


def layers(base: Shape, *insets: float) -> list[_Layer]:
    memo: dict[str, Any] = {}
    return [_Layer(base, i, memo) for i in insets]


def chain(points: np.ndarray, radii: Sequence[float] | float) -> list[Capsule]:
    """Capsules along a polyline (radius per point, or one radius)."""
    pts = np.asarray(points, np.float64)
    rr = np.broadcast_to(np.asarray(radii, np.float64), (len(pts),))
    return [Capsule(pts[i], pts[i + 1], rr[i], rr[i + 1]) for i in range(len(pts) - 1)]


def smooth_path(anchors: Sequence[Sequence[float]], n: int) -> np.ndarray:
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


def frame(axis: Sequence[float]) -> np.ndarray:
    """An orthonormal frame whose first column is ``axis``."""
    u = np.asarray(axis, np.float64)
    u = u / np.linalg.norm(u)
    helper = np.array([0.0, 0.0, 1.0]) if abs(u[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    v = np.cross(helper, u)
    v /= np.linalg.norm(v)
    w = np.cross(u, v)
    return np.column_stack([u, v, w])


#: A region box this large means "no bound": the grid clips every box to the scan.
BIG = 1e4


def region(fn: Callable[..., np.ndarray], lo: Sequence[float] = (-BIG,) * 3,
           hi: Sequence[float] = (BIG,) * 3) -> Region:
    """An implicit region; without a box it may reach anywhere."""
    return Region(fn, lo, hi)
