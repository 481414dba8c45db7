"""From Volume to model input: the one MONAI preprocessing pipeline, and augmented views."""

from .augment import TestTimeAugmentation, apply_views, augment_volumes, draw_views
from .preprocess import (
    PRESETS,
    PreprocessConfig,
    Preprocessor,
    build_transforms,
    get_preset,
)

__all__ = [
    "PRESETS",
    "PreprocessConfig",
    "Preprocessor",
    "TestTimeAugmentation",
    "apply_views",
    "augment_volumes",
    "build_transforms",
    "draw_views",
    "get_preset",
]
