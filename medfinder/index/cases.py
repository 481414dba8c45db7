"""The case store: one SQLite database per generation holding every case's record and thumbnail.

A committed database is opened ``immutable`` (no locks, no journal: it never changes and may sit
on read-only media); a writer works on a private copy in the next generation's folder.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from ..errors import CaseIndexError

CASES_FILE = "cases.sqlite"

_SQL_CHUNK = 500  # ids per "IN (...)": far below SQLite's variable limit on every version


_SCHEMA = """
CREATE TABLE cases (
    label INTEGER PRIMARY KEY,      -- the id of this case in every vector file
    case_id TEXT NOT NULL UNIQUE,
    report TEXT NOT NULL,
    findings TEXT NOT NULL,         -- JSON list of {name, status, laterality, start, end}
    source TEXT NOT NULL,
    shape TEXT,                     -- JSON list, NULL when there is no image
    spacing TEXT,                   -- JSON list in mm, NULL when there is no image
    metadata TEXT NOT NULL,         -- JSON object of safe fields (sex, age, body part...)
    channels TEXT NOT NULL,         -- JSON list of the vector channels holding this case
    added TEXT NOT NULL
);
-- Thumbnails live apart so that fetching records of many candidates never reads PNG pages.
CREATE TABLE thumbnails (label INTEGER PRIMARY KEY, png BLOB NOT NULL);
PRAGMA user_version = 1;
"""

_RECORD_COLUMNS = "label, case_id, report, findings, source, shape, spacing, metadata, channels"


@dataclass(frozen=True)
class StoredCase:
    """Everything stored about one case."""

    case_id: str
    label: int
    report: str
    findings: list[dict]
    source: str
    shape: tuple[int, ...] | None
    spacing: tuple[float, ...] | None
    metadata: dict
    channels: tuple[str, ...]
    thumbnail_png: bytes | None = None


def finding_dict(finding: Any) -> dict:
    keys = ("name", "status", "laterality", "start", "end")
    if isinstance(finding, dict):
        return {key: finding.get(key) for key in keys}
    return {key: getattr(finding, key, None) for key in keys}


def connect_read_only(path: Path) -> sqlite3.Connection:
    # immutable=1: a committed generation never changes, so SQLite needs no locks or journal
    # and works on read-only media.
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        db.execute("SELECT count(*) FROM cases").fetchone()
    except sqlite3.DatabaseError as error:
        raise CaseIndexError(f"The case database {path} is corrupt or not a MedFinder case database ({error}).") from error
    if version != 1:
        raise CaseIndexError(f"The case database {path} has schema version {version}, expected 1.")
    return db


# ------------------------------------------------------------------ reading
def select(db: sqlite3.Connection, sql: str, values: Sequence[Any]) -> list[tuple]:
    rows: list[tuple] = []
    for start in range(0, len(values), _SQL_CHUNK):
        chunk = list(values[start : start + _SQL_CHUNK])
        rows.extend(db.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall())
    return rows


def insert_rows(db: sqlite3.Connection, rows: list[tuple], thumbnails: list[tuple[int, bytes | None]],
                replaced: Sequence[int] = ()) -> None:
    """Insert or update case rows and thumbnails in one transaction; ``replaced`` labels (cases that
    come back under a fresh label) are removed in the same transaction."""
    with db:
        if replaced:
            db.executemany("DELETE FROM cases WHERE label = ?", [(label,) for label in replaced])
            db.executemany("DELETE FROM thumbnails WHERE label = ?", [(label,) for label in replaced])
        db.executemany(
            "INSERT INTO cases (label, case_id, report, findings, source, shape, spacing, metadata, channels, added) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(case_id) DO UPDATE SET "
            "report=excluded.report, findings=excluded.findings, source=excluded.source, "
            "shape=excluded.shape, spacing=excluded.spacing, metadata=excluded.metadata, "
            "channels=excluded.channels, added=excluded.added",
            rows,
        )
        db.executemany("DELETE FROM thumbnails WHERE label = ?", [(label,) for label, _ in thumbnails])
        db.executemany(
            "INSERT INTO thumbnails (label, png) VALUES (?, ?)",
            [(label, sqlite3.Binary(png)) for label, png in thumbnails if png],
        )


def create_database(path: Path) -> None:
    """An empty case database at ``path``."""
    db = sqlite3.connect(path)
    try:
        db.executescript(_SCHEMA)
    finally:
        db.close()


def read_records(db: sqlite3.Connection, case_ids: Sequence[str], thumbnails: bool = True) -> list[StoredCase]:
    """The stored cases of ``case_ids`` in that order (ids not stored are skipped), in one batched read."""
    rows = select(db, f"SELECT {_RECORD_COLUMNS} FROM cases WHERE case_id IN ({{}})", case_ids)
    pngs: dict[int, bytes] = {}
    if thumbnails and rows:
        pngs = dict(select(db, "SELECT label, png FROM thumbnails WHERE label IN ({})", [r[0] for r in rows]))
    by_id = {row[1]: row for row in rows}
    records = []
    for case_id in case_ids:
        row = by_id.get(case_id)
        if row is None:
            continue
        label, case_id, report, findings, source, shape, spacing, metadata, channels = row
        records.append(StoredCase(
            case_id=case_id, label=label, report=report, findings=json.loads(findings), source=source,
            shape=None if shape is None else tuple(json.loads(shape)),
            spacing=None if spacing is None else tuple(json.loads(spacing)),
            metadata=json.loads(metadata), channels=tuple(json.loads(channels)),
            thumbnail_png=bytes(pngs[label]) if label in pngs else None,
        ))
    return records


def read_thumbnails(db: sqlite3.Connection, case_ids: Sequence[str]) -> dict[str, bytes]:
    """Key-slice PNGs by case id (cases without one are left out)."""
    rows = select(
        db, "SELECT c.case_id, t.png FROM cases c JOIN thumbnails t ON t.label = c.label WHERE c.case_id IN ({})",
        list(case_ids),
    )
    return {case_id: bytes(png) for case_id, png in rows}
