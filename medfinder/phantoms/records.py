"""What a phantom case is, as the rest of MedFinder sees it: label space, sizes, tissue codes, records.

This is the bottom layer of the package (everything else imports it, it imports nothing of the
package), so the vocabulary the painter, the report writer and the corpus share lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MedFinderError
from ..io.volume import Volume

#: Finding labels the generator produces; the names are CT-RATE's labels where they overlap, so
#: a model or parser trained here speaks the label space of real chest CT reports.
PHANTOM_FINDINGS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pleural effusion",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
    "Pneumothorax",
    "Lung mass",
)

#: Demo size: 352 x 352 mm in-plane, 320 mm of coverage (thoracic inlet to upper abdomen).
DEMO_SHAPE: tuple[int, int, int] = (160, 160, 128)
DEMO_SPACING: tuple[float, float, float] = (2.2, 2.2, 2.5)

#: Manifest columns before the per-finding 0/1 columns and after them.
MANIFEST_HEAD = ("case_id", "image", "report")
MANIFEST_TAIL = ("sex", "age")

#: Tissue codes of ``PhantomCase.tissue`` (where a structure covers more than half a voxel).
TISSUE_CODES: dict[str, int] = {
    "air": 0,            # outside the patient
    "table": 1,
    "skin": 2,
    "fat": 3,
    "muscle": 4,
    "cortical_bone": 5,
    "marrow": 6,
    "cartilage": 7,      # costal cartilage, intervertebral discs
    "lung": 8,
    "lung_vessel": 9,
    "airway": 10,        # air in trachea, bronchi, air bronchograms
    "blood": 11,         # heart chambers and great vessels
    "myocardium": 12,
    "organ": 13,         # liver, spleen, thyroid
    "gut": 14,           # oesophagus, stomach wall and contents
    "gut_air": 15,
    "csf": 16,
    "fluid": 17,         # pleural or pericardial effusion
    "lesion": 18,        # nodule, mass, consolidation, atelectasis, node...
    "ground_glass": 19,
    "low_attenuation": 20,  # emphysema
    "pleural_air": 21,   # pneumothorax
    "calcium": 22,
    "metal": 23,
}

#: The lobes a lung finding can sit in (``PhantomFinding.lobe``); the report writer names them.
LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")


class PhantomError(MedFinderError):
    """Bad arguments to the phantom generator (shape, spacing, counts, output folder)."""


@dataclass
class PhantomFinding:
    """One finding as painted: where it is, how big, and which voxels show it.

    ``center_vox`` are (x, y, z) indices into ``Volume.hu``; ``center_mm`` the same point in the
    Volume's RAS world coordinates; ``size_mm`` the largest diameter (or thickness for effusions
    and pneumothorax, which is what a report gives). ``bbox`` is ((x0, x1), (y0, y1), (z0, z1)),
    half-open voxel ranges of the box the finding was painted in (its shapes' extent plus a voxel
    of margin, so usually a little larger than what shows); ``mask_crop`` is the visible part
    inside it; ``mask()`` returns the full-size boolean voxel mask and ``mask_bbox()`` the tight
    box around it.
    """

    name: str
    center_vox: tuple[int, int, int]
    center_mm: tuple[float, float, float]
    size_mm: float
    side: str | None = None
    lobe: str | None = None
    severity: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0), (0, 0))
    mask_crop: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), bool), repr=False)
    volume_shape: tuple[int, int, int] = (0, 0, 0)

    def mask(self) -> np.ndarray:
        """Boolean mask over the whole volume: the voxels where this finding was painted."""
        full = np.zeros(self.volume_shape, dtype=bool)
        (x0, x1), (y0, y1), (z0, z1) = self.bbox
        full[x0:x1, y0:y1, z0:z1] = self.mask_crop
        return full

    def mask_bbox(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None:
        """The tight half-open voxel box of the visible mask (each face touches it), or None if empty.

        This, not ``bbox``, is the ground-truth box of a finding: ``bbox`` is padded for painting.
        """
        if not self.mask_crop.any():
            return None
        box = []
        for axis, (start, _) in enumerate(self.bbox):
            hit = np.flatnonzero(self.mask_crop.any(axis=tuple(a for a in range(3) if a != axis)))
            box.append((start + int(hit[0]), start + int(hit[-1]) + 1))
        return box[0], box[1], box[2]

    @property
    def voxel_count(self) -> int:
        return int(self.mask_crop.sum())


@dataclass
class PhantomCase:
    """A synthetic chest CT with its report, labels and the truth behind them."""

    case_id: str
    volume: Volume
    report: str
    labels: dict[str, int]
    findings: list[PhantomFinding]
    sex: str
    age: int
    contrast: bool
    tissue: np.ndarray = field(repr=False)

    def manifest_row(self, image: str) -> list[str]:
        return ([self.case_id, image, self.report]
                + [str(self.labels[name]) for name in PHANTOM_FINDINGS]
                + [self.sex, str(self.age)])
