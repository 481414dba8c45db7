"""Index a PACS over DICOMweb: ``python -m index_build --dicomweb URL --out DIR``.

The server is checked before anything is written (reachable, DICOMweb, credentials accepted); the
index folder's case-id key is read or made; then ``build_index`` takes the ``DicomwebSource``'s cases,
one series at a time, committing as it goes. A re-run adds only series not yet indexed; a build killed
or cut off from the server keeps every commit it made.

Whether the index may keep Study and Series UIDs (``--link-to-pacs``) is decided when it is created and
recorded in ``index.json`` (``settings.identifiable``); a later build that asks otherwise is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import CaseIndexError, MedFinderError
from ..index.build import BuildSummary, build_index
from ..index.case_index import CaseIndex
from ..index.privacy import CASE_ID_KEY, case_id_key
from ..io.dicomweb import DicomwebSource, PacsClient, read_report_table

#: ``settings.case_ids`` of an index built from a PACS: how its case ids were made.
CASE_ID_RULE = f"pacs- and 24 hex digits of HMAC-SHA256(key in {CASE_ID_KEY}, SeriesInstanceUID)"


def index_is_identifiable(folder: str | os.PathLike[str]) -> bool:
    """Whether the index at ``folder`` keeps Study and Series UIDs (built with ``--link-to-pacs``)."""
    return bool(CaseIndex.read_info(folder)["settings"].get("identifiable", False))


def check_link_setting(out: Path, link_to_pacs: bool) -> None:
    """Refuse to change an existing index's choice about keeping UIDs: it is made once, at creation."""
    if not (out / "index.json").exists():
        return
    identifiable = index_is_identifiable(out)
    if identifiable and not link_to_pacs:
        raise CaseIndexError(f"The index at {out} was built with --link-to-pacs and keeps Study and Series UIDs; "
                             "extend it with --link-to-pacs too, or build a new index without it.")
    if link_to_pacs and not identifiable:
        raise CaseIndexError(f"The index at {out} keeps no UIDs (it was built without --link-to-pacs); that is fixed "
                             "when an index is created: build a new index with --link-to-pacs.")


def build_from_dicomweb(
    url: str,
    out: str | os.PathLike[str],
    model: str | os.PathLike[str],
    reports: str | os.PathLike[str] | None = None,
    since: str | None = None,
    link_to_pacs: bool = False,
    client: PacsClient | None = None,
    settings: dict[str, Any] | None = None,
    **build: Any,
) -> BuildSummary:
    """Add every CT series of the PACS at ``url`` not yet in the index at ``out``.

    Args:
        url: the DICOMweb root; credentials come from the environment (``medfinder.io.dicomweb``).
        out: the index folder (created, or extended).
        model: a model folder or a built-in model name.
        reports: a CSV with ``AccessionNumber,report`` or ``StudyInstanceUID,report`` columns.
        since: only studies from this date on (YYYYMMDD).
        link_to_pacs: keep Study and Series UIDs for "Open in PACS viewer" (the index says so).
        client: a configured ``PacsClient`` (timeouts, retries); default: one for ``url``.
        settings: further index settings (e.g. ``backend``).
        **build: passed to ``build_index`` (``batch_size``, ``commit_every_s``, ``progress``, ``device``).
    """
    out = Path(out)
    check_link_setting(out, link_to_pacs)
    table = read_report_table(reports) if reports else None
    client = client or PacsClient(url)
    client.check()
    key = case_id_key(out)
    source = DicomwebSource(client, key, reports=table, since=since, link_to_pacs=link_to_pacs)
    index_settings = {**(settings or {}), "source": "dicomweb", "case_ids": CASE_ID_RULE,
                      "identifiable": bool(link_to_pacs)}
    if link_to_pacs:
        index_settings["identifiers"] = "each case's source holds its Study and Series Instance UIDs (--link-to-pacs)"
    if build.get("workers"):
        raise MedFinderError("A PACS build fetches one series at a time; --workers must be 0.")
    build.pop("workers", None)
    return build_index(source, out, model=model, settings=index_settings, workers=0, **build)
