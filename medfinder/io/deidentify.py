"""De-identification of the DICOM headers MedFinder reads anything from.

The first line of defence is in ``medfinder.volume``: only an allow-list of technical fields
(modality, scanner, slice thickness, kVp, body part, kernel) and the study year ever leave a
header. This module is the second: before the allow-list is read, the header is passed through
dicognito, which applies the DICOM PS3.15 Basic Application Level Confidentiality Profile
(names, IDs, UIDs, dates and times, addresses and institution replaced or removed), and every
private tag is dropped, since a vendor's private group can hold anything. So a field added to
the allow-list by mistake still cannot carry the patient's name or number.

What it does not do: pixel data is not examined, so text burned into an image (common in
secondary captures and scanned documents, rare in CT axial slices) is not removed.
"""

from __future__ import annotations

import copy
from typing import Any

PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData


def deidentified_header(ds: Any) -> Any:
    """A de-identified copy of a pydicom dataset's header (no pixel data); ``ds`` is untouched.

    A copy, not the dataset itself: dicognito rewrites UIDs, and the caller still decodes the
    original's pixels (whose decoding can depend on those UIDs).
    """
    import pydicom
    from dicognito.anonymizer import Anonymizer

    header = pydicom.Dataset()
    for element in ds:
        if element.tag not in PIXEL_DATA_TAGS:
            header.add(copy.deepcopy(element))
    header.file_meta = copy.deepcopy(getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset())
    header.remove_private_tags()
    Anonymizer().anonymize(header)
    return header


#: Case ids of series from a PACS: this prefix and 24 hex digits (96 bits) of an HMAC.
PACS_CASE_PREFIX = "pacs-"


def series_case_id(key: bytes, series_uid: str) -> str:
    """The case id of a PACS series: a keyed hash (HMAC-SHA256) of its SeriesInstanceUID.

    Keyed, because UIDs are known to everyone with access to the PACS: a plain hash of one could be
    recomputed and matched to the index. With the key (kept in the index folder, readable by its
    owner only) rebuilds give the same ids, so a re-run skips what is already indexed.
    """
    import hashlib
    import hmac

    if len(key) < 16:
        raise ValueError("The case-id key must hold at least 16 bytes.")
    digest = hmac.new(key, str(series_uid).strip().encode("ascii", "replace"), hashlib.sha256).hexdigest()
    return f"{PACS_CASE_PREFIX}{digest[:24]}"
