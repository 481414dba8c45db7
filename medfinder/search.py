"""The Searcher: text, image and keyword channels over a CaseIndex, fused into one ranking.

Text queries run three channels: ``keyword`` (the report engine: negation-aware, so "no
pleural effusion" never counts as a hit), ``text`` (report-to-report similarity in the text
tower's own space) and ``image`` (text-to-image in the joint space, the only channel that can
find cases without a report). Image queries run ``image`` (image-to-image) and ``report``
(image-to-report in the joint space). Channels are fused by weighted reciprocal rank fusion,
which needs no score calibration between channels whose similarities live on different
scales (benchmarks/fusion_compare.py compares it with a weighted sum of scores).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .appearance import APPEARANCES, appearance_map
from .errors import MedFinderError
from .evidence import DEFAULT_METHOD, Evidence
from .index import CaseIndex, StoredCase
from .index.case_index import served_channels
from .io.load import load_volume
from .io.volume import Volume

#: Reciprocal rank fusion constant (Cormack et al. 2009); 60 is the usual choice.
RRF_K = 60
#: Candidates fetched per channel, as a multiple of the k asked for.
CANDIDATE_FACTOR = 5
MIN_CANDIDATES = 50
TEXT_CHANNELS = ("keyword", "text", "image")
IMAGE_CHANNELS = ("image", "report")
#: Index vector channel behind each search channel, per query kind.
_INDEX_CHANNEL = {("text", "text"): "report_text", ("text", "image"): "image",
                  ("image", "image"): "image", ("image", "report"): "report"}
DEFAULT_WEIGHTS = {"keyword": 1.0, "text": 0.5, "image": 1.0, "report": 1.0}
#: Evidence points kept per case, best first (a report can place a dozen findings).
MAX_EVIDENCE = 6
#: Cases whose evidence a Searcher keeps (per query), so the app's selected case is computed once.
EVIDENCE_CACHE = 256
#: Case scans a Searcher keeps loaded (a real CT is 100-200 MB), for the viewer and evidence.
VOLUME_CACHE = 4
#: Indexed scans sampled to calibrate how much a scan resembles a finding's name.
LIKENESS_SAMPLE = 4096


@dataclass(frozen=True)
class SearchFilters:
    """Query-time restrictions. Finding names are canonical lexicon names."""

    include_findings: tuple[str, ...] = ()
    exclude_findings: tuple[str, ...] = ()
    sex: str | None = None
    age_min: int | None = None
    age_max: int | None = None
    body_part: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.include_findings or self.exclude_findings or self.sex or self.body_part
                    or self.age_min is not None or self.age_max is not None)

    def accepts(self, record: StoredCase) -> bool:
        present = {f["name"] for f in record.findings if f.get("status") == "affirmed"}
        if any(name not in present for name in self.include_findings):
            return False
        if any(name in present for name in self.exclude_findings):
            return False
        meta = record.metadata
        if self.sex and str(meta.get("sex", "")).upper()[:1] != self.sex.upper()[:1]:
            return False
        if self.body_part and str(meta.get("body_part", "")).lower() != self.body_part.lower():
            return False
        if self.age_min is not None or self.age_max is not None:
            try:
                age = float(meta["age"])
            except (KeyError, TypeError, ValueError):
                return False
            if self.age_min is not None and age < self.age_min:
                return False
            if self.age_max is not None and age > self.age_max:
                return False
        return True


@dataclass(frozen=True, eq=False)
class QueryTarget:
    """What a search looked for, as evidence needs it.

    Args:
        kind: "text" or "image".
        vector: a CT query's vector in the space of the index's image channel.
        text: a text query as typed (its joint-space vector is made when evidence needs it).
        findings: the findings a text query names (its report evidence looks for these).
    """

    kind: str
    vector: np.ndarray | None = None
    text: str | None = None
    findings: tuple[str, ...] = ()

    def key(self) -> tuple:
        return (self.kind, None if self.vector is None else self.vector.tobytes(), self.text, self.findings)


@dataclass(frozen=True)
class ChannelHit:
    score: float
    rank: int  # 1-based


@dataclass
class SearchResult:
    """One ranked case: fused score, what each channel said, and what to show."""

    case_id: str
    rank: int
    score: float
    channels: dict[str, ChannelHit]
    report: str
    highlights: list[tuple[str, str | None]]
    findings: list[dict]
    metadata: dict
    source: str
    shape: tuple[int, ...] | None
    spacing: tuple[float, ...] | None
    thumbnail_png: bytes | None = field(default=None, repr=False)
    #: Where in the case's scan the match lies, best first (``search(..., evidence=True)`` or
    #: ``Searcher.evidence``); None until asked for.
    evidence: list[Evidence] | None = None
    #: What was searched for, so that evidence can be asked for later.
    query: QueryTarget | None = field(default=None, repr=False, compare=False)

    def present_findings(self) -> list[str]:
        return sorted({f["name"] for f in self.findings if f.get("status") == "affirmed"})

    def to_json(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "rank": self.rank,
            "score": round(self.score, 6),
            "channels": {c: {"score": round(h.score, 6), "rank": h.rank} for c, h in self.channels.items()},
            "findings": self.present_findings(),
            "metadata": self.metadata,
            "report": self.report,
            "highlights": [[text, label] for text, label in self.highlights],
            **({"evidence": [e.to_json() for e in self.evidence]} if self.evidence is not None else {}),
        }


def fuse_rankings(
    rankings: dict[str, list[tuple[str, float]]],
    weights: dict[str, float] | None = None,
    method: str = "rrf",
) -> list[tuple[str, float, dict[str, ChannelHit]]]:
    """Fuse per-channel rankings (best first) into one: (case_id, fused score, hits), best first.

    ``rrf``: sum of weight / (RRF_K + rank). ``weighted``: sum of weight * min-max normalised
    score within each channel's candidate list.
    """
    weights = {**DEFAULT_WEIGHTS, **(weights or {})}
    fused: dict[str, float] = {}
    hits: dict[str, dict[str, ChannelHit]] = {}
    for channel, ranking in rankings.items():
        if not ranking:
            continue
        w = weights.get(channel, 1.0)
        scores = np.array([s for _, s in ranking], dtype=np.float64)
        lo, span = scores.min(), max(scores.max() - scores.min(), 1e-9)
        for position, (case_id, score) in enumerate(ranking, start=1):
            hits.setdefault(case_id, {})[channel] = ChannelHit(float(score), position)
            if method == "rrf":
                contribution = w / (RRF_K + position)
            elif method == "weighted":
                contribution = w * (score - lo) / span
            else:
                raise ValueError(f"Unknown fusion method {method!r}; use 'rrf' or 'weighted'.")
            fused[case_id] = fused.get(case_id, 0.0) + contribution
    order = sorted(fused, key=lambda c: (-fused[c], c))
    return [(c, fused[c], hits[c]) for c in order]


class Searcher:
    """Searches one CaseIndex with the model that built it.

    >>> searcher = Searcher.open("demo_index")           # doctest: +SKIP
    >>> searcher.search(text="right pleural effusion", k=5)  # doctest: +SKIP
    """

    def __init__(self, index: CaseIndex, model: Any, fusion: str = "rrf",
                 weights: dict[str, float] | None = None, evidence_method: str = DEFAULT_METHOD) -> None:
        self.index = index
        self.model = model
        self.preprocessor = model.make_preprocessor()
        self.fusion = fusion
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.evidence_method = evidence_method
        self._evidence_cache: OrderedDict[tuple, list[Evidence]] = OrderedDict()
        self._evidence_lock = threading.Lock()
        self._volumes: OrderedDict[str, Volume] = OrderedDict()
        self._finding_likeness: dict[str, tuple[np.ndarray, float, float]] = {}
        self._likeness_scans: np.ndarray | None = None

    @classmethod
    def open(cls, index_dir: str | os.PathLike[str], model: str | os.PathLike[str] | None = None,
             device: str = "auto", **kwargs: Any) -> "Searcher":
        """Open an index with its model: ``model`` (a folder or a built-in name), else the one the
        index records. A model of another fingerprint is refused by ``CaseIndex.open``."""
        from .devices import resolve_device
        from .model import load_model

        trained = load_model(model if model else _recorded_model(Path(index_dir)))
        index = CaseIndex.open(index_dir, fingerprint=trained.fingerprint)
        return cls(index, trained.to(resolve_device(device)), **kwargs)

    def channels(self, kind: str) -> tuple[str, ...]:
        """The channels this index and model answer for ``kind`` ("text" or "image") queries.

        A model whose projections were never trained against reports (``aligned`` false, as the
        real-CT tower is) serves no text-to-image or image-to-report score: it would be noise.
        """
        return tuple(served_channels(self.index.channels)[kind])

    # ------------------------------------------------------------------ queries
    def encode_volume(self, volume: Volume) -> np.ndarray:
        x = self.preprocessor(volume)
        return self.model.encode_image(x.unsqueeze(0))[0].numpy()

    def search(
        self,
        text: str | None = None,
        image: Volume | str | os.PathLike[str] | None = None,
        k: int = 10,
        channels: Sequence[str] | None = None,
        filters: SearchFilters | None = None,
        offset: int = 0,
        evidence: bool = False,
    ) -> list[SearchResult]:
        """Ranked cases for a text query or an image query (exactly one of them).

        ``evidence``: also say where in each result's scan the match lies (``SearchResult.evidence``);
        it loads and runs the model on each shown case, so it is off unless asked for.
        """
        if (text is None or not str(text).strip()) == (image is None):
            raise MedFinderError("Give either a text query or an image to search with, not both or neither.")
        if k < 1:
            raise MedFinderError(f"The number of results must be at least 1, not {k}.")
        filters = _canonical_filters(filters or SearchFilters())
        kind = "text" if image is None else "image"
        allowed = TEXT_CHANNELS if kind == "text" else IMAGE_CHANNELS
        served = self.channels(kind)
        wanted = tuple(channels) if channels else served
        unknown = [c for c in wanted if c not in allowed]
        if unknown:
            raise MedFinderError(
                f"Channel {unknown[0]!r} does not apply to {kind} queries; choose from {', '.join(allowed)}."
            )
        unserved = [c for c in wanted if c not in served]
        if unserved:
            raise MedFinderError(
                f"The index at {self.index.folder} does not serve the {unserved[0]!r} channel for {kind} queries "
                f"(its model, {self.model.config.name!r}, is not aligned with text); it serves {', '.join(served)}."
            )
        query = None
        if kind == "text":
            from .text.queries import parse_query

            query = parse_query(str(text))
            filters = _merge_query_filters(filters, query)
        n_candidates = max((offset + k) * CANDIDATE_FACTOR * (4 if filters.active else 1), MIN_CANDIDATES)
        rankings, target = self._rankings(kind, text, image, wanted, n_candidates, query)
        fused = fuse_rankings(rankings, self.weights, self.fusion)
        results = self._results(fused, filters, k, offset, query)
        for r in results:
            r.query = target
            if evidence:
                r.evidence = self.evidence(r)
        return results

    def _rankings(self, kind: str, text: str | None, image: Any, wanted: Sequence[str], n: int,
                  query: Any) -> tuple[dict[str, list[tuple[str, float]]], QueryTarget]:
        available = self.index.channels
        rankings: dict[str, list[tuple[str, float]]] = {}
        if kind == "text":
            assert text is not None
            if "keyword" in wanted:
                rankings["keyword"] = self.index.keyword_search(query if query is not None else text, n)
            needs_text = "text" in wanted and "report_text" in available
            needs_image = "image" in wanted and "image" in available
            if needs_text or needs_image:
                joint, raw = (v.numpy() for v in self.model.encode_query(text))
                if needs_text:
                    rankings["text"] = self.index.query("report_text", raw, n)
                if needs_image:
                    rankings["image"] = self.index.query("image", joint, n)
            named = tuple(getattr(query, "include_findings", ()) or ())
            return rankings, QueryTarget("text", text=text, findings=named)
        volume = image if isinstance(image, Volume) else load_volume(image)
        vec = self.encode_volume(volume)
        for channel in wanted:
            index_channel = _INDEX_CHANNEL[("image", channel)]
            if index_channel in available:
                rankings[channel] = self.index.query(index_channel, vec, n)
        return rankings, QueryTarget("image", vector=vec)

    def _results(self, fused: list, filters: SearchFilters, k: int, offset: int,
                 query: Any) -> list[SearchResult]:
        from .text.highlight import highlight

        # Records are read in fused order, a chunk at a time, until the page is full: reading and
        # decoding every candidate's report and findings from SQLite cost more than the rest of a
        # search at 10^5 cases. Without filters the first chunk (the page and a few spare, in case
        # a candidate was deleted meanwhile) is all there is to read.
        wanted = offset + k
        chunk = wanted + 5 if not filters.active else 4 * wanted
        records: dict[str, StoredCase] = {}
        kept: list = []
        start = 0
        while len(kept) < wanted and start < len(fused):
            batch = fused[start : start + chunk]
            start += chunk
            chunk *= 2
            read = {r.case_id: r for r in self.index.get_many([c for c, _, _ in batch], thumbnails=False)}
            records.update(read)
            kept.extend((c, s, h) for c, s, h in batch if c in read and filters.accepts(read[c]))
        page = kept[offset : offset + k]
        thumbs = self.index.thumbnails([c for c, _, _ in page])
        results = []
        for position, (case_id, score, hits) in enumerate(page, start=offset + 1):
            record = records[case_id]
            marks = highlight(query, _stored_report(record)) if record.report else []
            results.append(SearchResult(
                case_id=case_id, rank=position, score=score, channels=hits, report=record.report,
                highlights=marks, findings=record.findings, metadata=record.metadata, source=record.source,
                shape=record.shape, spacing=record.spacing, thumbnail_png=thumbs.get(case_id),
            ))
        return results

    def case(self, case_id: str) -> StoredCase:
        return self.index.get(case_id)

    def evidence(self, result: SearchResult, query: QueryTarget | None = None) -> list[Evidence]:
        """Where in ``result``'s scan the match with its query lies, best first (cached per case and query).

        ``query`` asks about another target than the one the result was found with (a finding the
        clinician points at in the report, say). Empty when the case's scan cannot be reached from
        here (a report-only case, a moved archive).
        """
        target = query or result.query
        if target is None:
            raise MedFinderError(f"The result {result.case_id!r} does not say what it was searched with.")
        key = (result.case_id, self.evidence_method, target.key())
        with self._evidence_lock:
            if key in self._evidence_cache:
                self._evidence_cache.move_to_end(key)
                return self._evidence_cache[key]
        found = self._locate(result, target)
        with self._evidence_lock:
            self._evidence_cache[key] = found
            while len(self._evidence_cache) > EVIDENCE_CACHE:
                self._evidence_cache.popitem(last=False)
        return found

    def _locate(self, result: SearchResult, target: QueryTarget) -> list[Evidence]:
        from . import evidence as ev

        volume = self.case_volume(result)
        if volume is None:
            return []
        scan = ev.PreparedScan.of(volume, self.preprocessor)
        heat = None
        found: list[Evidence] = []
        vector = target.vector
        if vector is None and target.text is not None and self.model.aligned:
            vector = self.model.encode_query(target.text)[0].numpy()
        if vector is not None:
            import torch

            heat = ev.evidence_map(self.model, scan, torch.from_numpy(vector), self.evidence_method)
            found += [Evidence(point, score, "image") for point, score in ev.peaks(heat, scan)]
        names = target.findings if target.kind == "text" else None
        top = float(heat.max()) if heat is not None else 0.0
        located = ev.located_findings(result.report, result.findings, names)
        # A finding whose look on CT is known (calcium, metal, the heart, a nodule) can be found in the
        # scan even where its report does not place it.
        placed = {name for name, _, _ in located}
        located += [(name, None, None) for name in dict.fromkeys(
            f["name"] for f in result.findings if f.get("status") == "affirmed" and f["name"] in APPEARANCES
            and f["name"] not in placed and (names is None or f["name"] in names))]
        queried = set(target.findings) if target.kind == "text" else set()
        likeness: dict[str, float] = {}
        if target.kind == "image" and located and target.vector is not None and self.model.aligned:
            # A CT query names no finding: of those this case's report places, the one the query scan
            # resembles most (CLIP-style, against how much every indexed scan resembles it) is the
            # likeliest reason the two matched.
            likeness = {name: self.finding_likeness(target.vector, name) for name, _, _ in located}
            queried = {max(likeness, key=likeness.__getitem__)}
        chest = ev.Chest.of(volume) if located else None
        for name, side, level in dict.fromkeys(located):  # a report may say the same place twice
            # Only the queried finding is looked for by its look: a map costs up to a few seconds.
            looks = appearance_map(name, volume, chest, side) if name in queried else None
            if looks is not None and looks.max() > 0:
                point = ev.voxel_world(volume, np.unravel_index(int(looks.argmax()), looks.shape))
                score = scan.value_at(heat, point) / top if top > 0 else 0.0
                found.append(Evidence(point, score, "report", name))
                continue
            if side is None and level is None:
                continue  # the report does not place it, and it was not looked for
            region = ev.region_mask(chest, side, level)
            if heat is not None and top > 0:
                inside = np.where(ev.on_input_grid(region, scan), heat, 0.0)
                if inside.max() > 0:
                    best = np.unravel_index(int(inside.argmax()), inside.shape)
                    found.append(Evidence(scan.world(best), float(inside.max()) / top, "report", name))
                    continue
            centre = ev.centroid_world(region, volume)
            if centre is not None:
                found.append(Evidence(centre, 0.0, "report", name))
        # Where the report places a queried finding and the image agrees comes first: both support it.
        # For a CT query, the report's findings in the order the query scan resembles them.
        if likeness:
            ranked = sorted(found, key=lambda e: (e.source != "report", -likeness.get(e.finding, -np.inf), -e.score))
        else:
            ranked = sorted(found, key=lambda e: (not (e.source == "report" and e.finding in queried), -e.score))
        return ranked[:MAX_EVIDENCE]

    def finding_likeness(self, image_vector: np.ndarray, finding: str) -> float:
        """How much a scan (its vector in the joint space) resembles ``finding``'s name, in standard
        deviations above the indexed scans' mean resemblance: raw cosines to different names are not
        comparable (some names sit closer to every scan)."""
        if finding not in self._finding_likeness:
            name_vector = self.model.encode_query(finding)[0].numpy()
            scans = self._likeness_sample()
            if scans.shape[0]:
                cosines = scans @ name_vector
                mean, spread = float(cosines.mean()), float(cosines.std()) or 1.0
            else:
                mean, spread = 0.0, 1.0
            self._finding_likeness[finding] = (name_vector, mean, spread)
        name_vector, mean, spread = self._finding_likeness[finding]
        return (float(image_vector @ name_vector) - mean) / spread

    def _likeness_sample(self) -> np.ndarray:
        """Up to ``LIKENESS_SAMPLE`` indexed image vectors, read once per Searcher (every name is
        calibrated against the same scans); empty where the backend does not hand its vectors back."""
        if self._likeness_scans is None:
            backend = self.index.vector_index("image")
            if hasattr(backend, "vectors"):
                _, stored = backend.vectors()
                self._likeness_scans = np.ascontiguousarray(stored[:: max(1, len(stored) // LIKENESS_SAMPLE)])
            else:
                self._likeness_scans = np.zeros((0, self.index.channels["image"]), dtype=np.float32)
        return self._likeness_scans

    def case_volume(self, result: SearchResult | StoredCase) -> Volume | None:
        """The case's scan, when the file it was indexed from is reachable from here (the last few kept)."""
        source = result.source
        if not source or not Path(source).exists():
            return None
        with self._evidence_lock:
            if source in self._volumes:
                self._volumes.move_to_end(source)
                return self._volumes[source]
        try:
            volume = load_volume(source)
        except MedFinderError:
            return None
        with self._evidence_lock:
            self._volumes[source] = volume
            while len(self._volumes) > VOLUME_CACHE:
                self._volumes.popitem(last=False)
        return volume


def _stored_report(record: StoredCase) -> Any:
    """The report as parsed at indexing time: re-parsing ten reports per query would cost more
    than the whole search (about 5 ms each); falls back to parsing when spans were not stored."""
    from .text.reports import Finding, Report, parse_report

    if any(f.get("start") is None or f.get("end") is None for f in record.findings):
        return parse_report(record.report)
    findings = [Finding(name=f["name"], text=record.report[f["start"]:f["end"]], start=f["start"], end=f["end"],
                        status=f["status"], laterality=f.get("laterality"), section="")
                for f in record.findings]
    return Report(text=record.report, findings=findings)


def _merge_query_filters(filters: SearchFilters, query: Any) -> SearchFilters:
    """'A without B' and 'no B' in the query exclude cases whose report affirms B."""
    excluded = tuple(getattr(query, "exclude_findings", ()) or ())
    if not excluded:
        return filters
    return SearchFilters(
        include_findings=filters.include_findings,
        exclude_findings=tuple(dict.fromkeys((*filters.exclude_findings, *excluded))),
        sex=filters.sex, age_min=filters.age_min, age_max=filters.age_max, body_part=filters.body_part,
    )


def finding_name(name: str) -> str:
    """The lexicon's name for a finding a user typed ('pleural effusions', 'enlarged heart').

    Filters compare exact names, so an unresolved spelling would silently match nothing: it is
    an error instead. Only a finding's own name or synonym, whole, is accepted: a symptom
    ('reflux') or a qualified phrase ('right pleural effusion') would filter on something
    other than what was typed.
    """
    from .text.lexicon import Lexicon
    from .text.reports import parse_report

    canonical = Lexicon.default().resolve(name)
    if canonical is not None:
        return canonical
    typed = name.strip()
    whole = {f.name for f in parse_report(typed).findings if f.start == 0 and f.end == len(typed)}
    if len(whole) == 1:
        return whole.pop()
    if whole:
        raise MedFinderError(f"The finding {name!r} could mean {', '.join(sorted(whole))}; name one of them.")
    raise MedFinderError(
        f"{name!r} is not a finding name MedFinder knows; give one alone, without side or qualifiers, "
        "such as 'Pleural effusion'."
    )


def _canonical_filters(filters: SearchFilters) -> SearchFilters:
    if not filters.include_findings and not filters.exclude_findings:
        return filters
    return replace(filters, include_findings=tuple(finding_name(n) for n in filters.include_findings),
                   exclude_findings=tuple(finding_name(n) for n in filters.exclude_findings))


def _recorded_model(index_dir: Path) -> str:
    """The model the index records: a built-in model's name, or a folder that must still exist here.

    An index copied to another machine records a folder that may not exist there; the sentence
    says which model to pass rather than failing on a fingerprint.
    """
    from .model import BUILTIN_MODELS

    info = CaseIndex.read_info(index_dir)["model"]
    recorded = str(info["id"])
    if recorded in BUILTIN_MODELS or Path(recorded).is_dir():
        return recorded
    raise MedFinderError(
        f"The model folder {recorded} that built the case index at {index_dir} does not exist here; "
        f"pass the model folder with fingerprint {info['fingerprint']} (--model)."
    )
