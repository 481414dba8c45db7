"""Rendering: paint slab by slab, then point-spread blur and correlated noise.

Slabs overlap by the blur's reach and noise is seeded per slice, so the slab size changes the
memory a volume needs and never the volume.
"""

from __future__ import annotations

import numpy as np

from .geometry import BIG
from .grid import Canvas, Grid, MaskRecord
from .scene import Scene

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


def render(scene: Scene, grid: Grid, seed: int, index: int, noise_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``scene`` on ``grid``: int16 HU and uint8 tissue codes; each spec gets its mask record."""
    from scipy.ndimage import gaussian_filter

    nx, ny, nz = grid.shape
    for spec in scene.specs:
        bb = grid.voxel_bbox(spec.lo, spec.hi) if np.all(np.isfinite(spec.lo)) else None
        spec.record = MaskRecord(bb, spec.keep) if bb is not None else None
    ops = scene.ordered()
    boxes = grid.voxel_bboxes(np.clip([op.shape.lo for op in ops], -BIG, BIG),
                              np.clip([op.shape.hi for op in ops], -BIG, BIG))
    truncate = 2.5   # at half-voxel sigmas the tails beyond 2.5 sigma are invisible and cost a third of the time
    sigma = _psf_sigma(grid.spacing)
    white = noise_hu / float(np.prod([_kernel_norm(sg, truncate) for sg in sigma]))
    halo = int(truncate * sigma[2] + 0.5) + 1
    slab = max(8, _SLAB_VOXELS // (nx * ny))
    xp, yp = grid.patient_coords()
    hu_out = np.empty(grid.shape, np.int16)
    tissue_out = np.empty(grid.shape, np.uint8)
    for k0 in range(0, nz, slab):
        k1 = min(nz, k0 + slab)
        a, b = (max(0, k0 - halo), min(nz, k1 + halo)) if slab < nz else (0, nz)
        canvas = Canvas(grid, a, b, xp, yp)
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
