"""What some findings look like on CT: where in a scan a finding its report names can lie, from the
scan's own Hounsfield units and shapes, with no model.

The image evidence map (``evidence.evidence_map``) follows what the model looked at. For findings too
small for the model's input to keep (a calcified coronary, a 6 mm nodule, a sternotomy wire), the
scan itself says more, because their appearance is fixed by physics and anatomy:

- **calcium** (arterial wall and coronary calcification): small dense spots, 130 HU (Agatston's
  threshold) above the blood pool (the heart chambers' own HU: a contrast-filled lumen passes 130 HU
  too) and 150 HU brighter than what surrounds them (a white top-hat), in the mediastinum and at least
  ``CHEST_WALL_MM`` from the skin (so not the sternum, a costal cartilage or a rib). Each spot is scored
  as Agatston scores a lesion: its size times a density factor of 1 to 4, of its peak above the blood
  pool. Coronary calcium is looked for in the heart's part of the mediastinum (anterior, below the
  lungs' mid height), arterial calcium in the rest (the arch, the descending aorta).
- **heart** (cardiomegaly, pericardial effusion): a finding of the whole heart is shown at its centre,
  the deepest point of the soft tissue in the heart's part of the mediastinum.
- **metal** (medical material): the densest voxels of the scan; metal outshines bone even where a
  thin wire is averaged with what surrounds it.
- **node** (lymphadenopathy): an ovoid of soft tissue in the mediastinum's fat, the same filter on the
  scan seen through a soft-tissue window (fat, contrast-filled vessels and air stay dark).
- **nodule** and **mass**: bright blobs in the lungs, where a vessel is a tube: the Hessian "dot"
  filter (Li, Sone and Doi, Med. Phys. 2003) at a nodule's or a mass's scale.

``appearance_map`` gives a map over the scan's voxels (0 where the finding cannot be) for a finding
with a known appearance, restricted to the side its report gives when anything there looks like it,
and None for the others. A lobe is not narrowed to a third of the lungs' height, as the model's
evidence is: an upper-lobe nodule often lies at mid height. Measured against the phantoms' boxes by
``benchmarks/evidence.py``. It points the eye; it is not a detector, and it never says that a finding
is present.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .evidence import Chest, fill_each_slice, level_band, side_half
from .io.volume import Volume

__all__ = ["APPEARANCES", "appearance_map"]

#: Finding (canonical name) -> how it looks.
APPEARANCES = {
    "Arterial wall calcification": "arterial calcium",
    "Coronary artery wall calcification": "coronary calcium",
    "Medical material": "metal",
    "Lung nodule": "nodule",
    "Lung mass": "mass",
    "Lymphadenopathy": "node",
    "Cardiomegaly": "heart",
    "Pericardial effusion": "heart",
}
#: Agatston's calcium threshold (HU), and the peak densities of his 1 to 4 density factors.
CALCIUM_HU = 130.0
AGATSTON_STEPS = (130.0, 200.0, 300.0, 400.0)
#: A plaque is narrower than twice this (mm), and brighter than what is around it by this much (HU).
PLAQUE_MM = 5.0
PLAQUE_CONTRAST_HU = 150.0
#: A calcified plaque is small; a dense part larger than this is bone.
CALCIUM_MAX_MM3 = 1000.0
#: How deep the heart and the great vessels lie at least: the sternum, costal cartilages and ribs
#: are closer to the skin.
CHEST_WALL_MM = 40.0
#: Gaussian scales (mm) of the blob filter: a nodule is up to 3 cm, a mass larger.
BLOB_SCALES_MM = {"nodule": (2.0, 3.0), "mass": (6.0, 9.0)}
#: A lymph node: soft tissue (HU, centre and spread of the window it is seen through), among fat,
#: contrast-filled vessels and air that the window leaves dark, and its scales (mm).
NODE_HU = (45.0, 45.0)
NODE_SCALES_MM = (4.0, 6.0)
#: A blob's centre is solid: denser than aerated or ground-glass lung.
SOLID_HU = -300.0


def appearance_map(finding: str, volume: Volume, chest: Chest, side: str | None = None) -> np.ndarray | None:
    """A map over ``volume``'s voxels of where ``finding`` can lie (higher is likelier, 0 where it cannot),
    or None when its appearance is not known here.

    Args:
        finding: the finding's canonical name.
        volume: the case's scan.
        chest: its body and lungs (``Chest.of(volume)``), shared by all the report's findings.
        side: "right" or "left" when the report gives one.
    """
    kind = APPEARANCES.get(finding)
    if kind is None:
        return None
    if kind.endswith("calcium"):
        heat = _calcium(volume, chest, coronary=kind == "coronary calcium")
    elif kind == "node":
        heat = _nodes(volume, chest)
    elif kind == "heart":
        heat = _heart(volume, chest)
    elif kind == "metal":
        heat = np.where(chest.body, np.clip(volume.hu.astype(np.float32) - CALCIUM_HU, 0, None), 0.0)
    else:
        heat = _blobs(volume, fill_each_slice(chest.lungs), BLOB_SCALES_MM[kind])
    if side not in ("right", "left"):
        return heat
    placed = np.where(side_half(chest, side), heat, 0.0)
    # A report's side narrows the search; where nothing there looks like the finding, the side is
    # likelier misread than the finding absent.
    return placed if placed.max() > 0 else heat


def _calcium(volume: Volume, chest: Chest, coronary: bool) -> np.ndarray:
    """Each calcified spot's Agatston-style score at its densest voxel, in the heart's part of the
    mediastinum (``coronary``) or the rest of it; the whole mediastinum when that part has none."""
    hu = volume.hu.astype(np.float32)
    # A plaque stands out from what is around it, even from a lumen bright with contrast, whose own
    # voxels pass 130 HU and would join the plaques into one vessel-sized part; bone is wider than the
    # opening's window and stays.
    reach = [2 * max(1, round(PLAQUE_MM / s)) + 1 for s in volume.spacing]
    brighter = hu - ndimage.grey_opening(hu, size=reach)
    # On a contrast scan the blood itself passes 130 HU: a plaque is measured from the blood pool.
    blood = max(0.0, _blood_pool_hu(volume, chest))
    threshold = blood + CALCIUM_HU
    spots, count = ndimage.label((hu >= threshold) & (brighter >= PLAQUE_CONTRAST_HU))
    out = np.zeros(hu.shape, dtype=np.float32)
    if not count:
        return out
    index = np.arange(1, count + 1)
    voxel_mm3 = float(np.prod(volume.spacing))
    size_mm3 = ndimage.sum_labels(np.ones(hu.shape, dtype=np.float32), spots, index) * voxel_mm3
    peaks = ndimage.maximum_position(hu, spots, index)
    peak_hu = ndimage.maximum(hu, spots, index)
    depth = ndimage.distance_transform_edt(chest.body, sampling=volume.spacing)
    mediastinum = chest.mediastinum & (depth >= CHEST_WALL_MM) & level_band(chest, "all")
    heart = _heart_part(chest)
    kept = [(tuple(p), s * np.searchsorted(AGATSTON_STEPS, h - blood, side="right"))
            for p, s, h in zip(peaks, size_mm3, peak_hu) if s <= CALCIUM_MAX_MM3 and mediastinum[tuple(p)]]
    preferred = [(p, score) for p, score in kept if heart[p] == coronary]
    for p, score in preferred or kept:
        out[p] = score
    return out


def _nodes(volume: Volume, chest: Chest) -> np.ndarray:
    """The dot filter's strongest response, at ``NODE_SCALES_MM``, on the scan seen through a soft-tissue
    window, at the mediastinum's soft-tissue voxels: a node is an ovoid among fat; a vessel is a tube and
    the heart far larger."""
    hu = volume.hu.astype(np.float32)
    centre, spread = NODE_HU
    soft = np.exp(-0.5 * ((np.clip(hu, -200, 400) - centre) / spread) ** 2).astype(np.float32)
    return _strongest_dot(soft, volume.spacing, chest.mediastinum & (hu > 0) & (hu < 120), NODE_SCALES_MM)


def _blood_pool_hu(volume: Volume, chest: Chest) -> float:
    """The heart chambers' median HU (the deeper half of the heart's soft tissue): about 40 without
    contrast, 150 to 400 with it; -inf when the scan shows no heart."""
    depth = _heart(volume, chest)
    if not depth.any():
        return -np.inf
    return float(np.median(volume.hu[depth >= depth.max() / 2]))


def _heart(volume: Volume, chest: Chest) -> np.ndarray:
    """Depth inside the soft tissue of the heart's part of the mediastinum: deepest at the heart's
    centre, where a finding of the whole heart (its size, fluid around it) is best shown."""
    soft = chest.mediastinum & _heart_part(chest) & (volume.hu > -50) & (volume.hu < 300)
    if not soft.any():
        return np.zeros(volume.shape, dtype=np.float32)
    return ndimage.distance_transform_edt(soft, sampling=volume.spacing).astype(np.float32)


def _heart_part(chest: Chest) -> np.ndarray:
    """The heart's part of the chest: anterior to the body's middle front to back, below the lungs' mid
    height (RAS+: the array's second axis runs to the front, the third up)."""
    shape = chest.body.shape
    ys = np.nonzero(chest.body.any(axis=(0, 2)))[0]
    zs = np.nonzero(chest.lungs.any(axis=(0, 1)))[0]
    if not ys.size or not zs.size:
        return np.zeros(shape, dtype=bool)
    front = np.arange(shape[1]) > (ys.min() + ys.max()) / 2
    low = np.arange(shape[2]) < (zs.min() + zs.max()) / 2
    return front[None, :, None] & low[None, None, :] & np.ones(shape, dtype=bool)


def _blobs(volume: Volume, lungs: np.ndarray, scales_mm: tuple[float, ...]) -> np.ndarray:
    """The dot filter's strongest response over ``scales_mm``, at solid voxels of ``lungs``."""
    hu = np.clip(volume.hu, -1000, 100).astype(np.float32)  # brighter than tissue is not rounder
    return _strongest_dot(hu, volume.spacing, lungs & (volume.hu > SOLID_HU), scales_mm, around=lungs)


def _strongest_dot(image: np.ndarray, spacing: tuple[float, ...], inside: np.ndarray,
                   scales_mm: tuple[float, ...], around: np.ndarray | None = None) -> np.ndarray:
    """The dot filter's strongest response over ``scales_mm`` at the ``inside`` voxels, 0 elsewhere.

    Only the bounding box of ``around`` (default ``inside``), grown by the largest kernel, is filtered:
    the lungs are a third of the scan.
    """
    out = np.zeros(image.shape, dtype=np.float32)
    if not inside.any():
        return out
    reach = [int(np.ceil(3 * max(scales_mm) / s)) for s in spacing]
    where = np.nonzero(inside if around is None else around)
    box = tuple(slice(max(0, int(w.min()) - r), int(w.max()) + r + 1) for w, r in zip(where, reach))
    best = np.zeros(int(inside[box].sum()), dtype=np.float32)
    for sigma_mm in scales_mm:
        best = np.maximum(best, _dot(image[box], spacing, sigma_mm, inside[box]))
    out[box][inside[box]] = best
    return out


def _dot(hu: np.ndarray, spacing: tuple[float, ...], sigma_mm: float, inside: np.ndarray) -> np.ndarray:
    """Li's dot enhancement at one scale, at the ``inside`` voxels: lambda_small^2 / |lambda_large| where
    all three Hessian eigenvalues are negative (bright in every direction), scale-normalised."""
    sigma = [sigma_mm / s for s in spacing]
    hessian = np.empty((int(inside.sum()), 3, 3), dtype=np.float32)
    for a in range(3):
        for b in range(a, 3):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            second = ndimage.gaussian_filter(hu, sigma, order=order)[inside]
            hessian[:, a, b] = hessian[:, b, a] = second * sigma_mm ** 2 / (spacing[a] * spacing[b])
    eigen = np.linalg.eigvalsh(hessian)  # ascending: the most negative first
    large, small = eigen[:, 0], eigen[:, 2]
    return np.where(small < 0, small ** 2 / np.maximum(-large, 1e-6), 0.0).astype(np.float32)

