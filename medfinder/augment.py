"""Small random spatial transforms and intensity jitter of preprocessed volumes.

Training draws two such views of every volume (the view-consistency term) and caches several
per volume when the image tower is locked; an index averages the embeddings of a fixed set of
them with the volume itself (test-time augmentation, ``MedFinder.encode_image``). Never a
left-right flip: reports state laterality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Protocol

import torch
import torch.nn.functional as F

from .errors import ModelError


class Augmentation(Protocol):
    """How far a view may move: ``TrainSettings`` and a model config's test-time augmentation."""

    translate_voxels: float
    rotate_degrees: float
    scale_range: float


def _shift_volumes(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Whole-voxel random translations (no resampling), padding with 0 = air."""
    if max_shift < 1:
        return images.clone()
    b, _, *spatial = images.shape
    padded = F.pad(images, [max_shift] * 6)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 3), generator=generator, device=generator.device).tolist()
    return torch.stack([
        padded[i, :, ox : ox + spatial[0], oy : oy + spatial[1], oz : oz + spatial[2]]
        for i, (ox, oy, oz) in enumerate(offsets)
    ])


def _affine_volumes(images: torch.Tensor, settings: Augmentation, generator: torch.Generator) -> torch.Tensor:
    b = images.shape[0]
    device = images.device

    def uniform(*shape: int, scale: float) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator, device=device) * 2 - 1).mul(scale)

    angles = uniform(b, 3, scale=math.radians(settings.rotate_degrees))
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones(b, device=device), torch.zeros(b, device=device)
    rx = torch.stack([one, zero, zero, zero, cos[:, 0], -sin[:, 0], zero, sin[:, 0], cos[:, 0]], 1).view(b, 3, 3)
    ry = torch.stack([cos[:, 1], zero, sin[:, 1], zero, one, zero, -sin[:, 1], zero, cos[:, 1]], 1).view(b, 3, 3)
    rz = torch.stack([cos[:, 2], -sin[:, 2], zero, sin[:, 2], cos[:, 2], zero, zero, zero, one], 1).view(b, 3, 3)
    scale = 1.0 + uniform(b, 1, 1, scale=settings.scale_range)
    # grid_sample's normalised coordinates run over (z, y, x) = (W, H, D) for a (B, C, x, y, z) tensor
    spatial = torch.tensor(images.shape[2:][::-1], dtype=torch.float32, device=device)
    shift = uniform(b, 3, scale=settings.translate_voxels) * 2.0 / spatial
    theta = torch.cat([rx @ ry @ rz * scale, shift.unsqueeze(-1)], dim=2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_volumes(images: torch.Tensor, settings: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """A random small spatial transform and intensity jitter per volume of a (B, C, x, y, z) batch.

    ``generator`` must live on the images' device (noise is drawn where the volumes are).

    With rotation and scaling off, the transform is a whole-voxel shift (no resampling: several
    times cheaper on a CPU); otherwise one batched ``grid_sample`` applies rotation, scale and
    translation. Outside the field of view is 0, which is air in every HU window we use.
    """
    if settings.rotate_degrees == 0 and settings.scale_range == 0:
        out = _shift_volumes(images, int(round(settings.translate_voxels)), generator)
    else:
        out = _affine_volumes(images, settings, generator)
    b, device = images.shape[0], images.device
    contrast = 1.0 + (torch.rand(b, 1, 1, 1, 1, generator=generator, device=device) * 2 - 1).mul(0.1)
    brightness = (torch.rand(b, 1, 1, 1, 1, generator=generator, device=device) * 2 - 1).mul(0.05)
    out.mul_(contrast).add_(brightness)  # in place: these volumes are large, memory traffic dominates
    out.add_(torch.randn(out.shape, generator=generator, device=device).mul_(0.02))
    return out.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class TestTimeAugmentation:
    """A model's fixed augmented views, averaged with the volume itself for what an index stores.

    ``views`` = 0 turns it off. The views are drawn from ``seed`` for every volume alike, so a
    volume's embedding never depends on the batch it was encoded in.
    """

    views: int = 0
    translate_voxels: float = 4.0
    rotate_degrees: float = 6.0
    scale_range: float = 0.05
    seed: int = 0

    @classmethod
    def from_config(cls, entry: Mapping[str, Any] | None, source: str) -> "TestTimeAugmentation":
        if entry is None:
            return cls()
        if not isinstance(entry, Mapping) or set(entry) - {f.name for f in fields(cls)}:
            raise ModelError(
                f"The test_time_augmentation entry of {source} must hold only "
                f"{', '.join(f.name for f in fields(cls))}."
            )
        try:
            tta = cls(**{k: (int(v) if k in ("views", "seed") else float(v)) for k, v in entry.items()})
        except (TypeError, ValueError):
            raise ModelError(f"The test_time_augmentation entry of {source} must hold numbers.") from None
        spans = (tta.translate_voxels, tta.rotate_degrees, tta.scale_range)
        if not 0 <= tta.views <= 64 or not all(math.isfinite(v) and v >= 0 for v in spans) or tta.scale_range >= 0.5:
            raise ModelError(
                f"The test_time_augmentation entry of {source} is out of range (views 0-64, "
                "shifts and angles at least 0, scale_range below 0.5)."
            )
        return tta
