"""The case index: one folder holding every searchable past case.

Each generation folder (``medfinder.index.storage``) holds::

    cases.sqlite            case records (report, findings, source, shape, spacing, safe
                            metadata) and key-slice thumbnails (``medfinder.index.cases``)
    image.hnsw              one vector file per channel: image embeddings,
    report.hnsw             report embeddings in the joint space (image-to-report),
    report_text.hnsw        raw text-tower report embeddings (report-to-report)
    keywords.json           keyword postings (``medfinder.index.keywords``)

With the ``milvus`` backend a channel's vectors live in a Milvus collection instead, and its
``<channel>.milvus`` file is a small descriptor; ``medfinder.index.milvus`` states how such an index
keeps the same commit point and crash safety.

Unchanged files are hard-linked from the previous generation, so committing a small addition to
a large index does not copy the untouched channels. A writer holds the folder's write lock so two
builds cannot interleave; readers take no lock.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import CaseIndexError
from .cases import (
    CASES_FILE,
    StoredCase,
    connect_read_only,
    create_database,
    finding_dict,
    insert_rows,
    read_records,
    read_thumbnails,
    select,
)
from .hnsw import HNSW_DEFAULTS, HnswIndex
from .keywords import KeywordIndex
from .privacy import safe_metadata
from .storage import (
    FORMAT,
    FORMAT_VERSION,
    GENERATIONS,
    LITE_FILE,
    MANIFEST,
    WRITE_LOCK,
    acquire_write_lock,
    fsync_dir,
    fsync_file,
    generation_dir,
    is_empty_or_interrupted_create,
    link_or_copy,
    now,
    os_problem,
    read_manifest,
    remove_stale_generations,
    sha256_file,
    write_manifest,
)
from .vectors import ExactIndex, VectorIndex, normalise

log = logging.getLogger(__name__)

KEYWORDS_FILE = "keywords.json"
BACKENDS = ("hnsw", "exact", "milvus")
_VECTOR_FILE_SUFFIX = {"hnsw": "hnsw", "exact": "npz", "milvus": "milvus"}

#: The channels MedFinder builds; an index may hold any subset (the dims given to create()).
CHANNELS = {
    "image": "image embeddings (image-to-image, and text-to-image for an aligned model)",
    "report": "report embeddings in the joint space (image-to-report)",
    "report_text": "text-tower report embeddings (report-to-report)",
}

_CHANNEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def served_channels(dims: dict[str, int]) -> dict[str, list[str]]:
    """The search channels an index answers, by query kind. A model aligned with text stores each
    report in the joint space (``report``); one that is not (the real-CT tower) serves neither
    text-to-image nor image-to-report, so its index has no such channel."""
    aligned = "report" in dims
    text = ["keyword"] + (["text"] if "report_text" in dims else []) + (["image"] if aligned and "image" in dims else [])
    image = (["image"] if "image" in dims else []) + (["report"] if aligned else [])
    return {"text": text, "image": image}


@dataclass
class CaseEntry:
    """One case to add. A case may lack an image (no "image" vector) or a report (empty text).

    ``findings`` are stored as given (Finding objects or dicts); when empty, they come from
    parsing ``report``. ``parsed_report`` lets a caller that already ran
    ``medfinder.text.reports.parse_report`` (the index build does, in its workers) skip a second parse.
    """

    case_id: str
    vectors: dict[str, np.ndarray]
    report: str = ""
    findings: list = field(default_factory=list)
    source: str = ""
    shape: Sequence[int] | None = None
    spacing: Sequence[float] | None = None
    metadata: dict = field(default_factory=dict)
    thumbnail_png: bytes | None = None
    parsed_report: Any = None


class CaseIndex:
    """An index folder opened for searching (default) or for writing (``writable=True``).

    Read-only instances are safe to share across threads. A writable instance collects changes
    from ``add``/``delete`` and makes them durable with ``commit()``; until then, other
    processes keep seeing the last committed generation. Use as a context manager or call
    ``close()`` so the write lock is released.
    """

    def __init__(
        self, folder: Path, manifest: dict, writable: bool, lock_handle: Any, verify: bool, *, empty: bool = False
    ) -> None:
        """Use ``create`` or ``open``; ``empty`` starts a new index instead of loading files."""
        self.folder = folder
        self.writable = writable
        self._manifest = manifest
        self._lock_handle = lock_handle
        self._lock = threading.RLock()
        self._dirty: set[str] = set()
        self._work_dir: Path | None = None
        self._work_db: sqlite3.Connection | None = None
        self._db: sqlite3.Connection | None = None
        self._keywords: Any = None
        self._vectors: dict[str, VectorIndex] = {}
        self._milvus: Any = None  # the MilvusClient of the milvus backend
        if empty:
            self._vectors = self._create_vectors()
            self._keywords = KeywordIndex()
            return
        try:
            self._load_generation(verify)
        except BaseException:
            if self._db is not None:
                self._db.close()
            self._close_milvus()
            raise

    # ------------------------------------------------------------------ opening and creating
    @classmethod
    def create(
        cls,
        folder: str | os.PathLike[str],
        model_id: str,
        fingerprint: str,
        dims: dict[str, int],
        settings: dict | None = None,
    ) -> "CaseIndex":
        """Make a new, empty index in ``folder`` (absent or empty) and open it for writing.

        ``settings`` may set ``backend`` ("hnsw", "exact" or "milvus"), ``M``, ``ef_construction`` and
        ``ef``; any other JSON-serialisable keys are kept as build settings (preset, manifest...).
        With ``backend="milvus"``, ``vectors`` is where the vectors go (``milvus://host:19530``, or
        ``milvus-lite``, the default: a Milvus Lite file inside the folder; see ``medfinder.index.milvus``).
        """
        folder = Path(folder)
        dims = cls._check_dims(dims)
        settings = cls._check_settings(settings or {})
        if settings["backend"] == "milvus":
            from .milvus import collection_prefix, normalise_uri

            settings["vectors"] = normalise_uri(str(settings.get("vectors") or "milvus-lite"), folder)
            settings["collection_prefix"] = collection_prefix()
        if not model_id or not fingerprint:
            raise CaseIndexError(f"A case index at {folder} needs a model id and a model fingerprint.")
        if folder.exists() and (not folder.is_dir() or not is_empty_or_interrupted_create(folder)):
            raise CaseIndexError(f"Cannot create a case index at {folder}: it already exists and is not an empty folder.")
        made_folder = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock_handle = acquire_write_lock(folder)
        except OSError as error:
            raise CaseIndexError(f"Cannot create a case index at {folder}: the folder {os_problem(error)}.") from error
        if (folder / MANIFEST).exists():  # another writer created it meanwhile
            lock_handle.close()
            raise CaseIndexError(f"Cannot create a case index at {folder}: another process has just created one there.")
        # Holding the lock, the remains of an interrupted create are nobody's work in progress.
        shutil.rmtree(folder / GENERATIONS, ignore_errors=True)
        shutil.rmtree(folder / LITE_FILE, ignore_errors=True)
        stamp = now()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"id": model_id, "fingerprint": fingerprint},
            "dims": dims,
            "settings": settings,
            "generation": 0,
            "next_label": 0,
            "counts": {"cases": 0, **{channel: 0 for channel in dims}},
            "files": {},
            "created": stamp,
            "updated": stamp,
        }
        try:
            index = cls(folder, manifest, True, lock_handle, False, empty=True)
        except BaseException:
            lock_handle.close()
            (folder / WRITE_LOCK).unlink(missing_ok=True)
            shutil.rmtree(folder / LITE_FILE, ignore_errors=True)
            if made_folder:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        try:
            index._begin_write()
            index._dirty.update({CASES_FILE, KEYWORDS_FILE, *dims})
            index.commit()
        except BaseException:
            # Leave the folder as it was found, so that create can simply be run again.
            index._drop_created_collections()
            index.close()
            shutil.rmtree(folder / GENERATIONS, ignore_errors=True)
            shutil.rmtree(folder / LITE_FILE, ignore_errors=True)
            (folder / WRITE_LOCK).unlink(missing_ok=True)
            if made_folder:
                try:
                    folder.rmdir()
                except OSError:
                    pass
            raise
        return index

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike[str],
        fingerprint: str | None = None,
        writable: bool = False,
        *,
        verify: bool = True,
    ) -> "CaseIndex":
        """Open the last committed generation of the index in ``folder``.

        ``fingerprint``: the fingerprint of the model that will query the index; a different
        one is an error, since vectors from two models are not comparable. ``verify`` checks
        every file against its SHA-256 in index.json (a few seconds per GB).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise CaseIndexError(f"The case index folder {folder} does not exist.")
        lock_handle = None
        if writable:
            read_manifest(folder)  # a folder that is not an index must not get a lock file
            try:
                lock_handle = acquire_write_lock(folder)
            except OSError as error:
                raise CaseIndexError(f"Cannot open the case index at {folder} for writing: the folder {os_problem(error)}.") from error
        try:
            manifest = read_manifest(folder)
            if fingerprint is not None and fingerprint != manifest["model"]["fingerprint"]:
                raise CaseIndexError(
                    f"The case index at {folder} was built by model {manifest['model']['id']} with fingerprint "
                    f"{manifest['model']['fingerprint']}, but the model in use has fingerprint {fingerprint}; "
                    "rebuild the index with this model."
                )
            try:
                index = cls(folder, manifest, writable, lock_handle, verify)
            except CaseIndexError:
                # A writer may have committed (and pruned an old generation) while this reader
                # was loading: one more try on the new generation tells that apart from damage.
                newer = read_manifest(folder)
                if writable or newer["generation"] == manifest["generation"]:
                    raise
                index = cls(folder, newer, writable, lock_handle, verify)
        except BaseException:
            if lock_handle is not None:
                lock_handle.close()
            raise
        if writable:
            index._remove_stale_generations()
            try:
                index._recover_milvus()
            except BaseException:
                index.close()
                raise
        return index

    @staticmethod
    def _check_dims(dims: dict[str, int]) -> dict[str, int]:
        if not dims:
            raise CaseIndexError("A case index needs at least one vector channel in dims.")
        checked = {}
        for channel, dim in dims.items():
            if not isinstance(channel, str) or not _CHANNEL_NAME.match(channel):
                raise CaseIndexError(f"The channel name {channel!r} must be lower-case letters, digits and underscores.")
            if not isinstance(dim, (int, np.integer)) or int(dim) <= 0:
                raise CaseIndexError(f"The dimension of channel {channel!r} must be a positive integer, not {dim!r}.")
            checked[channel] = int(dim)
        return checked

    @staticmethod
    def _check_settings(settings: dict) -> dict:
        merged = {"backend": "hnsw", "space": "cosine", **HNSW_DEFAULTS, **settings}
        if merged["backend"] not in BACKENDS:
            raise CaseIndexError(f"The index backend {merged['backend']!r} is not one of {', '.join(BACKENDS)}.")
        if merged["space"] != "cosine":
            raise CaseIndexError("The case index searches by cosine similarity only.")
        for key in HNSW_DEFAULTS:
            if not isinstance(merged[key], (int, np.integer)) or int(merged[key]) <= 0:
                raise CaseIndexError(f"The index setting {key} must be a positive integer, not {merged[key]!r}.")
            merged[key] = int(merged[key])
        try:
            json.dumps(merged)
        except TypeError as error:
            raise CaseIndexError(f"The index settings must be JSON values ({error}).") from error
        return merged

    def _create_vectors(self) -> dict[str, VectorIndex]:
        """The empty vector backends of a new index (for Milvus: its new collections)."""
        settings = self._manifest["settings"]
        dims = self._manifest["dims"]
        if settings["backend"] == "exact":
            return {channel: ExactIndex(dim) for channel, dim in dims.items()}
        if settings["backend"] == "milvus":
            from .milvus import MilvusIndex

            self._milvus = self._connect_milvus()
            made: dict[str, VectorIndex] = {}
            try:
                for channel, dim in dims.items():
                    made[channel] = MilvusIndex.create(self._milvus, self._collection(channel), dim, settings["vectors"])
            except BaseException:
                self._vectors = made
                self._drop_created_collections()
                self._close_milvus()
                raise
            return made
        return {channel: HnswIndex(dim, M=settings["M"], ef_construction=settings["ef_construction"], ef=settings["ef"])
                for channel, dim in dims.items()}

    def _vector_file(self, channel: str) -> str:
        return f"{channel}.{_VECTOR_FILE_SUFFIX[self._manifest['settings']['backend']]}"

    # ------------------------------------------------------------------ the milvus backend
    def _connect_milvus(self) -> Any:
        from .milvus import connect

        return connect(self._manifest["settings"]["vectors"], self.folder)

    def _collection(self, channel: str) -> str:
        return f"{self._manifest['settings']['collection_prefix']}_{channel}"

    def _milvus_indexes(self) -> list[Any]:
        from .milvus import MilvusIndex

        return [v for v in self._vectors.values() if isinstance(v, MilvusIndex)]

    def _recover_milvus(self) -> None:
        """A writer first finishes what a killed writer left in Milvus (see ``medfinder.index.milvus``):
        rows of uncommitted batches are deleted and the committed generation's deletions applied."""
        for vectors in self._milvus_indexes():
            stale = vectors.purge_uncommitted()
            if stale:
                log.warning("Removed %d vectors of an uncommitted batch from the Milvus collection %s.",
                            stale, vectors.collection)
            vectors.apply_deletes()

    def _drop_created_collections(self) -> None:
        """Undo a create that failed: its collections belong to no index."""
        for vectors in self._milvus_indexes():
            try:
                vectors.client.drop_collection(vectors.collection)
            except Exception:  # best effort: an orphan collection is named after no index
                pass

    def _close_milvus(self) -> None:
        if self._milvus is not None:
            from .milvus import disconnect

            disconnect(self._milvus, self._manifest["settings"]["vectors"], self.folder)
            self._milvus = None

    def _generation_dir(self, generation: int | None = None) -> Path:
        return generation_dir(self.folder, self._manifest["generation"] if generation is None else generation)

    def _remove_stale_generations(self) -> None:
        in_use = {self._work_dir.name} if self._work_dir is not None else set()
        remove_stale_generations(self.folder, self._manifest["generation"], in_use)

    def _load_generation(self, verify: bool) -> None:
        directory = self._generation_dir()
        files = self._manifest["files"]
        for name, entry in files.items():
            path = directory / name
            if not path.is_file():
                raise CaseIndexError(f"The case index file {path} is missing.")
            if verify and sha256_file(path) != entry["sha256"]:
                raise CaseIndexError(f"The case index file {path} does not match its checksum in {MANIFEST}: it is corrupt or was changed.")
        for name in (CASES_FILE, KEYWORDS_FILE, *(self._vector_file(c) for c in self._manifest["dims"])):
            if name not in files:
                raise CaseIndexError(f"The index manifest {self.folder / MANIFEST} does not list the file {name}.")
        self._db = connect_read_only(directory / CASES_FILE)
        keywords_path = directory / KEYWORDS_FILE
        try:
            postings = json.loads(keywords_path.read_text(encoding="utf-8"))
            self._keywords = KeywordIndex.from_dict(postings)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise CaseIndexError(f"The keyword postings {keywords_path} cannot be read ({error}).") from error
        except CaseIndexError as error:
            raise CaseIndexError(f"The keyword postings {keywords_path} cannot be used: {str(error).rstrip('.')}.") from error
        settings = self._manifest["settings"]
        if settings["backend"] == "milvus":
            self._milvus = self._connect_milvus()
        for channel, dim in self._manifest["dims"].items():
            path = directory / self._vector_file(channel)
            if settings["backend"] == "exact":
                vectors: VectorIndex = ExactIndex.load(path, dim)
            elif settings["backend"] == "milvus":
                from .milvus import MilvusIndex

                descriptor = MilvusIndex.read_descriptor(path)
                vectors = MilvusIndex.open(self._milvus, descriptor["collection"], dim, self._manifest["next_label"],
                                           descriptor["deleted"], settings["vectors"])
            else:
                vectors = HnswIndex.load(path, dim, ef=settings["ef"])
            if len(vectors) != self._manifest["counts"].get(channel):
                raise CaseIndexError(
                    f"The vector file {path} holds {len(vectors)} vectors but {MANIFEST} records "
                    f"{self._manifest['counts'].get(channel)}."
                )
            self._vectors[channel] = vectors

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if not self.writable:
            raise CaseIndexError(f"The case index at {self.folder} was opened read-only; open it with writable=True to change it.")
        if self._lock_handle is None:
            raise CaseIndexError(f"The case index at {self.folder} has been closed.")

    def _begin_write(self) -> None:
        """Start the next generation's working folder with a private copy of the case database."""
        self._require_writable()
        if self._work_db is not None:
            return
        work = self.folder / GENERATIONS / f"{self._manifest['generation'] + 1:06d}.partial-{uuid.uuid4().hex[:8]}"
        try:
            work.mkdir(parents=True)
            db_path = work / CASES_FILE
            if self._db is not None:
                # A committed database is never modified, so a plain (in-kernel) copy is a
                # consistent snapshot. This is the O(size) cost of a commit on a large index.
                shutil.copyfile(self._generation_dir() / CASES_FILE, db_path)
            else:
                create_database(db_path)
            self._work_db = sqlite3.connect(db_path, check_same_thread=False)
        except (OSError, sqlite3.OperationalError) as error:
            shutil.rmtree(work, ignore_errors=True)
            raise CaseIndexError(f"Cannot write to the case index at {self.folder}: the folder {os_problem(error)}.") from error
        self._work_dir = work

    def _reader(self) -> sqlite3.Connection:
        db = self._work_db if self._work_db is not None else self._db
        if db is None:
            raise CaseIndexError(f"The case index at {self.folder} has been closed.")
        return db

    def add(self, cases: Iterable[CaseEntry]) -> None:
        """Add cases; a case_id already in the index is replaced (its old vectors are dropped)."""
        cases = list(cases)
        if not cases:
            return
        with self._lock:
            self._require_writable()
            prepared = [self._prepare(entry) for entry in cases]
            ids = [entry.case_id for entry in cases]
            if len(set(ids)) != len(ids):
                duplicate = next(i for i in ids if ids.count(i) > 1)
                raise CaseIndexError(f"The case {duplicate!r} appears twice in one batch of cases to add.")
            reports = self._parse_reports(cases)
            self._begin_write()
            db = self._work_db
            assert db is not None
            existing = {row[1]: (row[0], json.loads(row[2])) for row in select(
                db, "SELECT label, case_id, channels FROM cases WHERE case_id IN ({})", ids)}
            # Milvus rows are only hidden by their label until a commit (medfinder.index.milvus), so
            # there a replaced case gets a fresh label rather than overwriting a committed row.
            fresh_labels = self._manifest["settings"]["backend"] == "milvus"
            replaced: list[int] = []
            per_channel: dict[str, tuple[list[int], list[np.ndarray]]] = {c: ([], []) for c in self._manifest["dims"]}
            drops: dict[str, list[int]] = {c: [] for c in self._manifest["dims"]}
            rows, thumbnails = [], []
            next_label = self._manifest["next_label"]
            stamp = now()
            for entry, (vectors, metadata), parsed in zip(cases, prepared, reports):
                findings = [finding_dict(f) for f in (entry.findings or (parsed.findings if parsed is not None else []))]
                if entry.case_id in existing and not fresh_labels:
                    label, old_channels = existing[entry.case_id]
                else:
                    if entry.case_id in existing:  # a fresh label for a replaced case (milvus)
                        old_label, previous = existing[entry.case_id]
                        replaced.append(old_label)
                        for channel in previous:
                            drops[channel].append(old_label)
                    label, old_channels = next_label, []
                    next_label += 1
                for channel in old_channels:
                    if channel not in vectors:
                        drops[channel].append(label)
                for channel, vector in vectors.items():
                    per_channel[channel][0].append(label)
                    per_channel[channel][1].append(vector)
                rows.append((
                    label, entry.case_id, entry.report or "", json.dumps(findings), entry.source or "",
                    None if entry.shape is None else json.dumps([int(s) for s in entry.shape]),
                    None if entry.spacing is None else json.dumps([float(s) for s in entry.spacing]),
                    json.dumps(metadata), json.dumps(sorted(vectors)), stamp,
                ))
                thumbnails.append((label, entry.thumbnail_png))
            try:
                insert_rows(db, rows, thumbnails, replaced)
            except sqlite3.OperationalError as error:
                # The transaction rolled back and the keyword postings, vector indexes and label
                # counter are changed only below, so the batch is simply not added.
                raise self._unwritable(error, "add cases to") from error
            # Marked before memory changes: the rows are in the working database now, so the next
            # commit must write what this batch touched even if an update below fails.
            changed = {c for c, labels in drops.items() if labels} | {c for c, (labels, _) in per_channel.items() if labels}
            self._dirty.update({CASES_FILE, KEYWORDS_FILE, *changed})
            self._manifest["next_label"] = next_label
            for entry, parsed in zip(cases, reports):
                if entry.case_id in self._keywords:
                    self._keywords.remove(entry.case_id)
                if parsed is not None:
                    self._keywords.add(entry.case_id, parsed)
            for channel, labels in drops.items():
                if labels:
                    self._vectors[channel].delete(np.asarray(labels, dtype=np.int64))
            for channel, (labels, vectors_list) in per_channel.items():
                if labels:
                    self._vectors[channel].add(np.asarray(labels, dtype=np.int64), np.stack(vectors_list))

    def _prepare(self, entry: CaseEntry) -> tuple[dict[str, np.ndarray], dict]:
        """Validate one entry before anything is changed, so a bad case cannot half-apply a batch."""
        if not isinstance(entry.case_id, str) or not entry.case_id.strip():
            raise CaseIndexError(f"A case id must be a non-empty string, not {entry.case_id!r}.")
        vectors = {}
        for channel, vector in (entry.vectors or {}).items():
            if channel not in self._manifest["dims"]:
                raise CaseIndexError(
                    f"Case {entry.case_id!r} has a vector for channel {channel!r}, but the index at {self.folder} "
                    f"has only {', '.join(self._manifest['dims'])}."
                )
            vectors[channel] = normalise(vector, self._manifest["dims"][channel], f"{channel} vector of case {entry.case_id!r}")[0]
        if not isinstance(entry.report or "", str):
            raise CaseIndexError(f"The report of case {entry.case_id!r} must be text, not {type(entry.report).__name__}.")
        return vectors, safe_metadata(entry.metadata, entry.case_id)

    @staticmethod
    def _parse_reports(cases: list[CaseEntry]) -> list[Any]:
        """The parsed report of each case (None without report), parsing missing ones in one batch."""
        parsed = [entry.parsed_report for entry in cases]
        todo = [i for i, entry in enumerate(cases) if parsed[i] is None and (entry.report or "").strip()]
        if todo:
            from ..text.reports import parse_reports

            for i, report in zip(todo, parse_reports(cases[i].report for i in todo)):
                parsed[i] = report
        return parsed

    def delete(self, case_ids: Iterable[str]) -> int:
        """Remove cases (unknown ids are ignored); returns how many were removed."""
        case_ids = list(case_ids)
        with self._lock:
            self._require_writable()
            self._begin_write()
            db = self._work_db
            assert db is not None
            found = select(db, "SELECT label, case_id, channels FROM cases WHERE case_id IN ({})", case_ids)
            if not found:
                return 0
            labels = [(row[0],) for row in found]
            try:
                with db:
                    db.executemany("DELETE FROM cases WHERE label = ?", labels)
                    db.executemany("DELETE FROM thumbnails WHERE label = ?", labels)
            except sqlite3.OperationalError as error:
                raise self._unwritable(error, "remove cases from") from error
            removed = [(label, case_id, json.loads(channels)) for label, case_id, channels in found]
            self._dirty.update({CASES_FILE, KEYWORDS_FILE, *(c for _, _, channels in removed for c in channels)})
            for label, case_id, channels in removed:
                for channel in channels:
                    self._vectors[channel].delete(np.asarray([label], dtype=np.int64))
                if case_id in self._keywords:
                    self._keywords.remove(case_id)
            return len(found)

    def _unwritable(self, error: sqlite3.OperationalError, action: str) -> CaseIndexError:
        return CaseIndexError(
            f"Cannot {action} the case index at {self.folder}: its database cannot be written "
            f"({error}; is the disk full?); the last committed version is intact."
        )

    def commit(self) -> None:
        """Make every change since the last commit durable, atomically (see the module notes).

        On failure (full disk, read-only folder) the previous generation stays the index that
        everyone sees, and this instance keeps its uncommitted changes so commit can be retried.
        """
        with self._lock:
            self._require_writable()
            if not self._dirty:
                return
            work, db = self._work_dir, self._work_db
            assert work is not None and db is not None
            generation = self._manifest["generation"] + 1
            final = self._generation_dir(generation)
            renamed = False
            try:
                db.commit()
                files = self._write_components(work)
                cases = int(db.execute("SELECT count(*) FROM cases").fetchone()[0])
                # Closing removes nothing but guarantees no handle can write into a committed file.
                self._work_db = None
                db.close()
                files[CASES_FILE] = {"sha256": sha256_file(work / CASES_FILE), "bytes": (work / CASES_FILE).stat().st_size}
                for name in files:
                    fsync_file(work / name)
                fsync_dir(work)
                if final.exists():  # renamed into place by a run killed before it wrote index.json
                    shutil.rmtree(final)
                os.rename(work, final)
                renamed = True
                fsync_dir(final.parent)
                manifest = dict(self._manifest)
                manifest.update(
                    generation=generation,
                    files=files,
                    counts={"cases": cases, **{c: len(v) for c, v in self._vectors.items()}},
                    updated=now(),
                )
                write_manifest(self.folder, manifest)
            except (OSError, sqlite3.OperationalError) as error:
                self._recover_work_dir(work, final, renamed)
                raise CaseIndexError(
                    f"Cannot save the case index at {self.folder}: the folder {os_problem(error)}; "
                    "the previous version of the index is intact."
                ) from error
            except BaseException:
                self._recover_work_dir(work, final, renamed)
                raise
            self._manifest = manifest
            self._work_dir = None
            self._dirty.clear()
            if self._db is not None:
                self._db.close()
            self._db = connect_read_only(final / CASES_FILE)
            self._remove_stale_generations()
            for vectors in self._milvus_indexes():
                try:
                    vectors.committed()
                except CaseIndexError as error:
                    # Committed all the same: the rows stay hidden, and the next writer deletes them.
                    log.warning("%s The deleted cases stay hidden until the next writer removes them.", error)

    def _write_components(self, work: Path) -> dict[str, dict]:
        """Write changed vector files and keyword postings into ``work``; hard-link unchanged ones."""
        old_dir = self._generation_dir()
        files: dict[str, dict] = {}
        for name in (KEYWORDS_FILE, *(self._vector_file(c) for c in self._manifest["dims"])):
            target = work / name
            target.unlink(missing_ok=True)  # left by a failed commit attempt
            component = name if name == KEYWORDS_FILE else name.rsplit(".", 1)[0]
            if component not in self._dirty and name in self._manifest["files"]:
                link_or_copy(old_dir / name, target)
                files[name] = self._manifest["files"][name]
            elif name == KEYWORDS_FILE:
                target.write_text(json.dumps(self._keywords.to_dict(), separators=(",", ":")), encoding="utf-8")
                files[name] = {"sha256": sha256_file(target), "bytes": target.stat().st_size}
            else:
                self._vectors[component].save(target)
                files[name] = {"sha256": sha256_file(target), "bytes": target.stat().st_size}
        return files

    def _recover_work_dir(self, work: Path, final: Path, renamed: bool) -> None:
        """After a failed commit, put the working folder back so the changes can be committed later."""
        if renamed and final.exists() and not work.exists():
            try:
                os.rename(final, work)
            except OSError:
                pass
        if self._work_db is None and (work / CASES_FILE).exists():
            self._work_db = sqlite3.connect(work / CASES_FILE, check_same_thread=False)

    save = commit

    def close(self) -> None:
        """Release the write lock and drop uncommitted changes."""
        with self._lock:
            if self._dirty and self._lock_handle is not None and self._milvus_indexes():
                # add() has moved this instance's next_label on; the committed one is in index.json.
                # A writer applied the committed deletions when it opened or committed: none stay hidden.
                try:
                    committed_next_label = int(read_manifest(self.folder)["next_label"])
                except CaseIndexError:
                    committed_next_label = None
                if committed_next_label is not None:
                    for vectors in self._milvus_indexes():
                        vectors.drop_uncommitted(committed_next_label, set())
            self._close_milvus()
            if self._work_db is not None:
                self._work_db.close()
                self._work_db = None
            if self._work_dir is not None:
                shutil.rmtree(self._work_dir, ignore_errors=True)
                self._work_dir = None
            if self._lock_handle is not None:
                self._lock_handle.close()
                self._lock_handle = None
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> "CaseIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            return int(self._reader().execute("SELECT count(*) FROM cases").fetchone()[0])

    def contains(self, case_id: str) -> bool:
        with self._lock:
            return self._reader().execute("SELECT 1 FROM cases WHERE case_id = ?", (case_id,)).fetchone() is not None

    def __contains__(self, case_id: object) -> bool:
        return isinstance(case_id, str) and self.contains(case_id)

    def case_ids(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._reader().execute("SELECT case_id FROM cases")}

    @property
    def channels(self) -> dict[str, int]:
        """Vector channel name -> dimension."""
        return dict(self._manifest["dims"])

    @property
    def model_id(self) -> str:
        return self._manifest["model"]["id"]

    @property
    def fingerprint(self) -> str:
        return self._manifest["model"]["fingerprint"]

    def vector_index(self, channel: str) -> VectorIndex:
        """The backend of one channel (e.g. to tune ``ef`` for a session)."""
        if channel not in self._vectors:
            raise CaseIndexError(
                f"The case index at {self.folder} has no channel {channel!r}; it has {', '.join(self._vectors)}."
            )
        return self._vectors[channel]

    def vectors(self, channel: str) -> dict[str, np.ndarray]:
        """Every stored unit vector of ``channel``, by case id (to export embeddings or compare builds)."""
        backend = self.vector_index(channel)
        if not hasattr(backend, "vectors"):
            raise CaseIndexError(f"The {channel!r} vectors of the case index at {self.folder} live in "
                                 f"{type(backend).__name__}, which does not hand them back; read them there.")
        labels, vectors = backend.vectors()
        with self._lock:
            names = dict(self._reader().execute("SELECT label, case_id FROM cases"))
        return {names[label]: vector for label, vector in zip(labels.tolist(), vectors) if label in names}

    def query(self, channel: str, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The k cases whose ``channel`` vector is most similar to ``vector``: (case_id, cosine), best first."""
        vectors = self.vector_index(channel)
        labels, scores = vectors.query(np.asarray(vector).reshape(1, -1), k)
        if not labels.shape[1]:
            return []
        with self._lock:
            names = dict(select(self._reader(), "SELECT label, case_id FROM cases WHERE label IN ({})", labels[0].tolist()))
        return [(names[label], float(score)) for label, score in zip(labels[0].tolist(), scores[0].tolist()) if label in names]

    def keyword_search(self, query: str, k: int) -> list[tuple[str, float]]:
        """Cases whose reports match the keywords of ``query`` (the report engine's ranking)."""
        with self._lock:
            return list(self._keywords.search(query, k))

    def get(self, case_id: str) -> StoredCase:
        records = self.get_many([case_id])
        if not records:
            raise CaseIndexError(f"The case {case_id!r} is not in the case index at {self.folder}.")
        return records[0]

    def get_many(self, case_ids: Sequence[str], thumbnails: bool = True) -> list[StoredCase]:
        """Records of the given cases in the given order; ids not in the index are skipped.

        One batched query, so a searcher can fetch metadata and findings of hundreds of
        candidates to filter them; pass ``thumbnails=False`` to skip the PNG bytes.
        """
        with self._lock:
            return read_records(self._reader(), list(case_ids), thumbnails)

    def thumbnails(self, case_ids: Sequence[str]) -> dict[str, bytes]:
        """Key-slice PNGs of the given cases, by case id (cases without one are left out)."""
        with self._lock:
            return read_thumbnails(self._reader(), case_ids)

    def info(self) -> dict:
        """Counts, model and settings of the committed generation (``python -m medfinder info``)."""
        return {**self._describe(self.folder, self._manifest), "uncommitted_changes": bool(self._dirty)}

    @classmethod
    def read_info(cls, folder: str | os.PathLike[str]) -> dict:
        """``info()`` of the index in ``folder`` from its index.json alone: no file is loaded or verified."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CaseIndexError(f"The case index folder {folder} does not exist.")
        return cls._describe(folder, read_manifest(folder))

    @staticmethod
    def _describe(folder: Path, manifest: dict) -> dict:
        return {
            "folder": str(folder),
            "format_version": manifest["format_version"],
            "model": dict(manifest["model"]),
            "dims": dict(manifest["dims"]),
            "counts": dict(manifest["counts"]),
            "serves": served_channels(manifest["dims"]),
            "settings": dict(manifest["settings"]),
            "generation": manifest["generation"],
            "bytes": sum(entry["bytes"] for entry in manifest["files"].values()),
            "created": manifest["created"],
            "updated": manifest["updated"],
        }
