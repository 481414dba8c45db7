"""Dataset layouts as cases: BIMCV-R, CT-RATE, and a tree of DICOM series.

Each adapter returns ``ManifestCase`` records, as ``read_manifest`` does for a CSV. A DICOM tree's
case ids are a hash of the folder's path relative to the root, because archive folders are often
named after patients or accession numbers, which must not end up in the index.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

from ..errors import ManifestError
from .dicom import is_dicom_file
from .manifests import (
    ManifestCase,
    _label_columns,
    _labels,
    _open_csv,
    known_finding_names,
)

log = logging.getLogger(__name__)


def _nifti_stem(path: Path) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", path.name)


def read_bimcv_r(root: str | Path) -> list[ManifestCase]:
    """Records from a BIMCV-R folder: ``CT*/ct/*.nii.gz`` plus the English report CSV.

    The report CSV (anywhere under ``root``) has columns ``path`` and ``Report_en``; ``path``
    may be relative to ``root``, a file name, or the study folder (``CT123``). Volumes without
    a report are kept with an empty report; reports whose volume is absent keep ``image=None``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"The BIMCV-R folder {root} does not exist.")
    volumes = sorted(root.glob("CT*/ct/*.nii.gz")) + sorted(root.glob("CT*/ct/*.nii"))
    report_csvs = []
    for candidate in sorted(root.rglob("*.csv")):
        columns, rows = _open_csv(candidate, "BIMCV-R report table")
        if "path" in columns and "Report_en" in columns:
            report_csvs.append((candidate, rows))
    if not report_csvs:
        raise ManifestError(f"The BIMCV-R folder {root} has no CSV with the columns 'path' and 'Report_en'.")
    if not volumes:
        raise ManifestError(f"The BIMCV-R folder {root} has no CT*/ct/*.nii.gz volumes.")

    by_relative = {v.relative_to(root).as_posix(): v for v in volumes}
    by_name = {v.name: v for v in volumes}
    by_study: dict[str, list[Path]] = {}
    for v in volumes:
        by_study.setdefault(v.relative_to(root).parts[0], []).append(v)

    def resolve(value: str) -> Path | None:
        value = value.strip().replace("\\", "/").lstrip("./")
        if value in by_relative:
            return by_relative[value]
        name = value.rsplit("/", 1)[-1]
        if name in by_name:
            return by_name[name]
        study = by_study.get(value.split("/", 1)[0], [])
        return study[0] if len(study) == 1 else None

    stems = [_nifti_stem(v) for v in volumes]
    unique_stems = len(set(stems)) == len(stems)

    def case_id_for(volume: Path) -> str:
        return _nifti_stem(volume) if unique_stems else f"{volume.relative_to(root).parts[0]}_{_nifti_stem(volume)}"

    records: dict[str, ManifestCase] = {}
    for csv_file, rows in report_csvs:
        for row in rows:
            volume = resolve(row.get("path", ""))
            report = row.get("Report_en", "").strip()
            if volume is None:
                raw = row.get("path", "").strip()
                if not raw:
                    continue
                log.warning("BIMCV-R report for %r in %s has no volume under %s.", raw, csv_file, root)
                case_id = _nifti_stem(Path(raw.replace("\\", "/")))
                records.setdefault(case_id, ManifestCase(case_id, None, report, metadata={"missing_image": raw}))
                continue
            case_id = case_id_for(volume)
            records[case_id] = ManifestCase(
                case_id, volume, report, metadata={"patient_id": volume.relative_to(root).parts[0]}
            )
    for volume in volumes:
        case_id = case_id_for(volume)
        if case_id not in records:
            records[case_id] = ManifestCase(case_id, volume, "", metadata={"patient_id": volume.relative_to(root).parts[0]})
    return sorted(records.values(), key=lambda r: r.case_id)


_CT_RATE_NAME = re.compile(r"^(?P<split>[a-z]+)_(?P<patient>\d+)_(?P<scan>[a-z]+)_(?P<recon>\d+)$")


def read_ct_rate(root: str | Path) -> list[ManifestCase]:
    """Records from a CT-RATE folder: ``<split>_<patient>_<scan>_<recon>.nii.gz`` volumes anywhere
    under ``root``, a reports CSV (``VolumeName``, ``Findings_EN``, ``Impressions_EN``) and,
    if present, a label CSV (``VolumeName`` plus 0/1 finding columns)."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"The CT-RATE folder {root} does not exist.")
    volumes = {_nifti_stem(v): v for v in sorted(root.rglob("*.nii.gz")) if _CT_RATE_NAME.match(_nifti_stem(v))}
    reports: dict[str, str] = {}
    labels: dict[str, dict[str, int]] = {}
    names = known_finding_names()
    found_reports = False
    for candidate in sorted(root.rglob("*.csv")):
        columns, rows = _open_csv(candidate, "CT-RATE table")
        if "VolumeName" not in columns:
            continue
        if "Findings_EN" in columns and "Impressions_EN" in columns:
            found_reports = True
            for row in rows:
                parts = []
                if row["Findings_EN"].strip():
                    parts.append("Findings: " + row["Findings_EN"].strip())
                if row["Impressions_EN"].strip():
                    parts.append("Impression: " + row["Impressions_EN"].strip())
                reports[_nifti_stem(Path(row["VolumeName"].strip()))] = "\n".join(parts)
        else:
            label_columns = _label_columns(columns, rows, names)
            for row in rows:
                labels[_nifti_stem(Path(row["VolumeName"].strip()))] = _labels(row, label_columns)
    if not found_reports:
        raise ManifestError(
            f"The CT-RATE folder {root} has no CSV with the columns 'VolumeName', 'Findings_EN' and 'Impressions_EN'."
        )
    records = []
    for case_id in sorted(set(volumes) | set(reports)):
        match = _CT_RATE_NAME.match(case_id)
        metadata: dict[str, Any] = {}
        if match:
            metadata["patient_id"] = f"{match['split']}_{match['patient']}"
        records.append(
            ManifestCase(case_id, volumes.get(case_id), reports.get(case_id, ""), labels.get(case_id, {}), metadata)
        )
    return records


def read_dicom_tree(root: str | Path) -> list[ManifestCase]:
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"The DICOM tree {root} does not exist or is not a folder.")
    records = []
    for folder in sorted({p.parent for p in root.rglob("*") if p.is_file() and not p.is_symlink() and is_dicom_file(p)}):
        key = folder.relative_to(root).as_posix()
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        case_id = f"dicom-{digest}"
        records.append(ManifestCase(case_id=case_id, image=folder, report="", metadata={"source_name": case_id}))
    if not records:
        raise ManifestError(f"No DICOM files were found under {root}.")
    return records
