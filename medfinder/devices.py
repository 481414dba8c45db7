"""Where models run: ``--device auto|cpu|cuda`` everywhere a model is loaded."""

from __future__ import annotations

import torch

from .errors import MedFinderError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when this machine has it, else the CPU; ``cuda`` without CUDA is one sentence."""
    if isinstance(name, torch.device):
        return name
    if name not in DEVICES:
        raise MedFinderError(f"The device {name!r} is not one of {', '.join(DEVICES)}.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MedFinderError("The device cuda was asked for, but this machine's PyTorch sees no CUDA GPU; use --device cpu.")
    return torch.device(name)
