"""The model: a typed config, the image and text towers, the dual encoder, and the factory."""

from .config import (
    ImageTowerConfig,
    ModelConfig,
    ProjectionConfig,
    TextTowerConfig,
    available_configs,
    load_config,
)
from .dual_encoder import MedFinder
from .factory import (
    BUILTIN_MODELS,
    create_model_and_transforms,
    load_model,
    model_id,
    read_fingerprint,
)

__all__ = [
    "BUILTIN_MODELS",
    "ImageTowerConfig",
    "MedFinder",
    "ModelConfig",
    "ProjectionConfig",
    "TextTowerConfig",
    "available_configs",
    "create_model_and_transforms",
    "load_config",
    "load_model",
    "model_id",
    "read_fingerprint",
]
