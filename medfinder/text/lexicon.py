"""The CT findings lexicon: canonical finding names, their synonyms, and the report-reading
rules (negation, uncertainty, history, laterality, section headings) kept as data in
``medfinder/lexicon.yaml``.

This module only loads and checks that file; ``medfinder.reports`` turns it into a spaCy
pipeline and ``medfinder.keyword_search`` expands queries through it.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from negspacy.termsets import termset as negspacy_termset

from ..errors import ReportError

DEFAULT_LEXICON_PATH = Path(__file__).with_name("lexicon.yaml")
SIDES = ("right", "left", "bilateral")
_TRIGGER_KINDS = ("preceding", "following", "pseudo", "termination")


@dataclass(frozen=True)
class FindingEntry:
    """One canonical finding and the words that name it."""

    name: str
    lateralized: bool
    broader: tuple[str, ...]
    terms: tuple[str, ...]
    abbreviations: tuple[str, ...]
    lay: tuple[str, ...]


@dataclass(frozen=True)
class ContextRule:
    """Cue words that, near a contextual term, make it name ``finding`` (None: no finding)."""

    finding: str | None
    cues: tuple[str, ...]


@dataclass(frozen=True)
class ContextualTerm:
    """Words that name a finding only next to a cue ("calcific plaque" + "coronary")."""

    terms: tuple[str, ...]
    case_sensitive: bool
    window: int
    pick: str  # "all" or "nearest"
    rules: tuple[ContextRule, ...]
    default: str | None


@dataclass(frozen=True)
class TriggerSet:
    """NegEx-style trigger phrases for one kind of modifier, in negspacy's termset shape."""

    preceding: tuple[str, ...]
    following: tuple[str, ...]
    pseudo: tuple[str, ...]
    termination: tuple[str, ...]
    scope: int

    def as_negspacy_termset(self) -> dict[str, list[str]]:
        return {
            "pseudo_negations": list(self.pseudo),
            "preceding_negations": list(self.preceding),
            "following_negations": list(self.following),
            "termination": list(self.termination),
        }


@dataclass(frozen=True)
class SectionSpec:
    name: str
    headings: tuple[str, ...]
    mentions_are: str | None  # e.g. "historical" for the clinical information section


def spelling_variants(term: str) -> set[str]:
    """Spellings of ``term`` a report may use: space or hyphen between words, plural last word.

    spaCy splits "ground-glass" into three tokens and "ground glass" into two, so each
    joining is listed; plurals are generated so the lexicon lists each noun once.
    """
    words = [w for w in re.split(r"[\s\-]+", term.strip()) if w]
    if not words:
        return set()
    last_forms = {words[-1], *_plural_forms(words[-1])}
    joiners: list[tuple[str, ...]]
    if len(words) <= 4:
        joiners = list(itertools.product((" ", "-"), repeat=len(words) - 1))
    else:
        joiners = [(" ",) * (len(words) - 1)]
    variants = set()
    for last in last_forms:
        seq = words[:-1] + [last]
        for joins in joiners:
            text = seq[0]
            for joiner, word in zip(joins, seq[1:]):
                text += joiner + word
            variants.add(text)
    return variants


_ADJECTIVE_ENDINGS = ("ous", "ic", "al", "ed", "ar", "ive", "ful", "ary", "oid", "less")


def _plural_forms(word: str) -> set[str]:
    """English and Latin plurals of a medical noun (wrong guesses only add dead variants)."""
    w = word.lower()
    if len(w) < 3 or not w.isalpha() or w.endswith(_ADJECTIVE_ENDINGS):
        return set()
    if w.endswith("sis"):
        return {word[:-3] + "ses"}
    if w.endswith("us"):
        return {word[:-2] + "i", word + "es"}
    if w.endswith("um"):
        return {word[:-2] + "a", word + "s"}
    if w.endswith("a"):
        return {word + "e", word + "s"}
    if w.endswith("y") and w[-2] not in "aeiou":
        return {word[:-1] + "ies"}
    if w.endswith(("s", "x", "z", "ch", "sh")):
        return {word + "es"}
    return {word + "s"}


class Lexicon:
    """The findings vocabulary and report-reading rules, loaded from a YAML file."""

    def __init__(self, data: dict[str, Any], source: str = "<lexicon>", fingerprint: str = "") -> None:
        self.source = source
        self.fingerprint = fingerprint or hashlib.sha256(repr(data).encode()).hexdigest()
        if not isinstance(data, dict):
            raise ReportError(f"The findings lexicon {source} is not a YAML mapping.")
        self.findings: dict[str, FindingEntry] = {}
        for raw in _require_list(data, "findings", source):
            entry = self._finding(raw, source)
            if entry.name in self.findings:
                raise ReportError(f"The findings lexicon {source} defines '{entry.name}' twice.")
            self.findings[entry.name] = entry
        self._lower_names = {name.lower(): name for name in self.findings}
        for entry in self.findings.values():
            for parent in entry.broader:
                self._check_name(parent, source, f"the broader finding of '{entry.name}'")
        self._ancestors = {name: self._walk_up(name, source) for name in self.findings}
        self._descendants: dict[str, tuple[str, ...]] = {
            name: tuple(sorted(c for c, ups in self._ancestors.items() if name in ups))
            for name in self.findings
        }
        self.contextual = tuple(self._contextual(raw, source) for raw in data.get("contextual") or [])
        self.query_pointers: dict[str, tuple[str, ...]] = {}
        for phrase, names in (data.get("query_pointers") or {}).items():
            names = _strings(names, source, f"query pointer '{phrase}'")
            for name in names:
                self._check_name(name, source, f"query pointer '{phrase}'")
            self.query_pointers[str(phrase)] = tuple(names)
        self.negation = self._negation(data.get("negation") or {}, source)
        self.negating_answers = tuple(_strings((data.get("negation") or {}).get("answers", []), source,
                                               "negation answers"))
        self.uncertainty = self._triggers(data.get("uncertainty") or {}, source, "uncertainty")
        self.historical = self._triggers(data.get("historical") or {}, source, "historical")
        lat = data.get("laterality") or {}
        self.laterality_words = {
            side: tuple(_strings(lat.get(side, []), source, f"laterality {side}")) for side in SIDES
        }
        self.laterality_window = (int(lat.get("before", 6)), int(lat.get("after", 12)))
        self.sections = tuple(
            SectionSpec(
                name=str(name),
                headings=tuple(_strings(spec.get("headings", []), source, f"section {name}")),
                mentions_are=spec.get("mentions_are"),
            )
            for name, spec in (data.get("sections") or {}).items()
        )
        for spec in self.sections:
            if spec.mentions_are not in (None, "historical", "uncertain"):
                raise ReportError(
                    f"The findings lexicon {source} gives section '{spec.name}' an unknown status "
                    f"'{spec.mentions_are}'."
                )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_yaml(cls, path: str | Path) -> "Lexicon":
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ReportError(f"The findings lexicon {path} cannot be read ({exc.strerror}).") from exc
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ReportError(f"The findings lexicon {path} is not valid YAML ({exc.__class__.__name__}).") from exc
        return cls(data, source=str(path), fingerprint=hashlib.sha256(raw).hexdigest()[:16])

    @classmethod
    def default(cls) -> "Lexicon":
        """The lexicon shipped with MedFinder (loaded once per process)."""
        return _default_lexicon()

    # ------------------------------------------------------------------ queries
    @property
    def canonical_names(self) -> list[str]:
        return list(self.findings)

    def resolve(self, name: str) -> str | None:
        """The canonical spelling of a finding name, ignoring case; None if unknown."""
        return self._lower_names.get(name.strip().lower())

    def ancestors(self, name: str) -> tuple[str, ...]:
        """Every broader finding of ``name``, transitively (nearest first)."""
        return self._ancestors[name]

    def descendants(self, name: str) -> tuple[str, ...]:
        """Every narrower finding of ``name``, transitively."""
        return self._descendants[name]

    def is_lateralized(self, name: str) -> bool:
        return self.findings[name].lateralized

    # ------------------------------------------------------------------ parsing helpers
    def _check_name(self, name: str, source: str, where: str) -> None:
        if name not in self.findings:
            raise ReportError(f"The findings lexicon {source} names an unknown finding '{name}' in {where}.")

    def _walk_up(self, name: str, source: str) -> tuple[str, ...]:
        seen: list[str] = []
        frontier = list(self.findings[name].broader)
        while frontier:
            parent = frontier.pop(0)
            if parent == name:
                raise ReportError(f"The findings lexicon {source} makes '{name}' broader than itself.")
            if parent not in seen:
                seen.append(parent)
                frontier.extend(self.findings[parent].broader)
        return tuple(seen)

    @staticmethod
    def _finding(raw: Any, source: str) -> FindingEntry:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"].strip():
            raise ReportError(f"The findings lexicon {source} has a finding entry without a name.")
        name = raw["name"].strip()
        return FindingEntry(
            name=name,
            lateralized=bool(raw.get("lateralized", False)),
            broader=tuple(_strings(raw.get("broader", []), source, name)),
            terms=tuple(_strings(raw.get("terms", []), source, name)),
            abbreviations=tuple(_strings(raw.get("abbreviations", []), source, name)),
            lay=tuple(_strings(raw.get("lay", []), source, name)),
        )

    def _contextual(self, raw: Any, source: str) -> ContextualTerm:
        if not isinstance(raw, dict):
            raise ReportError(f"The findings lexicon {source} has a contextual entry that is not a mapping.")
        terms = tuple(_strings(raw.get("terms", []), source, "a contextual entry"))
        rules = []
        for rule in raw.get("rules") or []:
            finding = rule.get("finding")
            if finding is not None:
                self._check_name(finding, source, f"the contextual rule for {terms[:1]}")
            rules.append(ContextRule(finding, tuple(_strings(rule.get("cues", []), source, "contextual cues"))))
        default = raw.get("default")
        if default is not None:
            self._check_name(default, source, f"the contextual default for {terms[:1]}")
        pick = raw.get("pick", "all")
        if pick not in ("all", "nearest"):
            raise ReportError(f"The findings lexicon {source} has contextual pick '{pick}' (use all or nearest).")
        return ContextualTerm(
            terms=terms,
            case_sensitive=bool(raw.get("case_sensitive", False)),
            window=int(raw.get("window", 8)),
            pick=pick,
            rules=tuple(rules),
            default=default,
        )

    @staticmethod
    def _triggers(raw: dict, source: str, kind: str) -> TriggerSet:
        lists = {k: tuple(_strings(raw.get(k, []), source, f"{kind} {k}")) for k in _TRIGGER_KINDS}
        return TriggerSet(**lists, scope=int(raw.get("scope", 8)))

    @staticmethod
    def _negation(raw: dict, source: str) -> TriggerSet:
        # negspacy's clinical termset is the well-kept base; the YAML only adapts it.
        base = negspacy_termset("en_clinical").get_patterns()
        key = {"preceding": "preceding_negations", "following": "following_negations",
               "pseudo": "pseudo_negations", "termination": "termination"}
        add, remove = raw.get("add") or {}, raw.get("remove") or {}
        lists = {}
        for kind in _TRIGGER_KINDS:
            dropped = {t.lower() for t in _strings(remove.get(kind, []), source, f"negation remove {kind}")}
            merged = [t for t in base[key[kind]] if t.lower() not in dropped]
            for term in _strings(add.get(kind, []), source, f"negation add {kind}"):
                if term.lower() not in {m.lower() for m in merged}:
                    merged.append(term)
            lists[kind] = tuple(merged)
        return TriggerSet(**lists, scope=int(raw.get("scope", 8)))


def _require_list(data: dict, key: str, source: str) -> list:
    value = data.get(key)
    if not isinstance(value, list) or not value:
        raise ReportError(f"The findings lexicon {source} has no '{key}' list.")
    return value


def _strings(value: Any, source: str, where: str) -> list[str]:
    """A YAML list of phrases; YAML turns a bare `no` into False, so anything else is refused."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ReportError(
            f"The findings lexicon {source} has a non-text entry in {where} (quote words like \"no\")."
        )
    return [v.strip() for v in value]


@lru_cache(maxsize=1)
def _default_lexicon() -> Lexicon:
    return Lexicon.from_yaml(DEFAULT_LEXICON_PATH)
