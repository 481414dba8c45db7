"""A hospital's PACS: index it over DICOMweb, take the studies it pushes, query by one of its studies.

- ``build_from_dicomweb``: ``python -m index_build --dicomweb URL --out DIR`` (``medfinder.pacs.build``);
- ``StudyListener``: ``python -m medfinder listen`` (a DICOM Storage SCP, ``medfinder.pacs.listener``);
- ``study_volume`` and ``search_by_study``: ``python -m medfinder search --dicomweb URL --study UID``;
- ``viewer_link``: "Open in PACS viewer" for an index built with ``--link-to-pacs``.

The DICOMweb client, the case stream and the SR reader live below, in ``medfinder.io``; this package
holds what needs the index or the searcher. Documentation: docs/pacs.md.
"""

from __future__ import annotations

import os
from urllib.parse import quote

from ..io.dicomweb import PacsClient, parse_pacs_source
from .build import build_from_dicomweb, index_is_identifiable
from .listener import StudyListener
from .study import MAIN_SERIES_RULE, search_by_study, study_volume

#: The viewer URL template: ``{study}`` and ``{series}`` are replaced by the case's UIDs.
VIEWER_URL_ENV = "MEDFINDER_VIEWER_URL"


def viewer_link(template: str | None, source: str | None) -> str | None:
    """The PACS viewer's URL for a linked case (its source holds its UIDs), or None.

    ``template`` is e.g. ``http://pacs:8042/ohif/viewer?StudyInstanceUIDs={study}``; only ``{study}`` and
    ``{series}`` are filled in, so a template with other braces is used as it is.
    """
    uids = parse_pacs_source(source)
    if not template or uids is None:
        return None
    study, series = (quote(u, safe="") for u in uids)
    return template.replace("{study}", study).replace("{series}", series)


def viewer_template() -> str | None:
    return os.environ.get(VIEWER_URL_ENV) or None


__all__ = [
    "MAIN_SERIES_RULE",
    "PacsClient",
    "StudyListener",
    "VIEWER_URL_ENV",
    "build_from_dicomweb",
    "index_is_identifiable",
    "search_by_study",
    "study_volume",
    "viewer_link",
    "viewer_template",
]
