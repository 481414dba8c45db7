"""Manifest CSVs: the cases to index or train on, with the hash split every tool shares.

A manifest lists ``case_id,image,report`` then any columns: 0/1 columns named after a finding
become labels, the rest safe metadata. Every source (a manifest, BIMCV-R's layout, CT-RATE's
naming, a DICOM tree: ``medfinder.io.datasets``) becomes a list of ``ManifestCase``.

Splits are decided by a hash of the case's patient key (``metadata["patient_id"]`` when the
source knows it, else ``case_id``): 80 % train, 10 % validation, 10 % test. The split of a case
never depends on which other cases are in the corpus, and the scans of one patient stay together.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import ManifestError

log = logging.getLogger(__name__)
REQUIRED_MANIFEST_COLUMNS = ("case_id", "image", "report")
#: Fractions of the hash-based split, in order; documented in the module docstring.
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclass
class ManifestCase:
    """One study: an optional CT file, its report, finding labels (0/1) and safe metadata."""

    case_id: str
    image: Path | None
    report: str
    labels: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def split_of(record: ManifestCase | str, fractions: dict[str, float] = SPLIT_FRACTIONS) -> str:
    """'train', 'val' or 'test' from a SHA-256 of the patient key (stable across corpora)."""
    if isinstance(record, ManifestCase):
        key = str(record.metadata.get("patient_id") or record.case_id)
    else:
        key = record
    position = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    cumulative = 0.0
    for name, fraction in fractions.items():
        cumulative += fraction
        if position < cumulative:
            return name
    return list(fractions)[-1]


def select_split(records: Iterable[ManifestCase], split: str) -> list[ManifestCase]:
    """Records of one split; ``"all"`` keeps every record."""
    if split == "all":
        return list(records)
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"Unknown split {split!r}; choose one of {sorted(SPLIT_FRACTIONS)} or 'all'.")
    return [r for r in records if split_of(r) == split]


def known_finding_names() -> set[str]:
    """Canonical finding names the report lexicon knows (CT-RATE's labels among them)."""
    from ..text.lexicon import Lexicon

    return set(Lexicon.default().canonical_names)


_BINARY = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}


def _as_number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def _where_not_utf8(path: Path) -> str:
    """'byte 0xe9 on line 17': the first byte of the file that is not UTF-8."""
    try:
        data = path.read_bytes()
        data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return f"byte 0x{data[exc.start]:02x} on line {line}"
    except OSError:
        pass
    return "an undecodable byte"


def _open_csv(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    if path.is_dir():
        raise ManifestError(f"The {what} {path} is a folder, not a CSV file.")
    if not path.is_file():
        raise ManifestError(f"The {what} {path} does not exist.")
    # csv refuses fields over 128 KiB by default, which would fail the whole file over one huge
    # report; the report engine refuses that case alone, with its reason, instead.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 28))
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = [c.strip() for c in (reader.fieldnames or [])]
    except UnicodeDecodeError:
        raise ManifestError(f"The {what} {path} is not UTF-8 text ({_where_not_utf8(path)}); "
                            "save it as UTF-8.") from None
    except (OSError, csv.Error) as exc:
        raise ManifestError(f"The {what} {path} cannot be read as CSV ({exc}).") from None
    rows = [{(k or "").strip(): (v or "") for k, v in row.items()} for row in rows]
    return columns, rows


def _label_columns(columns: Sequence[str], rows: list[dict[str, str]], names: set[str]) -> list[str]:
    chosen = []
    for column in columns:
        if column not in names:
            continue
        values = {row.get(column, "").strip() for row in rows} - {""}
        if values <= set(_BINARY):
            chosen.append(column)
        else:
            log.warning("Column %r has values other than 0/1; kept as metadata, not labels.", column)
    return chosen


def _labels(row: dict[str, str], columns: Iterable[str]) -> dict[str, int]:
    return {c: _BINARY[row[c].strip()] for c in columns if row.get(c, "").strip() in _BINARY}


def read_manifest(csv_path: str | Path, label_columns: Sequence[str] | None = None) -> list[ManifestCase]:
    """Records from a manifest CSV: ``case_id,image,report`` then any columns.

    0/1 columns named after a known finding (or listed in ``label_columns``) become labels;
    every other extra column is metadata (numbers parsed). ``image`` is relative to the CSV's
    folder (absolute paths are kept) and may be empty for a report-only case.
    """
    path = Path(csv_path)
    columns, rows = _open_csv(path, "manifest")
    missing = [c for c in REQUIRED_MANIFEST_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"The manifest {path} lacks the column(s) {', '.join(missing)}.")
    extra = [c for c in columns if c not in REQUIRED_MANIFEST_COLUMNS]
    if label_columns is None:
        labels = _label_columns(extra, rows, known_finding_names())
    else:
        absent = [c for c in label_columns if c not in columns]
        if absent:
            raise ManifestError(f"The manifest {path} lacks the label column(s) {', '.join(absent)}.")
        labels = list(label_columns)
    metadata_columns = [c for c in extra if c not in labels]
    records: list[ManifestCase] = []
    seen: dict[str, int] = {}
    # Absolute, so that an index built from "manifest.csv" in one folder still finds its scans
    # when the app or a search runs from another.
    folder = path.parent.absolute()
    for line, row in enumerate(rows, start=2):
        case_id = row["case_id"].strip()
        if not case_id:
            raise ManifestError(f"The manifest {path} has an empty case_id on line {line}.")
        if case_id in seen:
            raise ManifestError(
                f"The manifest {path} repeats case_id {case_id!r} on lines {seen[case_id]} and {line}."
            )
        seen[case_id] = line
        image = row["image"].strip()
        records.append(
            ManifestCase(
                case_id=case_id,
                image=(folder / image) if image else None,
                report=row["report"],
                labels=_labels(row, labels),
                metadata={c: _as_number(row[c].strip()) for c in metadata_columns if row.get(c, "").strip()},
            )
        )
    return records
