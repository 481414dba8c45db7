"""What a typed query asks for: findings (lay words and symptoms resolved through the lexicon),
exclusions ("without", "no"), alternatives ("or"), a preferred side, and free words.

"right pleural effusion and atelectasis without pneumothorax" becomes two parts (each a set of
canonical findings, any of which answers it), one excluded finding, the side "right" and no free
words. The keyword index (``medfinder.index.keywords``) and the highlights read the same object.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import ReportError
from .lexicon import Lexicon
from .reports import ReportParser

WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_INCLUDE_SEPARATORS = {"and", "with", "plus", "&", "+", "also", "but"}
_SOFT_SEPARATORS = {",", ";"}
_OR_SEPARATORS = {"or", "nor", "/"}
_EXCLUDERS = {"without", "no", "not", "excluding", "except", "minus", "non", "none", "absent"}


@dataclass(frozen=True)
class QueryPart:
    """One thing asked for (or excluded): any of ``findings`` answers it."""

    text: str
    findings: tuple[str, ...]
    laterality: str | None = None
    exclude: bool = False


@dataclass
class KeywordQuery:
    """A keyword query resolved through the lexicon."""

    text: str
    parts: list[QueryPart] = field(default_factory=list)
    free_words: list[str] = field(default_factory=list)
    excluded_words: list[str] = field(default_factory=list)

    @property
    def include_findings(self) -> list[str]:
        return _unique(name for p in self.parts if not p.exclude for name in p.findings)

    @property
    def exclude_findings(self) -> list[str]:
        return _unique(name for p in self.parts if p.exclude for name in p.findings)

    @property
    def laterality(self) -> str | None:
        return next((p.laterality for p in self.parts if p.laterality and not p.exclude), None)

    @property
    def is_empty(self) -> bool:
        return not self.parts and not self.free_words and not self.excluded_words


def parse_query(text: str, lexicon: Lexicon | None = None) -> KeywordQuery:
    """Resolve a typed query: findings (with lay words and symptoms expanded), operators
    "and" / "with", "without" / "no" / "not" (exclude), "or", sides, and free words."""
    if not isinstance(text, str):
        raise ReportError(f"The search query is a {type(text).__name__}, not text.")
    if len(text) > 1000:
        raise ReportError(f"The search query is {len(text):,} characters long; keep it under 1,000.")
    parser = ReportParser.for_lexicon(lexicon)
    lex = parser.lexicon
    # "-bulla" means "not bulla"; spaCy keeps the hyphen on the word, so spell it out.
    doc = parser.nlp.make_doc(re.sub(r"(?:(?<=\s)|^)-(?=\w)", "not ", text))
    matches = parser.phrase_matches(doc)
    mentions = parser.find_mentions(doc, for_query=True, matches=matches)
    side_of = {}
    for kind, side, start, end in matches:
        if kind == "S":
            for i in range(start, end):
                side_of[i] = side
    by_start: dict[int, tuple[int, list[str]]] = {}
    for m in mentions:
        end, names = by_start.setdefault(m.extent_start, (m.extent_end, []))
        by_start[m.extent_start] = (max(end, m.extent_end), names + [m.name])

    query = KeywordQuery(text=text)
    state = {"exclude": False, "or": False}
    segment: list[tuple[str, tuple[str, ...]]] = []  # (words, findings) in this segment
    sides: set[str] = set()
    words: list[str] = []

    def close_segment() -> None:
        side = None
        if sides:
            side = "bilateral" if "bilateral" in sides or {"right", "left"} <= sides else next(iter(sides))
        for part_text, names in segment:
            lateral = side if any(lex.is_lateralized(n) for n in names) else None
            last = query.parts[-1] if query.parts else None
            if state["or"] and last is not None and last.exclude == state["exclude"]:
                # "A or B" is one part that either finding answers.
                query.parts[-1] = QueryPart(f"{last.text} or {part_text}", tuple(_unique(last.findings + names)),
                                            last.laterality or lateral, last.exclude)
            else:
                query.parts.append(QueryPart(part_text, names, lateral, state["exclude"]))
            state["or"] = False
        target = query.excluded_words if state["exclude"] else query.free_words
        target.extend(_unique(w for w in words if w not in target))
        segment.clear()
        sides.clear()
        words.clear()

    i = 0
    while i < len(doc):
        token = doc[i]
        if i in by_start:
            end, names = by_start[i]
            segment.append((doc[i:end].text, tuple(_unique(sorted(names)))))
            i = end
            continue
        low = token.lower_
        if low in _INCLUDE_SEPARATORS:
            close_segment()
            state["exclude"] = state["or"] = False
        elif low in _OR_SEPARATORS:
            close_segment()
            state["or"] = True
        elif low in _SOFT_SEPARATORS:
            close_segment()
        elif low in _EXCLUDERS:
            close_segment()
            state["exclude"], state["or"] = True, False
        elif i in side_of:
            sides.add(side_of[i])
        elif not token.is_punct and not token.is_space and low not in parser.stop_words:
            words.extend(WORD_RE.findall(low))
        i += 1
    close_segment()
    return query


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)
