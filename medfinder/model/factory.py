"""The one door in: a MedFinder and its preprocessing from a config, a model folder or a model name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import ModelError
from ..transforms.preprocess import Preprocessor
from .config import CONFIG_FILE, ModelConfig, load_config
from .dual_encoder import MedFinder
from .weights import WEIGHTS_FILE

#: Models usable by name wherever a model is chosen (``--model NAME``): every weight they need comes
#: from an installed package, so they have no folder. ``ct-i3resnet152`` is the real-CT image tower
#: (pretrained I3ResNet-152, frozen) beside the offline text tower, not aligned with text.
BUILTIN_MODELS = ("ct-i3resnet152",)


def create_model_and_transforms(
    config: str | Path | Mapping[str, Any] | ModelConfig, pretrained: str | Path | None = None
) -> tuple[MedFinder, Preprocessor]:
    """Build a model and its preprocessing from one config (name, JSON path, model folder or dict).

    ``pretrained`` is a model folder or ``model.safetensors`` whose tensors must fit the config.
    A model folder passed as ``config`` loads its own weights; a built-in model name loads its
    weights from their package.
    """
    path = Path(config) if isinstance(config, (str, Path)) else None
    if path is not None and path.is_dir() and (path / WEIGHTS_FILE).exists() and pretrained is None:
        model = MedFinder.from_pretrained(path)
    else:
        model = MedFinder(load_config(config))
        if pretrained is not None:
            model.load_weights(pretrained)
        model.eval()
    return model, model.make_preprocessor()


def load_model(model: str | Path) -> MedFinder:
    """A trained model: a folder written by ``save_pretrained``, or one of ``BUILTIN_MODELS`` by name."""
    if str(model) in BUILTIN_MODELS and not Path(model).exists():
        return create_model_and_transforms(str(model))[0]
    path = Path(model)
    if not path.is_dir():
        raise ModelError(
            f"The model {str(model)!r} is neither a model folder nor a built-in model ({', '.join(BUILTIN_MODELS)})."
        )
    return MedFinder.from_pretrained(path)


def model_id(model: str | Path) -> str:
    """How an index records the model it was built with: a built-in name, or the folder's absolute path."""
    if str(model) in BUILTIN_MODELS and not Path(model).exists():
        return str(model)
    return str(Path(model).resolve())


def read_fingerprint(model: str | Path) -> str | None:
    """The fingerprint a saved model folder records, without loading it (None if it has none)."""
    try:
        return json.loads((Path(model) / CONFIG_FILE).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
