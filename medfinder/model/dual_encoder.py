"""MedFinder: a 3D CT image tower and a language-model text tower projected into one space.

Build one with ``medfinder.model.create_model_and_transforms(config)`` (the one door in, as in
open_clip); ``save_pretrained`` writes ``config.json`` + ``model.safetensors``, and a frozen
tower whose weights come from elsewhere (the offline text tower, a pretrained image backbone) is
referenced by name and its weights' digest, not copied.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._version import __version__
from ..errors import ModelError
from ..text.sentences import split_sentences
from ..transforms.augment import TestTimeAugmentation, Views, apply_views, draw_views
from ..transforms.preprocess import Preprocessor
from .config import CONFIG_FILE, ModelConfig, _read_json, load_config
from .image_tower import ImageTower
from .text_tower import TextTower
from .weights import WEIGHTS_FILE, state_digest

FORMAT_NAME = "medfinder-model"
FORMAT_VERSION = 1
#: CLIP clamps the learnable inverse temperature at 100 so the logits cannot blow up.
MAX_LOGIT_SCALE = 100.0


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
        if self.training and update:
            mean = _global_batch_mean(x) if _data_parallel() else (x.detach().float().mean(dim=0) if x.shape[0] > 1 else None)
            if mean is not None:
                with torch.no_grad():
                    if bool(self.initialized):
                        self.center.lerp_(mean, self.momentum)
                    else:
                        self.center.copy_(mean)
                        self.initialized.fill_(True)
        return x - self.center.to(x.dtype)


def _data_parallel() -> bool:
    """Whether this process trains as one rank of several (torchrun; see ``medfinder.training.distributed``)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_batch_mean(x: torch.Tensor) -> torch.Tensor | None:
    """The mean over every rank's rows (None for a global batch of one), so each rank's centre is the
    one a single process would track on the whole batch. Every rank must call it (a collective)."""
    import torch.distributed as dist

    with torch.no_grad():
        total = torch.cat([x.detach().float().sum(dim=0), x.new_tensor([x.shape[0]], dtype=torch.float32)])
        dist.all_reduce(total)
    count = int(total[-1].item())
    return total[:-1] / count if count > 1 else None


def _projection(kind: str, in_dim: int, out_dim: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    raise ModelError(f"Projection kind {kind!r} is not 'linear' or 'mlp'.")


class MedFinder(nn.Module):
    """Dual-stream CT / report model with a joint embedding space.

    ``report_pooling`` decides how a multi-sentence text becomes one vector: ``"sentences"``
    projects each sentence and averages (so a projection can learn that "No pleural effusion."
    carries nothing, which a frozen encoder's single whole-report vector cannot express), or
    ``"whole"`` encodes the whole text at once (truncated to the tower's ``max_length``).
    """

    def __init__(self, config: ModelConfig | Mapping[str, Any] | str | Path) -> None:
        super().__init__()
        self.config: ModelConfig = load_config(config)
        cfg = self.config
        source = f"model config {cfg.name!r}"
        self.preprocess_config = cfg.preprocess
        self.embed_dim = cfg.embed_dim
        self.image = ImageTower(cfg.image, self.preprocess_config)
        self.text = TextTower(cfg.text, source)
        self.text_dim = self.text.dim
        self.report_pooling = cfg.text.report_pooling
        if self.report_pooling not in ("whole", "sentences"):
            raise ModelError(f"The report pooling {self.report_pooling!r} in {source} is not 'whole' or 'sentences'.")
        proj = cfg.projection
        self.image_projection = _projection(proj.image, self.image.dim, self.embed_dim, proj.hidden)
        self.text_projection = _projection(proj.text, self.text_dim, self.embed_dim, proj.hidden)
        self.centering = cfg.centering
        if self.centering:
            self.image_centering = Centering(self.embed_dim)
            self.text_centering = Centering(self.embed_dim)
        self.test_time_augmentation = cfg.test_time_augmentation
        self._views: dict[tuple[TestTimeAugmentation, tuple[int, ...], str], Views] = {}
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        if cfg.image.weights:
            from .pretrained import load_backbone_weights

            self._image_weights_digest = load_backbone_weights(self.image, cfg.image.weights)

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

    @property
    def aligned(self) -> bool:
        """Whether images and text share the joint space (see ``ModelConfig.aligned``)."""
        return self.config.aligned

    @property
    def image_embed_dim(self) -> int:
        """Dimension of ``encode_image``'s vectors: the joint space, or the tower's for an unaligned model."""
        return self.embed_dim if self.aligned else self.image.dim

    def index_channels(self) -> dict[str, int]:
        """The vector channels an index built with this model holds, with their dimensions.

        ``image`` (image-to-image, and text-to-image when aligned), ``report`` (a report in the
        joint space, image-to-report; aligned models only) and ``report_text`` (report-to-report).
        """
        channels = {"image": self.image_embed_dim, "report_text": self.text_dim}
        if self.aligned:
            channels["report"] = self.embed_dim
        return channels

    def _batched(self, fn: Any, items: Any, batch_size: int, dim: int | None = None) -> torch.Tensor:
        was_training = self.training
        if was_training:  # switching modes walks every submodule: ~8 ms per query with MiniLM
            self.eval()
        # bf16 on a GPU only: a CPU's bf16 kernels are slower than fp32 on most machines.
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        try:
            with torch.inference_mode(), autocast:
                outs = [fn(items[i : i + batch_size]).float().cpu() for i in range(0, len(items), batch_size)]
        finally:
            if was_training:
                self.train(True)
        return torch.cat(outs) if outs else torch.empty(0, self.embed_dim if dim is None else dim)

    def _image_vectors(self, images: torch.Tensor) -> torch.Tensor:
        if self.aligned:
            return self.embed_image(images)
        return F.normalize(self.image(images).float(), dim=-1)

    def encode_image(self, images: torch.Tensor | Sequence[torch.Tensor], batch_size: int | None = None,
                     test_time_augmentation: bool = False) -> torch.Tensor:
        """(B, D) L2-normalised embeddings of preprocessed volumes (B, C, x, y, z), or of a list of
        (C, x, y, z) volumes of different shapes (each scan at its own extent), encoded one by one.

        ``batch_size``: volumes per forward pass; by default one on a CPU and 8 on a GPU. On a CPU a
        batch buys no speed (the convolutions already use every core on one volume) and multiplies the
        activations' memory: the real-CT tower at its full size indexed 0.08 cases/s at a 10.6 GB peak in
        batches of 8, 0.11 cases/s at 2.6 GB one at a time (docs/benchmarks.md).
        ``test_time_augmentation`` (what an index stores for its scans): each embedding is the
        mean of the volume's own and its config's fixed augmented views, renormalised, at
        ``views + 1`` times the cost; a query scan is encoded without it, fast.
        """
        if not isinstance(images, torch.Tensor):
            vectors = [self.encode_image(x, batch_size, test_time_augmentation) for x in images]
            return torch.cat(vectors) if vectors else torch.empty(0, self.image_embed_dim)
        if batch_size is None:
            batch_size = 1 if self.device.type == "cpu" else 8
        if images.ndim == 4:
            images = images.unsqueeze(0)
        dim = self.image_embed_dim
        if test_time_augmentation and self.test_time_augmentation.views > 0:
            return self._batched(lambda x: self._embed_with_views(x, batch_size), images, batch_size, dim)
        return self._batched(lambda x: self._image_vectors(x.to(self.device)), images, batch_size, dim)

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
        total = self._image_vectors(images)
        n_views = self.test_time_augmentation.views
        views = self._test_time_views(tuple(images.shape[1:]), images.device)
        for i in range(images.shape[0]):  # the same views for every volume, in any batch
            augmented = apply_views(images[i : i + 1].expand(n_views, *images.shape[1:]), views)
            for start in range(0, n_views, batch_size):
                total[i] += self._image_vectors(augmented[start : start + batch_size]).sum(dim=0)
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
        """The tensors ``save_pretrained`` writes: towers whose weights come from elsewhere are left out."""
        state = self.state_dict()
        if self.text.frozen:
            state = {k: v for k, v in state.items() if not k.startswith("text.")}
        if self.config.image.weights:
            state = {k: v for k, v in state.items() if not k.startswith("image.")}
        if not self.aligned:  # fresh heads that no search uses: they must not make two loads differ
            heads = ("image_projection.", "text_projection.", "image_centering.", "text_centering.", "logit_scale")
            state = {k: v for k, v in state.items() if not k.startswith(heads)}
        return state

    @property
    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over the config, the saved weights and those of towers saved elsewhere."""
        config = json.dumps(self.config.to_dict(), sort_keys=True).encode()
        extra = config + (self.text.weights_digest().encode() if self.text.frozen else b"")
        if self.config.image.weights:
            extra += self._image_weights_digest.encode()
        return state_digest(self._saved_state(), extra)[:16]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (each replaced atomically)."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self._saved_state().items()}
        config = self.config.to_dict()
        config.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            medfinder_version=__version__,
            weights_sha256=state_digest(state),
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
                f"{self.config.name!r}: {'; '.join(problems[:3])}{more}."
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
        if recorded and state_digest(model._saved_state()) != recorded:
            raise ModelError(
                f"The weights file {directory / WEIGHTS_FILE} does not match the checksum recorded in its config.json."
            )
        model.eval()
        return model
