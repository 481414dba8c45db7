"""Small random spatial transforms and intensity jitter of preprocessed volumes.

Training draws two such views of every volume (the view-consistency term) and caches several
per volume when the image tower is locked; an index averages the embeddings of a fixed set of
them with the volume itself (test-time augmentation, ``MedFinder.encode_image``). Never a
left-right flip: reports state laterality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

from ..errors import ModelError


class Augmentation(Protocol):
    """How far a view may move: ``TrainSettings`` and a model config's test-time augmentation."""

    @property
    def translate_voxels(self) -> float: ...

    @property
    def rotate_degrees(self) -> float: ...

    @property
    def scale_range(self) -> float: ...


@dataclass
class Views:
    """The random part of a batch of views, drawn once and applicable to any volumes of its shape:
    where each view samples its volume (an affine ``grid``, or whole-voxel ``offsets``) and its
    intensity jitter (``contrast``, ``brightness``, ``noise``)."""

    grid: torch.Tensor | None
    offsets: list[list[int]] | None
    max_shift: int
    contrast: torch.Tensor
    brightness: torch.Tensor
    noise: torch.Tensor

    def to(self, device: torch.device) -> "Views":
        return Views(None if self.grid is None else self.grid.to(device), self.offsets, self.max_shift,
                     self.contrast.to(device), self.brightness.to(device), self.noise.to(device))


def draw_views(shape: Sequence[int], settings: Augmentation, generator: torch.Generator) -> Views:
    """Random views for a (B, C, x, y, z) batch, drawn on ``generator``'s device.

    With rotation and scaling off, the transform is a whole-voxel shift (no resampling: several
    times cheaper on a CPU); otherwise an affine grid for one batched ``grid_sample`` applies
    rotation, scale and translation. The draws come in a fixed order, so a seeded generator gives
    the same views on every call.
    """
    b, device = int(shape[0]), generator.device

    def uniform(*size: int, scale: float) -> torch.Tensor:
        return (torch.rand(*size, generator=generator, device=device) * 2 - 1).mul(scale)

    grid, offsets, max_shift = None, None, 0
    if settings.rotate_degrees == 0 and settings.scale_range == 0:
        max_shift = int(round(settings.translate_voxels))
        if max_shift >= 1:
            offsets = torch.randint(0, 2 * max_shift + 1, (b, 3), generator=generator, device=device).tolist()
    else:
        angles = uniform(b, 3, scale=math.radians(settings.rotate_degrees))
        cos, sin = angles.cos(), angles.sin()
        one, zero = torch.ones(b, device=device), torch.zeros(b, device=device)
        rx = torch.stack([one, zero, zero, zero, cos[:, 0], -sin[:, 0], zero, sin[:, 0], cos[:, 0]], 1).view(b, 3, 3)
        ry = torch.stack([cos[:, 1], zero, sin[:, 1], zero, one, zero, -sin[:, 1], zero, cos[:, 1]], 1).view(b, 3, 3)
        rz = torch.stack([cos[:, 2], -sin[:, 2], zero, sin[:, 2], cos[:, 2], zero, zero, zero, one], 1).view(b, 3, 3)
        scale = 1.0 + uniform(b, 1, 1, scale=settings.scale_range)
        # grid_sample's normalised coordinates run over (z, y, x) = (W, H, D) for a (B, C, x, y, z) tensor
        spatial = torch.tensor(list(shape[2:])[::-1], dtype=torch.float32, device=device)
        shift = uniform(b, 3, scale=settings.translate_voxels) * 2.0 / spatial
        theta = torch.cat([rx @ ry @ rz * scale, shift.unsqueeze(-1)], dim=2)
        grid = F.affine_grid(theta, [int(v) for v in shape], align_corners=False)
    contrast = 1.0 + (torch.rand(b, 1, 1, 1, 1, generator=generator, device=device) * 2 - 1).mul(0.1)
    brightness = (torch.rand(b, 1, 1, 1, 1, generator=generator, device=device) * 2 - 1).mul(0.05)
    noise = torch.randn([int(v) for v in shape], generator=generator, device=device).mul_(0.02)
    return Views(grid, offsets, max_shift, contrast, brightness, noise)


def apply_views(images: torch.Tensor, views: Views) -> torch.Tensor:
    """``views`` applied to a (B, C, x, y, z) batch of their shape; a new tensor, ``images`` untouched.

    Outside the field of view is 0, which is air in every HU window we use.
    """
    if views.grid is not None:
        out = F.grid_sample(images, views.grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    elif views.offsets is not None:
        spatial = images.shape[2:]
        padded = F.pad(images, [views.max_shift] * 6)
        out = torch.stack([
            padded[i, :, ox : ox + spatial[0], oy : oy + spatial[1], oz : oz + spatial[2]]
            for i, (ox, oy, oz) in enumerate(views.offsets)
        ])
    else:
        out = images.clone()
    out.mul_(views.contrast).add_(views.brightness)  # in place: these volumes are large, memory traffic dominates
    out.add_(views.noise)
    return out.clamp_(0.0, 1.0)


def augment_volumes(images: torch.Tensor, settings: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """A random small spatial transform and intensity jitter per volume of a (B, C, x, y, z) batch.

    ``generator`` must live on the images' device (noise is drawn where the volumes are).
    """
    return apply_views(images, draw_views(images.shape, settings, generator))


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

    __test__ = False  # not a pytest test class, whatever its name

    #: Allowed range of each entry: whole numbers for views and seed, real numbers for the rest.
    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {
        "views": (0, 64), "translate_voxels": (0.0, 16.0), "rotate_degrees": (0.0, 45.0),
        "scale_range": (0.0, 0.49), "seed": (0, 2**63 - 1),
    }

    def to_dict(self) -> dict[str, Any]:
        return {"views": self.views, "translate_voxels": self.translate_voxels, "rotate_degrees": self.rotate_degrees,
                "scale_range": self.scale_range, "seed": self.seed}

    @classmethod
    def from_config(cls, entry: Any, source: str) -> "TestTimeAugmentation":
        """The ``test_time_augmentation`` entry of a model config (None: no views), checked."""
        if entry is None:
            return cls()

        def refuse(problem: str) -> ModelError:
            return ModelError(f"The test_time_augmentation entry of {source} {problem}.")

        if not isinstance(entry, Mapping) or "views" not in entry or set(entry) - set(cls.LIMITS):
            raise refuse(f"must be an object with views and optionally {', '.join(list(cls.LIMITS)[1:])}")
        values: dict[str, Any] = {}
        for key, value in entry.items():
            whole = key in ("views", "seed")
            kinds = (int,) if whole else (int, float)
            low, high = cls.LIMITS[key]
            # the comparison also refuses NaN and infinity, and any size of int without overflowing
            if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
                kind, span = ("a whole number", f"{int(low)} to {int(high)}") if whole else ("a number", f"{low:g} to {high:g}")
                raise refuse(f"needs {key} to be {kind} from {span}, not {value!r}")
            values[key] = int(value) if whole else float(value)
        return cls(**values)
