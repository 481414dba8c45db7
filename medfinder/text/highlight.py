"""A report cut into labelled segments for the app: what matches the query, what is negated."""

from __future__ import annotations

import re

from .lexicon import Lexicon
from .queries import KeywordQuery, parse_query
from .reports import Report, parse_report

Segments = list[tuple[str, str | None]]
_PRIORITY = {"match": 3, "present": 3, "uncertain": 2, "negated": 1}


def highlight(query: str | KeywordQuery | None, report: Report | str, lexicon: Lexicon | None = None) -> Segments:
    """The whole report cut into (text, label) segments for gr.HighlightedText.

    Labels: "match" (an affirmed mention of a queried finding, or a queried free word),
    "negated" (the finding is denied or resolved), "uncertain", and None for plain text.
    Without a query (an image search) every finding is marked, as ``highlight_findings``
    does.  Concatenating the segments gives the report text back unchanged.
    """
    lexicon = lexicon or Lexicon.default()
    if isinstance(query, str):
        query = parse_query(query, lexicon)
    if isinstance(report, str):
        report = parse_report(report, lexicon)
    if query is None or query.is_empty:
        return highlight_findings(report, lexicon)
    wanted: set[str] = set()
    for name in query.include_findings + query.exclude_findings:
        wanted.add(name)
        wanted.update(lexicon.descendants(name))
    marks = [(f.start, f.end, _finding_label(f.status, "match")) for f in report.findings if f.name in wanted]
    if query.free_words:
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, query.free_words)) + r")\b", re.IGNORECASE)
        marks += [(m.start(), m.end(), "match") for m in pattern.finditer(report.text)]
    return _segments(report.text, marks)


def highlight_findings(report: Report | str, lexicon: Lexicon | None = None) -> Segments:
    """Every finding mention marked "present", "negated" or "uncertain" (for image queries)."""
    if isinstance(report, str):
        report = parse_report(report, lexicon)
    return _segments(report.text, [(f.start, f.end, _finding_label(f.status, "present")) for f in report.findings])


def _finding_label(status: str, affirmed_label: str) -> str:
    return {"affirmed": affirmed_label, "uncertain": "uncertain"}.get(status, "negated")


def _segments(text: str, marks: list[tuple[int, int, str]]) -> Segments:
    """Cut ``text`` at the marks; where marks overlap the stronger label wins."""
    if not text:
        return []
    labels: list[str | None] = [None] * len(text)
    for start, end, label in sorted(marks, key=lambda m: _PRIORITY[m[2]]):
        labels[start:end] = [label] * (end - start)
    out: Segments = []
    run_start = 0
    for i in range(1, len(text) + 1):
        if i == len(text) or labels[i] != labels[run_start]:
            out.append((text[run_start:i], labels[run_start]))
            run_start = i
    return out
