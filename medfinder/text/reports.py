"""Read a radiology report: sections, sentences, and finding mentions with their status.

A mention is *affirmed*, *negated* ("Pleural effusion-thickening was not detected"),
*uncertain* ("pneumothorax cannot be excluded", "evaluate for embolism") or *historical*
("the effusion has resolved", anything in the clinical-information section).  Findings are
recognised with spaCy phrase matchers built from ``medfinder/lexicon.yaml`` and the
modifiers with negspacy's NegEx, run three times with trigger sets from the same file.
A blank English pipeline is used: nothing is downloaded.

Query parsing is ``medfinder.text.queries``, highlights ``medfinder.text.highlight``, and the
keyword index over parsed reports ``medfinder.index.keywords``.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import spacy
from spacy.matcher import PhraseMatcher
from spacy.pipeline import Sentencizer
from spacy.tokens import Doc, Span

from ..errors import ReportError
from .lexicon import Lexicon, spelling_variants
from .negation import SPAN_KEY, ScopedNegex

MAX_REPORT_CHARS = 100_000
STATUSES = ("affirmed", "negated", "uncertain", "historical")
NO_SECTION = "report"  # text before (or without) any recognised heading

_NEGATED, _UNCERTAIN, _HISTORICAL = "mf_negated", "mf_uncertain", "mf_historical"
# Quotes and bullets end sentences in real reports that lack full stops between an
# impression item and the next; the rest is spaCy's default list.
_EXTRA_SENTENCE_ENDS = ['"', "“", "”", "•", "·"]


@dataclass(frozen=True)
class Finding:
    """One mention of a finding in a report."""

    name: str  # canonical name from the lexicon
    text: str  # the words as written
    start: int  # character span in Report.text
    end: int
    status: str  # one of STATUSES
    laterality: str | None  # "right", "left", "bilateral" or None
    section: str


@dataclass
class Report:
    """A parsed report; ``text`` is kept exactly as given (never interpreted as markup)."""

    text: str
    sections: list[tuple[str, int, int]] = field(default_factory=list)
    sentences: list[tuple[int, int]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def present(self, include_broader: bool = False, lexicon: Lexicon | None = None) -> set[str]:
        """Canonical names of the findings the report affirms (uncertain ones excluded).

        With ``include_broader`` a ground-glass opacity also makes "Lung opacity" present.
        """
        names = {f.name for f in self.findings if f.status == "affirmed"}
        if include_broader:
            lexicon = lexicon or Lexicon.default()
            names |= {a for n in names for a in lexicon.ancestors(n)}
        return names

    def absent(self) -> set[str]:
        """Canonical names the report explicitly negates and never affirms."""
        negated = {f.name for f in self.findings if f.status == "negated"}
        return negated - self.present()


def decode_report_bytes(data: bytes, source: str = "the report") -> str:
    """Text of a report file: UTF-8 (with or without BOM), UTF-16 with BOM, else Windows-1252.

    Reports exported from hospital systems are often Windows-1252 or Latin-1; those
    decodings never fail, so a report is never lost to one bad byte.  Binary data is refused.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ReportError(f"{source} is {type(data).__name__}, not bytes.")
    data = bytes(data)
    if len(data) > 4 * MAX_REPORT_CHARS:
        raise ReportError(
            f"{source} is {len(data):,} bytes, larger than any report MedFinder reads "
            f"({MAX_REPORT_CHARS:,} characters)."
        )
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise ReportError(f"{source} starts like UTF-16 text but is not valid UTF-16.") from exc
    if b"\x00" in data:
        raise ReportError(f"{source} contains NUL bytes: it is a binary file, not a text report.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse_report(text: str, lexicon: Lexicon | None = None) -> Report:
    """Sections, sentences and finding mentions of one report."""
    return ReportParser.for_lexicon(lexicon).parse(text)


def parse_reports(texts: Iterable[str], lexicon: Lexicon | None = None, batch_size: int = 64) -> Iterator[Report]:
    """Parse many reports, in order, using spaCy's batched tokenisation."""
    return ReportParser.for_lexicon(lexicon).parse_many(texts, batch_size=batch_size)


def check_report_text(text: Any) -> str:
    """``text`` if it is a string MedFinder will parse; a ReportError naming the problem if not."""
    if isinstance(text, (bytes, bytearray)):
        raise ReportError("The report is bytes, not text: decode it with decode_report_bytes() first.")
    if not isinstance(text, str):
        raise ReportError(f"The report is a {type(text).__name__}, not text.")
    if len(text) > MAX_REPORT_CHARS:
        raise ReportError(
            f"The report is {len(text):,} characters long, over the {MAX_REPORT_CHARS:,}-character limit "
            "for one report."
        )
    return text


@dataclass(frozen=True)
class Mention:
    """A finding matched in a spaCy doc: the anchor tokens carry negation; extent is shown."""

    name: str
    anchor_start: int  # token indices
    anchor_end: int
    extent_start: int
    extent_end: int


class ReportParser:
    """A spaCy pipeline built from one lexicon; reuse it (building takes ~1 s)."""

    def __init__(self, lexicon: Lexicon | None = None) -> None:
        self.lexicon = lexicon or Lexicon.default()
        lex = self.lexicon
        self.nlp = spacy.blank("en")
        # Split at angle brackets so "effusion</b>" in a report pasted with markup still
        # yields the word "effusion" (the text itself is never changed or interpreted).
        infixes = list(self.nlp.Defaults.infixes) + [r"[<>]"]
        self.nlp.tokenizer.infix_finditer = spacy.util.compile_infix_regex(infixes).finditer
        prefixes = list(self.nlp.Defaults.prefixes) + [r"[<>]"]
        self.nlp.tokenizer.prefix_search = spacy.util.compile_prefix_regex(prefixes).search
        suffixes = list(self.nlp.Defaults.suffixes) + [r"[<>]"]
        self.nlp.tokenizer.suffix_search = spacy.util.compile_suffix_regex(suffixes).search
        self.nlp.add_pipe("sentencizer", config={
            "punct_chars": sorted(set(Sentencizer.default_punct_chars) | set(_EXTRA_SENTENCE_ENDS))})
        self.stop_words = frozenset(self.nlp.Defaults.stop_words)

        # Two matchers: lower-cased phrases, and case-sensitive abbreviations.  Match ids
        # encode what matched: F|finding, L|finding (lay, queries only), P|pointer,
        # T|group (contextual term), C|group|rule (cue), S|side (laterality word).
        self._lower = PhraseMatcher(self.nlp.vocab, attr="LOWER")
        self._exact = PhraseMatcher(self.nlp.vocab, attr="ORTH")
        tok = self.nlp.tokenizer
        for entry in lex.findings.values():
            self._add(self._lower, f"F|{entry.name}", entry.terms)
            self._add(self._lower, f"L|{entry.name}", entry.lay)
            if entry.abbreviations:
                self._exact.add(f"F|{entry.name}", [tok(a) for a in entry.abbreviations])
        for phrase in lex.query_pointers:
            self._add(self._lower, f"P|{phrase}", [phrase])
        for g, ctx in enumerate(lex.contextual):
            if ctx.case_sensitive:
                self._exact.add(f"T|{g}", [tok(t) for t in ctx.terms])
            else:
                self._add(self._lower, f"T|{g}", ctx.terms)
            for r, rule in enumerate(ctx.rules):
                self._add(self._lower, f"C|{g}|{r}", rule.cues)
        for side, words in lex.laterality_words.items():
            self._add(self._lower, f"S|{side}", words)

        self._modifiers = [
            ScopedNegex(self.nlp, "negation", lex.negation.as_negspacy_termset(), _NEGATED, lex.negation.scope),
            ScopedNegex(self.nlp, "uncertainty", lex.uncertainty.as_negspacy_termset(), _UNCERTAIN,
                         lex.uncertainty.scope),
            ScopedNegex(self.nlp, "historical", lex.historical.as_negspacy_termset(), _HISTORICAL,
                         lex.historical.scope),
        ]
        headings = sorted({h for s in lex.sections for h in s.headings}, key=len, reverse=True)
        self._heading_section = {h.lower(): s for s in lex.sections for h in s.headings}
        self._section_status = {s.name: s.mentions_are for s in lex.sections if s.mentions_are}
        self._heading_re = re.compile(
            r"(?im)(?:^|(?<=[.!?]))[ \t]*[#*\-•]*[ \t]*(?P<h>"
            + "|".join(re.escape(h).replace(r"\ ", r"\s+") for h in headings)
            + r")[ \t]*(?::|$)"
        ) if headings else None
        answers = sorted(lex.negating_answers, key=len, reverse=True)
        # "Pneumothorax: none." right after the finding's own label, on the same line.
        self._negating_answer_re = re.compile(
            r"(?i)[ \t]*[:\-\u2013][ \t]*(?:" + "|".join(re.escape(a).replace(r"\ ", r"[ \t]+") for a in answers)
            + r")[ \t]*(?:[.,;]|$|(?=\n))", re.MULTILINE
        ) if answers else None

    @staticmethod
    @lru_cache(maxsize=4)
    def _cached(lexicon: Lexicon) -> "ReportParser":
        return ReportParser(lexicon)

    @classmethod
    def for_lexicon(cls, lexicon: Lexicon | None = None) -> "ReportParser":
        """A shared parser for ``lexicon`` (the default one when None)."""
        return cls._cached(lexicon or Lexicon.default())

    def _add(self, matcher: PhraseMatcher, key: str, phrases: Iterable[str]) -> None:
        variants = sorted({v for p in phrases for v in spelling_variants(p)})
        if variants:
            matcher.add(key, list(self.nlp.tokenizer.pipe(variants)))

    # ------------------------------------------------------------------ reports
    def parse(self, text: str) -> Report:
        text = check_report_text(text)
        return self._read(self.nlp(text))

    def parse_many(self, texts: Iterable[str], batch_size: int = 64) -> Iterator[Report]:
        checked = (check_report_text(t) for t in texts)
        for doc in self.nlp.pipe(checked, batch_size=batch_size):
            yield self._read(doc)

    def _read(self, doc: Doc) -> Report:
        text = doc.text
        sections = self._sections(text)
        self._break_sentences(doc, sections)
        matches = self.phrase_matches(doc)
        mentions = self.find_mentions(doc, matches=matches)
        doc.spans[SPAN_KEY] = [Span(doc, m.anchor_start, m.anchor_end, label=m.name) for m in mentions]
        for modifier in self._modifiers:
            modifier(doc)
        section_starts = [s for _, s, _ in sections]
        sentence_of = _SentenceIndex(doc)
        lateral = sorted((start, end, rest) for kind, rest, start, end in matches if kind == "S")
        findings = []
        for m, span in zip(mentions, doc.spans[SPAN_KEY]):
            start_char = doc[m.extent_start].idx
            end_char = doc[m.extent_end - 1].idx + len(doc[m.extent_end - 1].text)
            section = sections[bisect.bisect_right(section_starts, start_char) - 1][0] if sections else NO_SECTION
            status = self._status(span, section)
            if self._negating_answer_re is not None and self._negating_answer_re.match(text, end_char):
                status = "negated"
            side = None
            if self.lexicon.is_lateralized(m.name):
                side = self._laterality(m, mentions, sentence_of, lateral)
            findings.append(Finding(m.name, text[start_char:end_char], start_char, end_char, status, side, section))
        findings.sort(key=lambda f: (f.start, f.end, f.name))
        sentences = [(s.start_char, s.end_char) for s in doc.sents if s.text.strip()]
        return Report(text=text, sections=sections, sentences=sentences, findings=findings)

    def _status(self, span: Span, section: str) -> str:
        if span._.get(_NEGATED):
            return "negated"
        if span._.get(_HISTORICAL):
            return "historical"
        if section in self._section_status:
            return self._section_status[section]
        if span._.get(_UNCERTAIN):
            return "uncertain"
        return "affirmed"

    def _sections(self, text: str) -> list[tuple[str, int, int]]:
        if not text.strip():
            return []
        starts: list[tuple[str, int]] = []
        if self._heading_re is not None:
            for match in self._heading_re.finditer(text):
                heading = re.sub(r"\s+", " ", match.group("h").lower())
                starts.append((self._heading_section[heading].name, match.start("h")))
        if not starts or text[: starts[0][1]].strip():
            starts.insert(0, (NO_SECTION, 0))
        bounds = [s for _, s in starts[1:]] + [len(text)]
        return [(name, start, end) for (name, start), end in zip(starts, bounds)]

    @staticmethod
    def _break_sentences(doc: Doc, sections: list[tuple[str, int, int]]) -> None:
        # A line break or a section heading ends a sentence even without a full stop:
        # "FINDINGS\nNo effusion\nMild atelectasis" must not negate the atelectasis.
        heading_starts = {start for _, start, _ in sections if start > 0}
        if "\n" not in doc.text and not heading_starts:
            return
        for token in doc[1:]:
            prev = doc[token.i - 1]
            if "\n" in prev.text_with_ws or token.idx in heading_starts:
                if not token.is_space:
                    token.is_sent_start = True

    # ------------------------------------------------------------------ matching
    def phrase_matches(self, doc: Doc) -> list[tuple[str, str, int, int]]:
        """Every lexicon phrase in ``doc`` as (kind, key, start token, end token)."""
        strings = self.nlp.vocab.strings
        out = []
        for match_id, start, end in list(self._lower(doc)) + list(self._exact(doc)):
            kind, _, rest = strings[match_id].partition("|")
            out.append((kind, rest, start, end))
        return out

    def find_mentions(self, doc: Doc, for_query: bool = False,
                      matches: list[tuple[str, str, int, int]] | None = None) -> list[Mention]:
        """Finding mentions in ``doc``: longest phrases first, then contextual words."""
        plain: dict[tuple[int, int], set[str]] = {}
        ctx_terms: dict[int, list[tuple[int, int]]] = {}
        cues: dict[int, list[tuple[int, int, int]]] = {}
        for kind, rest, start, end in matches if matches is not None else self.phrase_matches(doc):
            if kind == "F" or (for_query and kind == "L"):
                plain.setdefault((start, end), set()).add(rest)
            elif kind == "P" and for_query:
                plain.setdefault((start, end), set()).update(self.lexicon.query_pointers[rest])
            elif kind == "T":
                ctx_terms.setdefault(int(rest), []).append((start, end))
            elif kind == "C":
                g, r = rest.split("|")
                cues.setdefault(int(g), []).append((int(r), start, end))

        chosen = _longest_first(plain)
        taken = [span for span, _ in chosen]
        mentions = [Mention(name, s, e, s, e) for (s, e), names in chosen for name in sorted(names)]
        sentence_of = _SentenceIndex(doc)
        for g, spans in ctx_terms.items():
            ctx = self.lexicon.contextual[g]
            # Longest cue wins too: "coronary arteries" is a coronary cue, not an arterial one.
            # Cues may lie inside a finding phrase: in "pericardial thickening-effusion" the
            # effusion is pericardial.
            group_cues = [(min(rs), s, e) for (s, e), rs in _longest_first(
                {(s, e): {r} for r, s, e in cues.get(g, [])})]
            terms = [span for span, _ in _longest_first({sp: set() for sp in spans}) if not _overlaps_any(span, taken)]
            for s, e in terms:
                mentions.extend(self._resolve_context(ctx, s, e, group_cues, sentence_of))
        return _merge_duplicates(mentions)

    @staticmethod
    def _resolve_context(ctx: Any, s: int, e: int, cues: list[tuple[int, int, int]],
                         sentence_of: "_SentenceIndex") -> list[Mention]:
        sent = sentence_of.bounds(s)
        nearest: dict[int, tuple[int, int, int]] = {}  # rule -> (distance, cue start, cue end)
        for r, cs, ce in cues:
            if cs < sent[0] or ce > sent[1] or (cs < e and s < ce):
                continue
            distance = s - ce if ce <= s else cs - e
            if distance <= ctx.window and (r not in nearest or distance < nearest[r][0]):
                nearest[r] = (distance, cs, ce)
        if not nearest:
            return [Mention(ctx.default, s, e, s, e)] if ctx.default else []
        fired = sorted(nearest.items(), key=lambda item: (item[1][0], item[0]))
        if ctx.pick == "nearest":
            fired = fired[:1]
        out = []
        for r, (_, cs, ce) in fired:
            name = ctx.rules[r].finding
            if name is None:
                continue
            if name == ctx.default:  # the cue only confirmed the usual reading: show the word
                out.append(Mention(name, s, e, s, e))
            else:
                out.append(Mention(name, s, e, min(s, cs), max(e, ce)))
        return out

    def _laterality(self, m: Mention, mentions: list[Mention], sentence_of: "_SentenceIndex",
                    lateral: list[tuple[int, int, str]]) -> str | None:
        """Side words before the finding ("right pleural effusion"), else after it
        ("atelectasis in both lungs"), never reaching past a neighbouring finding."""
        before, after = self.lexicon.laterality_window
        sent_start, sent_end = sentence_of.bounds(m.anchor_start)
        prev_end = max((o.extent_end for o in mentions if o.extent_end <= m.extent_start and o is not m),
                       default=sent_start)
        next_start = min((o.extent_start for o in mentions if o.extent_start >= m.extent_end and o is not m),
                         default=sent_end)
        lo = max(sent_start, prev_end, m.extent_start - before)
        hi = min(sent_end, next_start, m.extent_end + after)
        sides = {side for s, e, side in lateral if s >= lo and e <= m.extent_end}
        if not sides:
            sides = {side for s, e, side in lateral if s >= m.extent_end and e <= hi}
        if not sides:
            return None
        if "bilateral" in sides or {"right", "left"} <= sides:
            return "bilateral"
        return sides.pop()


class _SentenceIndex:
    """Sentence bounds (token indices) of any token; the whole doc when unsentenced."""

    def __init__(self, doc: Doc) -> None:
        if doc.has_annotation("SENT_START"):
            self._starts = [s.start for s in doc.sents]
            self._ends = [s.end for s in doc.sents]
        else:
            self._starts, self._ends = [0], [len(doc)]

    def bounds(self, token_index: int) -> tuple[int, int]:
        k = max(0, bisect.bisect_right(self._starts, token_index) - 1)
        return self._starts[k], self._ends[k]


def _longest_first(spans: dict[tuple[int, int], set[str]]) -> list[tuple[tuple[int, int], set[str]]]:
    """Non-overlapping spans, preferring longer then earlier ones (spaCy's filter_spans rule)."""
    chosen: list[tuple[tuple[int, int], set[str]]] = []
    used: set[int] = set()
    for (s, e), names in sorted(spans.items(), key=lambda item: (item[0][0] - item[0][1], item[0][0])):
        if not used.intersection(range(s, e)):
            chosen.append(((s, e), names))
            used.update(range(s, e))
    return sorted(chosen)


def _overlaps_any(span: tuple[int, int], others: list[tuple[int, int]]) -> bool:
    return any(o[0] < span[1] and span[0] < o[1] for o in others)


def _merge_duplicates(mentions: list[Mention]) -> list[Mention]:
    """One mention per finding per place: touching or overlapping extents of the same
    finding merge ("atherosclerotic calcification of the aorta" is one mention)."""
    out: list[Mention] = []
    for m in sorted(mentions, key=lambda m: (m.name, m.extent_start, m.extent_end)):
        last = out[-1] if out else None
        if last and last.name == m.name and m.extent_start <= last.extent_end:
            out[-1] = Mention(last.name, last.anchor_start, last.anchor_end, last.extent_start,
                              max(last.extent_end, m.extent_end))
        else:
            out.append(m)
    return sorted(out, key=lambda m: (m.extent_start, m.extent_end, m.name))
