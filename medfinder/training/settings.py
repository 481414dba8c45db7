"""The trainer's settings, apart from the trainer: the command line reads them without importing PyTorch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_CONFIG = "medfinder-demo"


@dataclass
class TrainSettings:
    manifest: str  # one CSV, or several joined by os.pathsep (their case ids must not collide)
    out: str
    config: str | None = None  # None: --init's own config, else DEFAULT_CONFIG
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    text_lr: float | None = None  # a fine-tuned text tower wants a much smaller rate
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    accumulate: int = 1
    workers: int = 0
    seed: int = 0
    contrastive_weight: float = 1.0  # 0: a supervised stage (label head only) before a locked-image stage
    view_weight: float = 0.5
    finding_weight: float = 0.0
    label_head_weight: float = 0.0  # a training-only linear classifier on image-tower features
    label_balance: float = 0.0  # label head: positives weigh (negatives / positives) ** this (0 = off, 1 = balanced)
    lock_image: bool = False  # LiT: train projections and temperature on cached image-tower features
    feature_views: int = 4  # views per volume cached when the image tower is locked (view 0 not augmented)
    full_report_probability: float = 0.5
    min_window_fraction: float = 0.5
    translate_voxels: float = 4.0
    rotate_degrees: float = 6.0
    scale_range: float = 0.05
    cache: bool = True
    amp: bool = True
    device: str = "auto"
    augment: bool = True  # random spatial and intensity augmentation of each training view
    activation_checkpointing: bool = False  # recompute the image tower's stages in backward: less memory
    max_steps: int | None = None
    init: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
