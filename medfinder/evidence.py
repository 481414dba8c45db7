"""Evidence: where in a case's scan the match with a query lies, in the scan's world coordinates.

For every result of a search, the locations that best support it:

- **image evidence**: a map over the case's preprocessed scan of how much each place drives the
  match score (the cosine between the query's vector and the scan's), computed with the same model
  that ranked it. ``METHODS`` are measured against each other and against two baselines (the scan's
  centre, a random point in the body) on the phantoms' ground truth by ``benchmarks/evidence.py``;
  ``gradient`` (gradient x input) is the default because it won there (docs/evaluation.md).
  For a text query the target is the query's text vector in the joint space (an aligned model);
  for a CT query it is the query scan's own vector.
- **report evidence**: where the case's report names a queried finding with a side ("right pleural
  effusion"), a level ("lower lobe") or the mediastinum, the best image evidence for that finding
  inside that part of the chest (the scan's own lung and body masks), labelled with the finding;
  without an aligned model, the centre of that part. A finding whose look on CT is known (calcium,
  metal, the heart, a nodule: ``appearance.py``) is pointed at where the scan looks like it instead.

Points are world RAS+ millimetres of the case's image (its affine), so a viewer or a PACS can go
there. Evidence is computed only when asked (``Searcher.search(..., evidence=True)``, the app's
selected case), one forward and one backward pass per case.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .io.volume import Volume
from .transforms.preprocess import Preprocessor

#: How an image evidence map is made: "gradient" (gradient x input of the match score, smoothed),
#: "gradcam" (Grad-CAM on the tower's last feature map), "features" (cosine of the target with each
#: location of the last feature map: towers whose vector is a pooled map, as the real-CT tower's is).
METHODS = ("gradient", "gradcam", "features")
DEFAULT_METHOD = "gradient"
#: Evidence points kept per case, best first, and how far apart two image points must be (mm).
MAX_POINTS = 3
MIN_SEPARATION_MM = 40.0
#: A voxel of the model's input is inside the body when its first (lung-window) channel is above
#: this: air outside the patient is at 0, lung (-850 HU) at about 0.1 in the [-1000, 200] window.
BODY_LEVEL = 0.05


@dataclass(frozen=True)
class Evidence:
    """One place in a case's scan that supports the match, in world RAS+ mm.

    Args:
        ras_mm: the point (x, y, z) in the case image's world coordinates, RAS+, millimetres.
        score: how strongly it supports the match, relative to the case's best point (1.0).
        source: "image" (the model's evidence map) or "report" (a finding the report locates).
        finding: the finding's canonical name for report evidence, else None.
    """

    ras_mm: tuple[float, float, float]
    score: float
    source: str
    finding: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ras_mm": [round(v, 1) for v in self.ras_mm], "score": round(self.score, 4),
                "source": self.source, "finding": self.finding}


@dataclass
class PreparedScan:
    """A case's scan as the model sees it, with the affine from model-input voxels to world mm."""

    volume: Volume
    tensor: torch.Tensor  # (C, x, y, z)
    affine: np.ndarray  # 4x4, input voxel -> world RAS+ mm

    @classmethod
    def of(cls, volume: Volume, preprocessor: Preprocessor) -> "PreparedScan":
        tensor, affine = preprocessor.with_affine(volume)
        return cls(volume=volume, tensor=tensor, affine=affine)

    def world(self, voxel: Sequence[float]) -> tuple[float, float, float]:
        point = self.affine @ np.array([*voxel, 1.0])
        return (float(point[0]), float(point[1]), float(point[2]))

    def value_at(self, grid: np.ndarray, point: Sequence[float]) -> float:
        """A map over the model's input grid, read at the input voxel nearest a world point."""
        voxel = np.rint(np.linalg.solve(self.affine, np.array([*point, 1.0]))[:3]).astype(int)
        if np.any(voxel < 0) or np.any(voxel >= np.array(grid.shape)):
            return 0.0
        return float(grid[tuple(voxel)])

    def body(self) -> np.ndarray:
        return self.tensor[0].numpy() > BODY_LEVEL


def evidence_map(model: Any, scan: PreparedScan, target: torch.Tensor, method: str = DEFAULT_METHOD) -> np.ndarray:
    """(x, y, z) map over the model's input grid: how much each place drives cos(target, scan's vector)."""
    if method not in METHODS:
        raise ValueError(f"Unknown evidence method {method!r}; choose one of {', '.join(METHODS)}.")
    if method != "gradient" and not model.image.has_feature_map:
        method = "gradient"  # a ViT keeps tokens, not a map: only the gradient reaches its input
    x = scan.tensor.unsqueeze(0).to(model.device)
    target = F.normalize(target.to(model.device).float().reshape(1, -1), dim=-1)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            if method == "gradient":
                x.requires_grad_(True)
                (search_vector(model, model.image(x)) * target).sum().backward()
                signal = (x.grad * x).sum(dim=1)[0].clamp(min=0).detach().float().cpu().numpy()
                heat = ndimage.gaussian_filter(signal, sigma=1.5)
            elif method == "gradcam":
                features = model.image.feature_map(x)
                features.retain_grad()
                (search_vector(model, model.image.pool(features)) * target).sum().backward()
                weights = features.grad.mean(dim=(2, 3, 4), keepdim=True)
                heat = _upsample((weights * features).sum(dim=1, keepdim=True).clamp(min=0), x.shape[2:])
            else:
                with torch.no_grad():
                    heat = _upsample(_location_similarity(model, model.image.feature_map(x), target), x.shape[2:])
    finally:
        model.zero_grad(set_to_none=True)
        if was_training:
            model.train(True)
    return np.where(scan.body(), heat, 0.0).astype(np.float32)


def search_vector(model: Any, tower_features: torch.Tensor) -> torch.Tensor:
    """The vector ``encode_image`` makes from the tower's features (with gradients): the joint space
    for an aligned model, the tower's own space otherwise."""
    if model.aligned:
        return model.embed_image_features(tower_features, update_center=False)
    return F.normalize(tower_features.float(), dim=-1)


def _location_similarity(model: Any, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(1, 1, x', y', z') cosine of the target with each location, taken as if it filled the whole map."""
    _, c, *grid = features.shape
    locations = features.permute(0, 2, 3, 4, 1).reshape(-1, c, 1, 1, 1)
    pooled = model.image.pool(locations.expand(-1, c, *model.image.pool_grid))
    similarity = search_vector(model, pooled) @ target.reshape(-1, 1)
    return similarity.reshape(1, 1, *grid).clamp(min=0)


def _upsample(heat: torch.Tensor, size: Sequence[int]) -> np.ndarray:
    return F.interpolate(heat.detach().float(), size=tuple(int(s) for s in size), mode="trilinear",
                         align_corners=False)[0, 0].cpu().numpy()


def peaks(heat: np.ndarray, scan: PreparedScan, count: int = MAX_POINTS,
          min_separation_mm: float = MIN_SEPARATION_MM) -> list[tuple[tuple[float, float, float], float]]:
    """The ``count`` best points of a map, at least ``min_separation_mm`` apart: (world mm, score 0..1)."""
    top = float(heat.max())
    if top <= 0:
        return []
    order = np.argsort(heat, axis=None)[::-1]
    chosen: list[tuple[tuple[float, float, float], float]] = []
    for flat in order[: 20000]:
        value = float(heat.flat[flat])
        if value <= 0 or len(chosen) == count:
            break
        point = scan.world(np.unravel_index(flat, heat.shape))
        if all(np.linalg.norm(np.subtract(point, other)) >= min_separation_mm for other, _ in chosen):
            chosen.append((point, value / top))
    return chosen


# ------------------------------------------------------------------ report evidence
#: Words that place a finding at a level of the lungs (whole words, in the finding's sentence).
LEVEL_WORDS = {
    "upper": ("upper lobe", "upper lobes", "upper zone", "apex", "apices", "apical", "upper"),
    "middle": ("middle lobe", "lingula", "lingular", "mid zone", "midzone", "middle"),
    "lower": ("lower lobe", "lower lobes", "lower zone", "base", "bases", "basal", "basilar", "lower", "dependent"),
}
#: Words that place a finding in the mediastinum (between the lungs): the heart, the great vessels,
#: the nodes, the oesophagus.
MEDIASTINUM_WORDS = ("mediastinal", "mediastinum", "hilar", "hilum", "hila", "aorta", "aortic", "coronary",
                     "pericardial", "pericardium", "heart", "cardiac", "oesophagus", "esophagus", "oesophageal",
                     "esophageal", "hiatal", "hiatus", "paratracheal", "subcarinal", "prevascular")
_SENTENCE_STOP = ".;\n"
#: How far beyond the aerated lung a located finding may lie: the pleural space and a collapsed or
#: filled lobe are no longer air.
PLEURA_MM = 15.0


def located_findings(report: str, findings: Sequence[dict], names: Sequence[str] | None = None
                     ) -> list[tuple[str, str | None, str | None]]:
    """(finding, side, level) for each affirmed finding the report places (a side, a level of the lungs,
    or "mediastinum" when its sentence names a structure there), in report order; ``names`` keeps only
    those findings."""
    import re

    out = []
    for f in findings:
        if f.get("status") != "affirmed" or (names is not None and f["name"] not in names):
            continue
        start, end = f.get("start"), f.get("end")
        if start is None or end is None:
            continue
        lo = max((report.rfind(c, 0, start) for c in _SENTENCE_STOP), default=-1) + 1
        his = [i for i in (report.find(c, end) for c in _SENTENCE_STOP) if i >= 0]
        sentence = report[lo:min(his) if his else len(report)].lower()
        level = next((name for name, words in LEVEL_WORDS.items()
                      if any(re.search(rf"\b{re.escape(w)}\b", sentence) for w in words)), None)
        side = f.get("laterality") if f.get("laterality") in ("right", "left") else None
        if any(re.search(rf"\b{re.escape(w)}\b", sentence) for w in MEDIASTINUM_WORDS) and not side:
            level = "mediastinum"
        if side or level:
            out.append((f["name"], side, level))
    return out


@dataclass
class Chest:
    """A scan's body and lungs, computed once per scan for all the report's findings.

    Args:
        body: the body outline per axial slice, lungs inside it filled in.
        lungs: air inside the body (HU < -400).
        grown: the lungs grown by ``PLEURA_MM`` (the pleural space, dense lung), inside the body.
        middle: the body's middle along the array's first axis (towards the patient's right, RAS+).
    """

    body: np.ndarray
    lungs: np.ndarray
    grown: np.ndarray
    middle: float

    @classmethod
    def of(cls, volume: Volume) -> "Chest":
        hu = volume.hu
        solid = hu > -500
        body = fill_each_slice(solid)
        lungs = body & (hu < -400)
        reach = [max(1, round(PLEURA_MM / s)) for s in volume.spacing]
        grown = ndimage.maximum_filter(lungs, size=[2 * r + 1 for r in reach]) & body
        xs = np.nonzero(body.any(axis=(1, 2)))[0]
        middle = (xs.min() + xs.max()) / 2 if xs.size else hu.shape[0] / 2
        return cls(body, lungs, grown, float(middle))

    @cached_property
    def mediastinum(self) -> np.ndarray:
        """The soft tissue between the lungs (``region_mask(chest, None, "mediastinum")``), made once per
        scan: report evidence and several findings' looks ask for it. Read-only."""
        mask = _mediastinum(self)
        mask.flags.writeable = False
        return mask


def fill_each_slice(mask: np.ndarray) -> np.ndarray:
    """``mask`` with what it encloses on each axial slice filled in."""
    out = np.zeros(mask.shape, dtype=bool)
    for z in np.nonzero(mask.any(axis=(0, 1)))[0]:
        out[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return out


def region_mask(chest: Chest, side: str | None, level: str | None) -> np.ndarray:
    """Voxels in that part of the chest: the lungs grown by ``PLEURA_MM`` (so the pleural space and dense
    lung, an effusion, a collapse, a mass, are in), on the patient's ``side``, in the upper, middle or
    lower third of the lungs' height; or the mediastinum. Empty when the scan shows no lung there."""
    if level == "mediastinum":
        return chest.mediastinum.copy()
    grown = chest.grown.copy()
    if side:
        grown &= side_half(chest, side)
    if level:
        grown &= level_band(chest, level, side)
    return grown


def side_half(chest: Chest, side: str) -> np.ndarray:
    """The patient's ``side`` ("right" or "left") of the body's middle, as a mask broadcast to the scan."""
    # RAS+: the array's first axis runs towards the patient's right.
    x = np.arange(chest.body.shape[0])
    half = x > chest.middle if side == "right" else x <= chest.middle
    return np.broadcast_to(half[:, None, None], chest.body.shape)


def level_band(chest: Chest, level: str, side: str | None = None) -> np.ndarray:
    """The upper, middle or lower third of the lungs' height, or "all" of it (of that ``side``'s lung when
    given), as a mask broadcast to the scan; everything when the scan shows no lung there."""
    lungs = chest.lungs & side_half(chest, side) if side else chest.lungs
    keep = np.ones(chest.body.shape[2], dtype=bool)
    if lungs.any():
        zs = np.nonzero(lungs.any(axis=(0, 1)))[0]
        low, high = zs.min(), zs.max() + 1
        third = (high - low) / 3
        bands = {"lower": (low, low + third), "middle": (low + third, low + 2 * third), "upper": (low + 2 * third, high),
                 "all": (low, high)}
        z0, z1 = bands[level]
        z = np.arange(chest.body.shape[2])
        keep = (z >= z0) & (z < z1)
    return np.broadcast_to(keep[None, None, :], chest.body.shape)


def _mediastinum(chest: Chest) -> np.ndarray:
    """The soft tissue between the lungs: in each row (a y and a z), the body's non-lung voxels between
    the left lung's inner edge and the right lung's, within the lungs' height (a little below too, for a
    hiatus), grown by ``PLEURA_MM`` in-plane less the lungs (a vessel wall beside the lung is in)."""
    body, lungs, middle = chest.body, chest.lungs, chest.middle
    if not lungs.any():
        return np.zeros(body.shape, dtype=bool)
    x = np.arange(body.shape[0])[:, None, None]
    right, left = lungs & (x > middle), lungs & (x <= middle)
    # RAS+: the right lung lies at larger x; its inner edge is its smallest x, the left lung's its largest.
    right_edge = np.where(right.any(axis=0), np.argmax(right, axis=0), -1)
    left_edge = np.where(left.any(axis=0), body.shape[0] - 1 - np.argmax(left[::-1], axis=0), -1)
    both = (right_edge >= 0) & (left_edge >= 0)
    between = both[None] & (x > left_edge[None]) & (x < right_edge[None])
    zs = np.nonzero(lungs.any(axis=(0, 1)))[0]
    low = max(0, zs.min() - (zs.max() - zs.min()) // 6)
    between[:, :, low:zs.min()] = between[:, :, zs.min():zs.min() + 1]  # below the lungs: as at their base
    out = between & body & ~lungs
    return out


def on_input_grid(mask: np.ndarray, scan: PreparedScan) -> np.ndarray:
    """A mask over the case's volume voxels, sampled onto the model input's grid (nearest voxel)."""
    shape = scan.tensor.shape[1:]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = grid @ scan.affine[:3, :3].T + scan.affine[:3, 3]
    voxel = np.rint((world - scan.volume.affine[:3, 3]) @ np.linalg.inv(scan.volume.affine[:3, :3]).T).astype(int)
    inside = np.all((voxel >= 0) & (voxel < np.array(mask.shape)), axis=1)
    out = np.zeros(len(grid), dtype=bool)
    out[inside] = mask[voxel[inside, 0], voxel[inside, 1], voxel[inside, 2]]
    return out.reshape(shape)


def centroid_world(mask: np.ndarray, volume: Volume) -> tuple[float, float, float] | None:
    if not mask.any():
        return None
    return voxel_world(volume, ndimage.center_of_mass(mask))


def voxel_world(volume: Volume, voxel: Sequence[float]) -> tuple[float, float, float]:
    """A voxel of the case's scan (its array as loaded) in world RAS+ mm."""
    point = volume.affine @ np.array([*voxel, 1.0])
    return (float(point[0]), float(point[1]), float(point[2]))
