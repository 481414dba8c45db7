"""What an index may store of a case's metadata, and the key behind its PACS case ids.

A manifest CSV can carry any extra column; names, dates, IDs, MRNs, accession numbers, addresses
and free-text notes are dropped by name, with one warning per field (not one per case).

Cases from a PACS are named by a keyed hash of their SeriesInstanceUID (``series_case_id``); the key
is ``case_id.key`` in the index folder, made on the first build (32 random bytes, mode 0600), so
rebuilds and the listener give a series the same id.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path

import numpy as np

from .storage import CASE_ID_KEY

log = logging.getLogger(__name__)

# Metadata keys that could identify a patient, a clinician or a study are never stored, even
# when a manifest CSV carries them as extra columns.
_IDENTIFYING_KEY = re.compile(
    r"name|birth|date|address|phone|email|accession|mrn|ssn|uid|physician|operator|patient|^id$|dob|initials|"
    r"zip|post_?code|postal|nhs|insurance|subject|hospital_?(?:number|no|num|id)|patid|(?:^|_)path$|note|comment|"
    r"radiologist|referr|free_?text",
    re.IGNORECASE,
)


_warned_keys: set[str] = set()


def safe_metadata(metadata: dict, case_id: str) -> dict:
    safe = {}
    for key, value in (metadata or {}).items():
        if _IDENTIFYING_KEY.search(str(key)):
            if key not in _warned_keys:  # once per field, not once per case of a 10^5-case build
                _warned_keys.add(key)
                log.warning("Metadata field %r (first seen on case %s) looks identifying and is never stored.", key, case_id)
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or isinstance(value, (str, int, float, bool)):
            safe[str(key)] = value
        else:
            safe[str(key)] = str(value)
    return safe

_KEY_BYTES = 32


def case_id_key(index_folder: str | os.PathLike[str]) -> bytes:
    """The key of the index's PACS case ids: read, or made on first use (0600, written atomically).

    The folder is created if needed (an index may be created in it afterwards: ``CaseIndex.create``
    accepts a folder holding only this key). A key file of the wrong size is an error, never replaced:
    a new key would give every series a new id, and the next build would index them all twice.
    """
    from ..errors import CaseIndexError

    folder = Path(index_folder)
    path = folder / CASE_ID_KEY
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            tmp = folder / f".{CASE_ID_KEY}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_bytes(_KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # never replaces a key another build wrote meanwhile
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        key = path.read_bytes()
    except OSError as error:
        raise CaseIndexError(f"The case-id key {path} cannot be read or created ({error.strerror or error}).") from None
    if len(key) != _KEY_BYTES:
        raise CaseIndexError(
            f"The case-id key {path} holds {len(key)} bytes, not {_KEY_BYTES}: it is damaged; restore it from a "
            "backup of the index (a new key would give every PACS case a new id)."
        )
    return key
