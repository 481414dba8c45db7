"""A DICOM tree as cases: each folder that directly holds DICOM files is one study series.

Case ids are a hash of the folder's path relative to the root, because archive folders are
often named after patients or accession numbers, which must not end up in the index.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from medfinder.datasets import CaseRecord
from medfinder.errors import ManifestError
from medfinder.volume import is_dicom_file


def read_dicom_tree(root: str | Path) -> list[CaseRecord]:
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"The DICOM tree {root} does not exist or is not a folder.")
    records = []
    for folder in sorted({p.parent for p in root.rglob("*") if p.is_file() and not p.is_symlink() and is_dicom_file(p)}):
        key = folder.relative_to(root).as_posix()
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        case_id = f"dicom-{digest}"
        records.append(CaseRecord(case_id=case_id, image=folder, report="", metadata={"source_name": case_id}))
    if not records:
        raise ManifestError(f"No DICOM files were found under {root}.")
    return records
