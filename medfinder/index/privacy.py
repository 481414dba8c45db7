"""What an index may store of a case's metadata: never a field whose name looks identifying.

A manifest CSV can carry any extra column; names, dates, IDs, MRNs, accession numbers, addresses
and free-text notes are dropped by name, with one warning per field (not one per case).
"""

from __future__ import annotations

import logging
import re

import numpy as np

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
