"""The index folder on disk: one manifest, immutable generations, a write lock, atomic commits.

Layout (the folder is the index)::

    index.json                  the commit point: format, model id and fingerprint, dims per
                                channel, counts, ANN and build settings, the current generation
                                and the SHA-256 of each of its files
    generations/000007/         the files of generation 7, never modified once written
    .write.lock                 held (flock) by the one writer

Why generations: a build killed at any moment (SIGKILL included) must leave the last good
index openable. Changes go into ``generations/<next>.partial-*``; a commit fsyncs every file,
renames the folder to its final name and only then atomically replaces ``index.json``. Until
that last rename, readers see the previous generation; after it, the new one. Readers take no
lock and can open a read-only folder.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import CaseIndexError

FORMAT = "medfinder-case-index"
FORMAT_VERSION = 1
MANIFEST = "index.json"
GENERATIONS = "generations"
WRITE_LOCK = ".write.lock"
#: The key of PACS case ids (``medfinder.index.privacy``), kept beside index.json.
CASE_ID_KEY = "case_id.key"
#: The Milvus Lite file an index with the milvus backend keeps in its folder when given no other.
LITE_FILE = "vectors.milvus.db"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def os_problem(error: OSError | sqlite3.OperationalError) -> str:
    """What is wrong with a folder that could not be written, for "the folder ..." sentences."""
    if not isinstance(error, OSError):  # sqlite reports a full or failing disk as its own error
        return f"cannot be written ({error})"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "is read-only or not writable by this user"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "is on a full disk"
    return f"cannot be written ({error.strerror or error})"


def is_empty_or_interrupted_create(folder: Path) -> bool:
    """True for an empty folder, or one holding only what a create killed before its
    first commit leaves (the write lock, uncommitted generation folders, a Milvus Lite file, no
    index.json): the same create can then simply run again. The key of PACS case ids
    (``privacy.CASE_ID_KEY``) is made before the index, so it may be there too."""
    if (folder / MANIFEST).exists():
        return False
    return {p.name for p in folder.iterdir()} <= {WRITE_LOCK, GENERATIONS, LITE_FILE, CASE_ID_KEY}


def acquire_write_lock(folder: Path) -> Any:
    handle = open(folder / WRITE_LOCK, "a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        handle.close()
        raise CaseIndexError(f"The case index at {folder} is already open for writing by another process.") from error
    return handle


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise CaseIndexError(f"The folder {folder} is not a MedFinder case index: it has no {MANIFEST}.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CaseIndexError(f"The index manifest {path} cannot be read as JSON ({error}).") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CaseIndexError(f"The file {path} is not a MedFinder case index manifest.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CaseIndexError(
            f"The case index {path} has format version {manifest.get('format_version')}, "
            f"but this MedFinder reads version {FORMAT_VERSION}."
        )
    for key in ("model", "dims", "settings", "generation", "next_label", "files", "counts"):
        if key not in manifest:
            raise CaseIndexError(f"The index manifest {path} lacks the field {key!r}.")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    """Replace ``folder``'s index.json with ``manifest`` atomically: this is the commit point."""
    path = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # the commit point
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(folder)


def remove_stale_generations(folder: Path, generation: int, keep: set[str] = frozenset()) -> None:
    """Delete partial folders of killed runs and generations older than the previous one.

    The previous generation is kept so a reader that read index.json just before this
    commit can still open the files it names; ``keep`` names further folders in use.
    """
    keep = {f"{generation:06d}", f"{generation - 1:06d}", *keep}
    root = folder / GENERATIONS
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)
    for child in folder.glob(f".{MANIFEST}.*.tmp"):
        child.unlink(missing_ok=True)


def generation_dir(folder: Path, generation: int) -> Path:
    return folder / GENERATIONS / f"{generation:06d}"
