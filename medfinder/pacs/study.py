"""Query by a study in the PACS: fetch its CT series, choose the main one, and search with it.

The main series of a study (``MAIN_SERIES_RULE``): among its CT series that form a valid volume (by the
rules ``load_volume`` applies; localizers, dose reports and secondary captures left out), the axial
ones (slice normal closest to the patient's head-foot axis) come first; among them the one with the
most slices; on a tie, the thinnest slice step; on a further tie, the first the PACS lists. A study
with no axial volume falls back to its other volumes by the same order.

What the PACS returns is treated as an upload: held in memory for the query, never written to disk or
to the index, and named "the PACS study" in every sentence, never by its UIDs or accession number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MedFinderError, SeriesSkipped
from ..io.dicomweb import PacsClient, read_series
from ..io.volume import Volume
from ..search import SearchResult, Searcher

log = logging.getLogger(__name__)

MAIN_SERIES_RULE = ("the valid CT volume that is axial, then has the most slices, then the thinnest slice step, "
                    "then comes first in the PACS's listing")
STUDY_LABEL = "the PACS study"


@dataclass(frozen=True)
class _Candidate:
    volume: Volume
    axial: bool
    slices: int
    step_mm: float
    order: int

    def rank(self) -> tuple:
        return (not self.axial, -self.slices, self.step_mm, self.order)


def is_axial(orientation: Any) -> bool:
    """Whether slices with this ImageOrientationPatient are axial: their normal is closest to the head-foot axis."""
    try:
        values = np.asarray([float(v) for v in orientation], dtype=float)
        normal = np.abs(np.cross(values[:3], values[3:6]))
    except (TypeError, ValueError, IndexError):
        return False
    return bool(normal.size == 3 and normal[2] >= normal.max() - 1e-9)


def study_volume(client: PacsClient, study: str) -> Volume:
    """The main CT volume (``MAIN_SERIES_RULE``) of the study that ``study`` (a Study Instance UID or an
    accession number) names in the PACS; one sentence, naming no identifier, when there is none."""
    if not study or not study.strip():
        raise MedFinderError("Give a Study Instance UID or an accession number to search by.")
    found = client.find_studies(study)
    if not found:
        raise MedFinderError(f"No study with this Study Instance UID or accession number is in the PACS at {client.url}.")
    if len(found) > 1:
        raise MedFinderError(f"{len(found)} studies in the PACS at {client.url} have this accession number; "
                             "give the Study Instance UID instead.")
    study_uid = str(found[0].get("StudyInstanceUID", "") or "")
    best: _Candidate | None = None
    looked, reasons = 0, []
    for order, series in enumerate(client.series(study_uid)):
        if series.modality != "CT":
            continue
        looked += 1
        info: dict = {}
        label = f"CT series {looked} of {STUDY_LABEL}"
        try:
            volume = read_series(client.fetch_series(study_uid, series.series_uid), label, first=info)
        except SeriesSkipped as exc:
            reasons.append(exc.reason)
            log.info("%s left out: %s", label, exc)
            continue
        candidate = _Candidate(volume, is_axial(info.get("orientation")), info["slices"],
                               float(volume.metadata.get("slice_step_mm", min(volume.spacing))), order)
        if best is None or candidate.rank() < best.rank():
            best = candidate  # only the best volume so far stays in memory
    if best is None:
        why = f" ({'; '.join(sorted(set(reasons)))})" if reasons else ""
        raise MedFinderError(f"{STUDY_LABEL[0].upper()}{STUDY_LABEL[1:]} has no CT series that forms a valid volume: "
                             f"{looked} CT series looked at{why}.")
    return best.volume


def search_by_study(searcher: Searcher, client: PacsClient, study: str, k: int = 10, **search: Any) -> list[SearchResult]:
    """Cases like the study's main CT series (``study_volume``), best first."""
    return searcher.search(image=study_volume(client, study), k=k, **search)
