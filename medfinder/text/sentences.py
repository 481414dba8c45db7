"""Sentence splitting for the text tower: cheap and deterministic, unlike a parser's.

A report is embedded sentence by sentence (``report_pooling: "sentences"``), and training samples
windows of sentences; both cut here, so they always agree on where a sentence ends.
"""

from __future__ import annotations

import re

# Sentence ends: '.', '!', '?' or ';' followed by whitespace, or a line break. Decimals such as
# "3.5 cm" have no space after the dot, so they stay inside their sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\s*\n+\s*")


def split_sentences(text: str) -> list[str]:
    """The report cut at sentence ends; an empty report is one empty sentence."""
    parts = [p.strip() for p in _SENTENCE_END.split(text or "")]
    parts = [p for p in parts if p]
    return parts or [""]
