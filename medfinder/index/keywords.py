"""Keyword postings: a negation-aware inverted index of cases by the findings their reports affirm.

Cases are scored with BM25 over *affirmed* mentions (uncertain ones count half, negated and
historical ones never), so "no pleural effusion" in a normal report is not a hit for "pleural
effusion". Free words of the report (minus those of negated findings) refine a findings query.
The postings are stored in an index folder as ``keywords.json`` (format ``INDEX_FORMAT``).
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
from spacy.lang.en.stop_words import STOP_WORDS

from ..errors import CaseIndexError, ReportError
from ..text.lexicon import Lexicon
from ..text.queries import WORD_RE, KeywordQuery, parse_query
from ..text.reports import Report, parse_report, parse_reports

INDEX_FORMAT = "medfinder.keyword_index"
INDEX_VERSION = 1
# Mention weights: an uncertain mention is half a hit; a mention of a narrower finding
# (a ground-glass opacity for "lung opacity") is half a hit for each broader finding.
_STATUS_WEIGHT = {"affirmed": 1.0, "uncertain": 0.5}
_BROADER_WEIGHT = 0.5
_LATERALITY_BOOST = 1.5
_FREE_WORD_WEIGHT = 0.3  # free words refine a findings query; they do not outrank findings
# Posting flags (what the case says about a finding) and sides.
AFFIRMED, UNCERTAIN, NEGATED = 1, 2, 4
_SIDE_BITS = {"right": 1, "left": 2, "bilateral": 4}


class _Postings:
    """Parallel arrays of (case slot, term frequency, flags, sides) for one finding or word.

    Appends go to compact ``array.array`` buffers (cheap while indexing 100k reports);
    searches read numpy copies made once after the last append.
    """

    __slots__ = ("docs", "tf", "flags", "sides", "_view")

    def __init__(self) -> None:
        self.docs = array("i")
        self.tf = array("f")
        self.flags = array("B")
        self.sides = array("B")
        self._view: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def append(self, doc: int, tf: float, flags: int = 0, sides: int = 0) -> None:
        self.docs.append(doc)
        self.tf.append(tf)
        self.flags.append(flags)
        self.sides.append(sides)
        self._view = None

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._view is None:
            self._view = (np.array(self.docs, np.int32), np.array(self.tf, np.float32),
                          np.array(self.flags, np.uint8), np.array(self.sides, np.uint8))
        return self._view

    @classmethod
    def from_lists(cls, docs: list, tf: list, flags: list | None = None, sides: list | None = None) -> "_Postings":
        p = cls()
        p.docs.extend(docs)
        p.tf.extend(tf)
        p.flags.extend(flags if flags is not None else [0] * len(docs))
        p.sides.extend(sides if sides is not None else [0] * len(docs))
        return p


class KeywordIndex:
    """An inverted index of cases by the findings their reports affirm, plus free words.

    ``search`` ranks with BM25 (k1, b) per query part; a case's score is the number of
    query parts it answers plus a squashed BM25 sum in [0, 1), so cases answering all of
    "A and B" come before cases answering one.  Cases affirming an excluded finding are
    dropped.  A query of exclusions only ("no pleural effusion") lists the cases that do
    not affirm it, those that explicitly deny it first.
    """

    def __init__(self, lexicon: Lexicon | None = None, k1: float = 1.2, b: float = 0.75) -> None:
        self.lexicon = lexicon or Lexicon.default()
        self.k1, self.b = float(k1), float(b)
        self._ids: list[str | None] = []
        self._slot: dict[str, int] = {}
        self._alive = np.zeros(64, bool)
        self._flen = np.zeros(64, np.float32)
        self._wlen = np.zeros(64, np.float32)
        self._findings: dict[str, _Postings] = {}
        self._words: dict[str, _Postings] = {}
        self._stats: tuple[int, float, float] | None = None

    # ------------------------------------------------------------------ building
    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._slot

    def add(self, case_id: str, report: Report | str) -> None:
        """Index one case (replacing an earlier entry with the same id)."""
        if not isinstance(case_id, str) or not case_id:
            raise CaseIndexError("A case id for the keyword index must be a non-empty string.")
        if isinstance(report, str):
            report = parse_report(report, self.lexicon)
        elif not isinstance(report, Report):
            raise ReportError(f"Case {case_id}: the report is a {type(report).__name__}, not text or a Report.")
        if case_id in self._slot:
            self.remove(case_id)
        slot = len(self._ids)
        self._ids.append(case_id)
        self._slot[case_id] = slot
        if slot >= len(self._alive):
            grow = len(self._alive)
            self._alive = np.concatenate([self._alive, np.zeros(grow, bool)])
            self._flen = np.concatenate([self._flen, np.zeros(grow, np.float32)])
            self._wlen = np.concatenate([self._wlen, np.zeros(grow, np.float32)])
        self._alive[slot] = True
        self._stats = None

        tf: dict[str, float] = {}
        flags: dict[str, int] = {}
        sides: dict[str, int] = {}
        for f in report.findings:
            weight = _STATUS_WEIGHT.get(f.status, 0.0)
            flag = AFFIRMED if f.status == "affirmed" else UNCERTAIN if f.status == "uncertain" else (
                NEGATED if f.status == "negated" else 0)
            for name, scale in [(f.name, 1.0)] + [(a, _BROADER_WEIGHT) for a in self.lexicon.ancestors(f.name)]:
                tf[name] = tf.get(name, 0.0) + weight * scale
                flags[name] = flags.get(name, 0) | flag
                if weight and f.laterality:
                    sides[name] = sides.get(name, 0) | _SIDE_BITS[f.laterality]
        for name, value in tf.items():
            postings = self._findings.get(name)
            if postings is None:
                postings = self._findings[name] = _Postings()
            postings.append(slot, value, flags[name], sides.get(name, 0))
        self._flen[slot] = sum(tf.values())

        counts = Counter(_report_words(report))
        for word, count in counts.items():
            postings = self._words.get(word)
            if postings is None:
                postings = self._words[word] = _Postings()
            postings.append(slot, count)
        self._wlen[slot] = sum(counts.values())

    def add_many(self, cases: Iterable[tuple[str, Report | str]], batch_size: int = 64) -> int:
        """Index many cases; report texts are parsed in batches.  Returns the number added."""
        items = list(cases)
        texts = [(i, r) for i, (_, r) in enumerate(items) if isinstance(r, str)]
        parsed = dict(zip((i for i, _ in texts), parse_reports((r for _, r in texts), self.lexicon, batch_size)))
        for i, (case_id, report) in enumerate(items):
            self.add(case_id, parsed.get(i, report))
        return len(items)

    def remove(self, case_id: str) -> None:
        """Forget a case (its postings are dropped lazily, at the next to_dict)."""
        slot = self._slot.pop(case_id, None)
        if slot is None:
            raise CaseIndexError(f"Case '{case_id}' is not in the keyword index.")
        self._alive[slot] = False
        self._ids[slot] = None
        self._stats = None

    # ------------------------------------------------------------------ searching
    def search(self, query: str | KeywordQuery, k: int = 10) -> list[tuple[str, float]]:
        """The k best cases for ``query``, best first, as (case id, score)."""
        if isinstance(query, str):
            query = parse_query(query, self.lexicon)
        if k <= 0 or not self._slot or query.is_empty:
            return []
        n = len(self._ids)
        alive = self._alive[:n]
        n_alive, avg_flen, avg_wlen = self._collection_stats()
        total = np.zeros(n, np.float32)
        answered = np.zeros(n, np.int16)
        include = [p for p in query.parts if not p.exclude]
        for part in include:
            part_score = np.zeros(n, np.float32)
            for name in part.findings:
                postings = self._findings.get(name)
                if postings is not None:
                    self._score_into(part_score, postings, self._flen, avg_flen, n_alive, alive, part.laterality)
            answered += part_score > 0
            total += part_score
        word_parts = query.free_words
        for word in word_parts:
            postings = self._words.get(word)
            if postings is None:
                continue
            word_score = np.zeros(n, np.float32)
            self._score_into(word_score, postings, self._wlen, avg_wlen, n_alive, alive, None, False)
            if include:
                total += _FREE_WORD_WEIGHT * word_score
            else:
                answered += word_score > 0
                total += word_score

        keep = alive.copy()
        for name in query.exclude_findings:
            postings = self._findings.get(name)
            if postings is not None:
                docs, _, flags, _ = postings.view()
                keep[docs[(flags & AFFIRMED) > 0]] = False
        for word in query.excluded_words:
            postings = self._words.get(word)
            if postings is not None:
                keep[postings.view()[0]] = False

        if include or word_parts:
            keep &= answered > 0
            score = answered + total / (1.0 + total)
        else:  # exclusions only: cases that explicitly deny the finding come first
            score = np.zeros(n, np.float32)
            for name in query.exclude_findings:
                postings = self._findings.get(name)
                if postings is not None:
                    docs, _, flags, _ = postings.view()
                    score[docs[(flags & NEGATED) > 0]] = 1.0
        candidates = np.flatnonzero(keep)
        if len(candidates) == 0:
            return []
        cand_scores = score[candidates]
        if len(candidates) > k:
            top = np.argpartition(-cand_scores, k - 1)[:k]
            candidates, cand_scores = candidates[top], cand_scores[top]
        order = np.lexsort((candidates, -cand_scores))
        return [(self._ids[candidates[i]], float(cand_scores[i])) for i in order]

    def _score_into(self, out: np.ndarray, postings: _Postings, lengths: np.ndarray, avg_len: float,
                    n_alive: int, alive: np.ndarray, laterality: str | None, with_certainty: bool = True) -> None:
        docs, tf, flags, sides = postings.view()
        live = alive[docs] & (tf > 0)
        df = int(live.sum())
        if df == 0:
            return
        docs, tf, flags, sides = docs[live], tf[live], flags[live], sides[live]
        idf = math.log(1.0 + (n_alive - df + 0.5) / (df + 0.5))
        norm = self.k1 * (1.0 - self.b + self.b * lengths[docs] / max(avg_len, 1e-6))
        bm25 = idf * tf * (self.k1 + 1.0) / (tf + norm)
        if with_certainty:
            # A case that only doubts the finding ranks below one that affirms it, however
            # short its report: length normalisation must not turn "possible" into a hit.
            bm25 = np.where((flags & AFFIRMED) > 0, bm25, bm25 * _STATUS_WEIGHT["uncertain"])
        if laterality is not None:
            wanted = _SIDE_BITS[laterality] | (_SIDE_BITS["bilateral"] if laterality != "bilateral" else 0)
            bm25 = np.where((sides & wanted) > 0, bm25 * _LATERALITY_BOOST, bm25)
        out[docs] = np.maximum(out[docs], bm25)

    def _collection_stats(self) -> tuple[int, float, float]:
        if self._stats is None:
            alive = self._alive[: len(self._ids)]
            n_alive = int(alive.sum())
            avg_f = float(self._flen[: len(self._ids)][alive].mean()) if n_alive else 0.0
            avg_w = float(self._wlen[: len(self._ids)][alive].mean()) if n_alive else 0.0
            self._stats = (n_alive, avg_f, avg_w)
        return self._stats

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe snapshot (removed cases are compacted away)."""
        n = len(self._ids)
        alive = self._alive[:n]
        new_slot = np.cumsum(alive) - 1

        def dump(postings: _Postings, with_flags: bool) -> dict[str, list] | None:
            docs, tf, flags, sides = postings.view()
            live = alive[docs]
            if not live.any():
                return None
            # Case slots are stored as gaps from the previous one (ascending), which keeps the
            # JSON of a 100k-case index about half the size.
            slots = new_slot[docs[live]]
            out = {"gaps": np.diff(slots, prepend=0).tolist(),
                   "tf": [int(v) if v == int(v) else round(float(v), 4) for v in tf[live]]}
            if with_flags:
                out["flags"] = flags[live].tolist()
                out["sides"] = sides[live].tolist()
            return out

        findings = {name: d for name, p in self._findings.items() if (d := dump(p, True)) is not None}
        words = {w: d for w, p in self._words.items() if (d := dump(p, False)) is not None}
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "lexicon": self.lexicon.fingerprint,
            "k1": self.k1,
            "b": self.b,
            "cases": [cid for cid, a in zip(self._ids, alive) if a],
            "finding_length": [round(float(v), 4) for v in self._flen[:n][alive]],
            "word_length": [int(v) for v in self._wlen[:n][alive]],
            "findings": findings,
            "words": words,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], lexicon: Lexicon | None = None) -> "KeywordIndex":
        """Rebuild an index saved by ``to_dict``; refuses one built with another lexicon."""
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise CaseIndexError("The keyword postings are not a MedFinder keyword index.")
        if data.get("version") != INDEX_VERSION:
            raise CaseIndexError(
                f"The keyword postings are format version {data.get('version')}; this MedFinder reads "
                f"version {INDEX_VERSION}, so rebuild the index."
            )
        index = cls(lexicon, k1=data.get("k1", 1.2), b=data.get("b", 0.75))
        if data.get("lexicon") != index.lexicon.fingerprint:
            raise CaseIndexError(
                "The keyword postings were built with a different findings lexicon; rebuild the index "
                "so that searches use the current vocabulary."
            )
        try:
            cases = list(data["cases"])
            n = len(cases)
            if len(set(cases)) != n or not all(isinstance(c, str) and c for c in cases):
                raise ValueError("case ids are not unique non-empty strings")
            flen = np.asarray(data["finding_length"], np.float32)
            wlen = np.asarray(data["word_length"], np.float32)
            if len(flen) != n or len(wlen) != n:
                raise ValueError("length arrays do not match the case list")
            index._ids = cases
            index._slot = {c: i for i, c in enumerate(cases)}
            size = max(64, n)
            index._alive = np.zeros(size, bool)
            index._alive[:n] = True
            index._flen = np.zeros(size, np.float32)
            index._flen[:n] = flen
            index._wlen = np.zeros(size, np.float32)
            index._wlen[:n] = wlen
            for name, d in data["findings"].items():
                if name not in index.lexicon.findings:
                    raise ValueError(f"unknown finding {name!r}")
                index._findings[name] = _checked_postings(d, n, True)
            for word, d in data["words"].items():
                index._words[word] = _checked_postings(d, n, False)
        except (KeyError, TypeError, ValueError) as exc:
            raise CaseIndexError(f"The keyword postings are damaged ({exc}); rebuild the index.") from exc
        return index


def _checked_postings(d: dict, n: int, with_flags: bool) -> _Postings:
    gaps, tf = np.asarray(d["gaps"], np.int64), d["tf"]
    docs = np.cumsum(gaps)
    if len(docs) != len(tf) or (len(docs) and (gaps[1:].min(initial=1) < 1 or docs[0] < 0 or docs[-1] >= n)):
        raise ValueError("a postings list points outside the case list")
    docs = docs.tolist()
    if with_flags:
        if len(d["flags"]) != len(docs) or len(d["sides"]) != len(docs):
            raise ValueError("postings flags do not match")
        return _Postings.from_lists(docs, tf, d["flags"], d["sides"])
    return _Postings.from_lists(docs, tf)


def _report_words(report: Report) -> list[str]:
    """Free words of a report, minus the words of negated or historical findings."""
    text = report.text.lower()
    dropped = [(f.start, f.end) for f in report.findings if f.status in ("negated", "historical")]
    if dropped:
        chars = list(text)
        for start, end in dropped:
            chars[start:end] = " " * (end - start)
        text = "".join(chars)
    return [w for w in WORD_RE.findall(text) if w not in STOP_WORDS]
