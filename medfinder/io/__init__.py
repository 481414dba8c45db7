"""Input: CT volumes from every format, and the cases of a manifest or a dataset layout.

Everything a clinician or a dataset hands MedFinder enters here and leaves as a ``Volume``
(HU int16, RAS+, spacing, safe metadata only) or a list of ``ManifestCase``.
"""

from .datasets import read_bimcv_r, read_ct_rate, read_dicom_tree
from .load import load_volume
from .manifests import ManifestCase, read_manifest, select_split, split_of
from .volume import Volume, volume_from_array

__all__ = [
    "ManifestCase",
    "Volume",
    "load_volume",
    "read_bimcv_r",
    "read_ct_rate",
    "read_dicom_tree",
    "read_manifest",
    "select_split",
    "split_of",
    "volume_from_array",
]
