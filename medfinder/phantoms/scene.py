"""A scene: ordered paint operations, and the findings they belong to.

Building a case only records what to paint; ``render`` paints it later, slab by slab. Keeping
the two apart is what lets a 512x512x300 volume be painted in little memory with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .anatomy import Anatomy
from .geometry import Shape
from .grid import NOT_BONE, MaskRecord, allow
from .records import TISSUE_CODES

_T = TISSUE_CODES


@dataclass
class Spec:
    """A finding while it is being built: its facts for the report and its paint footprint."""

    name: str
    center: np.ndarray                 # patient frame, mm
    size_mm: float
    side: str | None = None
    lobe: str | None = None
    severity: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    keep: tuple[int, ...] = ()
    lo: np.ndarray = field(default_factory=lambda: np.full(3, np.inf))
    hi: np.ndarray = field(default_factory=lambda: np.full(3, -np.inf))
    record: MaskRecord | None = None

    def grow(self, shape: Shape) -> None:
        self.lo = np.minimum(self.lo, shape.lo)
        self.hi = np.maximum(self.hi, shape.hi)


@dataclass
class _Op:
    shape: Shape
    value: Any
    tissue: int
    allow: np.ndarray | None
    spec: Spec | None
    mode: str


STAGES = ("table", "body", "abdomen", "mediastinum", "heart", "airways", "nodes", "lung_tree",
          "lung_findings", "pleura", "bones", "calcium", "metal")


class Scene:
    """Paint operations by stage, and the findings (specs) that some of them belong to.

    Stages fix the painting order whatever order shapes are added in: findings are added after
    the whole body, yet an effusion is painted before the ribs over it and a hernia with the heart.
    """

    def __init__(self) -> None:
        self.ops: dict[str, list[_Op]] = {s: [] for s in STAGES}
        self.specs: list[Spec] = []

    def add(self, stage: str, shape: Shape, value: Any, tissue: str, allow: np.ndarray | None = None,
            spec: Spec | None = None, mode: str = "set") -> None:
        self.ops[stage].append(_Op(shape, value, _T[tissue], allow, spec, mode))
        if spec is not None:
            spec.grow(shape)

    def bone(self, stage: str, shape_outer: Shape, shape_inner: Shape | None, anat: Anatomy,
             cortex_scale: float = 1.0) -> None:
        """Cortex then marrow: thin bones read mostly as cortex at coarse spacing, as on a scanner."""
        self.add(stage, shape_outer, anat.cortex_hu * cortex_scale, "cortical_bone", NOT_BONE)
        if shape_inner is not None:
            self.add(stage, shape_inner, anat.marrow_hu, "marrow", allow("cortical_bone"))

    def spec(self, spec: Spec) -> Spec:
        self.specs.append(spec)
        return spec

    def ordered(self) -> list[_Op]:
        return [op for s in STAGES for op in self.ops[s]]
