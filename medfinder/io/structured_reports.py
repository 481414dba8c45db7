"""The text of DICOM structured reports: what a radiologist wrote, in document order.

A PACS often keeps the report of a CT study as a Basic Text, Enhanced or Comprehensive SR in the same
study. Only its TEXT content items are read, depth first in document order, under the headings of
the containers that hold them ("Findings:", "Impressions:"), so the report engine sees its sections.
Names of persons (PNAME items), codes, dates and UIDs in the tree are never read, and neither is the
header: the report carries no identifier that the SR's header holds.

Dose reports (X-ray and radiopharmaceutical radiation dose SRs) are structured reports too, but
numbers about a scan, not a report of it: ``is_dose_report`` tells them apart.
"""

from __future__ import annotations

from typing import Any

#: SR classes whose TEXT items are a radiologist's report (PS3.4 B.5: Basic Text, Enhanced, Comprehensive, 3D).
TEXT_REPORT_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
})
#: Radiation dose SRs: the scanner's dose record, never a report of findings.
DOSE_REPORT_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.73",  # Patient Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.76",  # Enhanced X-Ray Radiation Dose SR
})
#: Concept names of TEXT items that add nothing as a prefix: the text is shown alone.
_PLAIN_ITEM_NAMES = {"finding", "findings", "impression", "impressions", "conclusion", "conclusions", "text",
                     "report text", "comment", "recommendation", "recommendations", "summary", "history"}
#: A report longer than this is cut (the report engine refuses very long text; a PACS can hold anything).
MAX_REPORT_CHARS = 200_000


def is_text_report(ds: Any) -> bool:
    """True for a Basic Text, Enhanced or Comprehensive SR (whose text MedFinder reads as a report)."""
    return str(ds.get("SOPClassUID", "")) in TEXT_REPORT_SOP_CLASSES


def is_dose_report(ds: Any) -> bool:
    """True for a radiation dose SR."""
    return str(ds.get("SOPClassUID", "")) in DOSE_REPORT_SOP_CLASSES


def report_text(ds: Any) -> str:
    """The report in a text SR: its TEXT items in document order, each container's name as a heading.

    Returns "" for an SR with no text (or not a text SR). Containers nest, each a heading; the root
    container (the document's title, e.g. "Imaging Report") is not one.
    """
    if not is_text_report(ds):
        return ""
    lines: list[str] = []
    _walk(ds.get("ContentSequence") or [], lines)  # the root (the document's title) is not a heading
    text = "\n".join(lines).strip()
    return text[:MAX_REPORT_CHARS]


def _meaning(item: Any) -> str:
    names = item.get("ConceptNameCodeSequence") or []
    return str(names[0].get("CodeMeaning", "")).strip() if len(names) else ""


def _walk(items: Any, lines: list[str]) -> None:
    for item in items:
        kind = str(item.get("ValueType", "")).upper()
        name = _meaning(item)
        if kind == "TEXT":
            text = str(item.get("TextValue", "") or "").strip()
            if text:
                plain = not name or name.lower() in _PLAIN_ITEM_NAMES
                lines.append(text if plain else f"{name}: {text}")
        elif kind == "CONTAINER" and name:
            if lines and lines[-1]:
                lines.append("")
            lines.append(f"{name}:")
        children = item.get("ContentSequence")
        if children:
            _walk(children, lines)
