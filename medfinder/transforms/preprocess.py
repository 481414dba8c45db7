"""One preprocessing pipeline for training, indexing and queries.

The pipeline is built from a ``PreprocessConfig`` that is saved inside every model folder,
so a training run, an index built with that model and a query against the index can never
disagree on orientation, spacing or HU window (CT-CLIP's inference used another window than
its training; the MedFinder release min-max scaled each volume and ignored spacing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    ConcatItemsd,
    CopyItemsd,
    CropForegroundd,
    EnsureTyped,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from ..io.volume import Volume
from .local_maximum import LocalMaximumd

#: Air outside the body is below this; crop to the bounding box of voxels above it.
BODY_THRESHOLD_HU = -500.0


@dataclass(frozen=True)
class PreprocessConfig:
    """How a Volume becomes model input.

    ``windows`` lists (low, high) HU ranges; each becomes one input channel scaled to [0, 1]
    and clipped, so a lung window and a mediastinal window can feed the encoder side by side.
    ``shape`` is the model input in RAS axis order (x, y, z) after resampling to ``spacing``
    mm; the body is cropped first, then centred and padded (with air) or cropped to shape.
    With ``pad_to_shape`` off, ``shape`` is only the largest input: a smaller scan keeps its own
    size, so a tower that averages its last feature map averages the scan and not the air added
    around it (on real CT a patient's own crops then beat other patients' scans by margins six to a
    hundred times wider; docs/evaluation.md). Inputs then differ in shape and are batched only by equal shape.

    Windows listed in ``peak_windows`` are read from a copy of the volume in which every voxel
    holds the maximum of its neighbourhood, as wide as one model voxel, before resampling. A
    small calcification interpolated onto a 4 mm grid loses part of its peak HU whenever it
    falls between samples; taken as a local maximum it keeps it.
    """

    name: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    windows: tuple[tuple[float, float], ...] = ((-1000.0, 1000.0),)
    crop_foreground: bool = True
    interpolation: str = "bilinear"
    peak_windows: tuple[int, ...] = ()
    pad_to_shape: bool = True

    def __post_init__(self) -> None:
        outside = [i for i in self.peak_windows if not 0 <= i < len(self.windows)]
        if outside:
            raise ValueError(f"peak window {outside[0]} is not one of the {len(self.windows)} windows")

    @property
    def in_channels(self) -> int:
        return len(self.windows)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Written only when used, so a config saved before the field existed serialises (and
        # so fingerprints) exactly as it did: indexes built with that model still open.
        if not self.peak_windows:
            del data["peak_windows"]
        if self.pad_to_shape:
            del data["pad_to_shape"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        return cls(
            name=str(data["name"]),
            spacing=tuple(float(s) for s in data["spacing"]),  # type: ignore[arg-type]
            shape=tuple(int(s) for s in data["shape"]),  # type: ignore[arg-type]
            windows=tuple((float(lo), float(hi)) for lo, hi in data.get("windows", ((-1000, 1000),))),
            crop_foreground=bool(data.get("crop_foreground", True)),
            interpolation=str(data.get("interpolation", "bilinear")),
            peak_windows=tuple(int(i) for i in data.get("peak_windows", ())),
            pad_to_shape=bool(data.get("pad_to_shape", True)),
        )


#: Named recipes. ``medfinder-demo`` is what the CPU demo model uses; the others reproduce
#: the peers' published preprocessing (axis order here is always RAS x, y, z).
PRESETS: dict[str, PreprocessConfig] = {
    # 320 mm in every direction: 5 mm slices so that 64 of them span a whole chest CT from the
    # apices to the costophrenic recesses (at 4 mm, 256 mm cut off the recesses, where effusions
    # collect, and the apices, where pneumothoraces show first).
    "medfinder-demo": PreprocessConfig(
        name="medfinder-demo",
        spacing=(4.0, 4.0, 5.0),
        shape=(80, 80, 64),
        windows=((-1000.0, 200.0), (-160.0, 240.0), (150.0, 2500.0)),  # lung, mediastinum, calcium/bone
    ),
    # The public MedFinder release: per-volume min-max, no resampling. We keep its input size
    # but use an HU window, since min-max makes intensities depend on whatever metal is in view.
    "medfinder-release": PreprocessConfig(
        name="medfinder-release", spacing=(1.5, 1.5, 3.0), shape=(256, 256, 32),
        windows=((-1000.0, 1000.0),),
    ),
    "ct-clip": PreprocessConfig(
        name="ct-clip", spacing=(0.75, 0.75, 1.5), shape=(480, 480, 240), windows=((-1000.0, 1000.0),),
        crop_foreground=False,
    ),
    "merlin": PreprocessConfig(
        name="merlin", spacing=(1.5, 1.5, 3.0), shape=(224, 224, 160), windows=((-1000.0, 1000.0),),
        crop_foreground=False,
    ),
    "m3d": PreprocessConfig(
        name="m3d", spacing=(1.5, 1.5, 3.0), shape=(256, 256, 32), windows=((-1000.0, 1000.0),),
    ),
}


def get_preset(name: str) -> PreprocessConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"Unknown preprocessing preset {name!r}; choose one of {sorted(PRESETS)}.") from None


def build_transforms(config: PreprocessConfig, extra: Sequence[Any] = (), reversed_axes: bool = False) -> Compose:
    """MONAI dictionary transforms acting on ``{"image": MetaTensor (1, x, y, z) in HU}``.

    Resampling runs before reorientation, on the array as it lies in memory: a NIfTI's voxels
    are in Fortran order, and handing MONAI their C-contiguous (z, y, x) view with
    ``reversed_axes=True`` (spacing given in that order) is 2.4x faster at 512x512x300 than
    resampling a Fortran-strided (x, y, z) tensor; Orientationd then permutes the small result.
    ``extra`` transforms (training augmentations) run after resampling and before windowing,
    so they act in HU and in millimetres.
    """
    keys = ["image", "peak"] if config.peak_windows else ["image"]
    pixdim = tuple(reversed(config.spacing)) if reversed_axes else config.spacing
    steps: list[Any] = [EnsureTyped(keys="image", dtype=torch.float32, track_meta=True)]
    if config.peak_windows:
        steps += [CopyItemsd(keys="image", names="peak"), LocalMaximumd(keys="peak", spacing=pixdim)]
    steps += [
        Spacingd(keys=keys, pixdim=pixdim, mode=config.interpolation, padding_mode="border"),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if config.crop_foreground:
        steps.append(
            CropForegroundd(
                keys=keys, source_key="image", select_fn=lambda x: x > BODY_THRESHOLD_HU,
                allow_smaller=True, margin=2,
            )
        )
    # Pad with air, not zero (0 HU is water), then centre-crop to the model shape.
    if config.pad_to_shape:
        steps.append(SpatialPadd(keys=keys, spatial_size=config.shape, value=-1024.0))
    steps.append(CenterSpatialCropd(keys=keys, roi_size=config.shape))
    steps.extend(extra)
    channel_keys = []
    for i, (lo, hi) in enumerate(config.windows):
        key = f"window{i}"
        channel_keys.append(key)
        steps.append(CopyItemsd(keys="peak" if i in config.peak_windows else "image", names=key))
        steps.append(ScaleIntensityRanged(keys=key, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    steps.append(ConcatItemsd(keys=channel_keys, name="image", dim=0))
    if config.pad_to_shape:
        steps.append(ResizeWithPadOrCropd(keys="image", spatial_size=config.shape))
    steps.append(EnsureTyped(keys="image", dtype=torch.float32, track_meta=False))
    return Compose(steps)


def to_meta_tensor(volume: Volume) -> tuple[MetaTensor, bool]:
    """The volume as a MONAI MetaTensor in HU carrying its affine, without copying voxels.

    Returns the tensor and whether its axes are reversed: a Fortran-ordered array is given
    as its C-contiguous (z, y, x) view with the affine's columns permuted to match.
    """
    hu, affine = volume.hu, np.asarray(volume.affine, dtype=np.float64)
    reverse = hu.flags.f_contiguous and not hu.flags.c_contiguous
    if reverse:
        hu, affine = hu.T, affine[:, [2, 1, 0, 3]]
    data = torch.from_numpy(hu).unsqueeze(0)
    return MetaTensor(data, affine=torch.as_tensor(affine)), reverse


class Preprocessor:
    """Callable turning a Volume into a model input tensor (C, x, y, z), float32 in [0, 1]."""

    def __init__(self, config: PreprocessConfig, extra: Sequence[Any] = ()) -> None:
        self.config = config
        self.transforms = build_transforms(config, extra)
        self._reversed_transforms = build_transforms(config, extra, reversed_axes=True)

    def __call__(self, volume: Volume) -> torch.Tensor:
        image, reverse = to_meta_tensor(volume)
        pipeline = self._reversed_transforms if reverse else self.transforms
        return torch.as_tensor(pipeline({"image": image})["image"])

    def with_affine(self, volume: Volume) -> tuple[torch.Tensor, np.ndarray]:
        """The model input and the affine from its voxels to the volume's world RAS+ mm.

        MONAI tracks the affine through every spatial step (resampling, reorientation, crop, pad);
        the pipeline's last step only drops it.
        """
        image, reverse = to_meta_tensor(volume)
        pipeline = self._reversed_transforms if reverse else self.transforms
        out = Compose(pipeline.transforms[:-1])({"image": image})["image"]
        return torch.as_tensor(out).float().contiguous(), np.asarray(out.affine, dtype=np.float64)
