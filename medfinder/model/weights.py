"""Weights files and the digest that fingerprints them."""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch

WEIGHTS_FILE = "model.safetensors"


def state_digest(state: Mapping[str, torch.Tensor], extra: bytes = b"") -> str:
    """SHA-256 over tensors by name, dtype, shape and bytes (and ``extra`` first)."""
    digest = hashlib.sha256(extra)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
