"""Report text: the findings lexicon, report parsing with negation, query parsing, highlights."""

from .highlight import highlight, highlight_findings
from .lexicon import Lexicon
from .queries import KeywordQuery, QueryPart, parse_query
from .reports import Finding, Report, ReportParser, parse_report, parse_reports
from .sentences import split_sentences

__all__ = [
    "Finding",
    "KeywordQuery",
    "Lexicon",
    "QueryPart",
    "Report",
    "ReportParser",
    "highlight",
    "highlight_findings",
    "parse_query",
    "parse_report",
    "parse_reports",
    "split_sentences",
]
