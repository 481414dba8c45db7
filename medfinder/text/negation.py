"""NegEx with a bounded scope: a trigger reaches a few tokens, not the whole sentence."""

from __future__ import annotations

import bisect

import spacy
from negspacy.negation import Negex
from spacy.tokens import Doc, Span

#: The span group ReportParser puts finding mentions in, and NegEx reads them from.
SPAN_KEY = "medfinder_findings"


class ScopedNegex(Negex):
    """negspacy's NegEx with the original algorithm's bounded scope.

    negspacy lets a trigger reach every finding up to the end of the sentence; in long
    radiology sentences ("No X was detected ..., and a nodule is seen") that negates
    findings far from the trigger, so a trigger here reaches ``max_scope`` tokens.
    """

    def __init__(self, nlp: spacy.Language, name: str, termset: dict[str, list[str]],
                 extension_name: str, max_scope: int) -> None:
        super().__init__(nlp, name, termset, ent_types=None, extension_name=extension_name,
                         chunk_prefix=None, span_keys=[SPAN_KEY])
        self.max_scope = max_scope

    def negex(self, doc: Doc) -> Doc:
        # Same algorithm as negspacy's, visiting each finding once instead of scanning
        # every finding for every sentence (parsing 100k reports must stay fast).
        spans = sorted(doc.spans[SPAN_KEY], key=lambda sp: sp.start)
        if not spans:
            return doc
        preceding, following, terminating = self.process_negations(doc)
        if not preceding and not following:
            return doc
        starts = [sp.start for sp in spans]
        for lo, hi in self.termination_boundaries(doc, terminating):
            first = bisect.bisect_left(starts, lo)
            if first == len(spans) or spans[first].start >= hi:
                continue
            sub_preceding = [t for t in preceding if lo <= t[1] < hi]
            sub_following = [t for t in following if lo <= t[1] < hi]
            if not sub_preceding and not sub_following:
                continue
            for span in spans[first:bisect.bisect_left(starts, hi)]:
                if span.end <= hi:
                    self._apply_negation(span, sub_preceding, sub_following)
        return doc

    def _apply_negation(self, span: Span, sub_preceding: list, sub_following: list) -> None:
        if any(start < span.start and span.start - end <= self.max_scope for _, start, end in sub_preceding):
            span._.set(self.extension_name, True)
        elif any(end > span.end and start - span.end <= self.max_scope for _, start, end in sub_following):
            span._.set(self.extension_name, True)
