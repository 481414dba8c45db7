"""End-to-end Searcher latency on a large index.

    python benchmarks/search_latency.py [--n 100000] [--queries 200] [--model assets/model]

Builds (in a temp folder) a CaseIndex of N cases with synthetic clustered unit vectors in every
channel and real phantom reports (a few hundred distinct reports parsed once, reused under
N case ids), then times ``Searcher.search(text=...)`` with the model's real text encoders and
``Searcher.search(image=...)`` on a demo-size phantom volume (load + preprocess + encode +
search). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ann_recall import clustered_unit_vectors  # noqa: E402

from medfinder.demo import DEMO_MODEL_DIR  # noqa: E402
from medfinder.index import CaseEntry, CaseIndex  # noqa: E402
from medfinder.model import MedFinder  # noqa: E402
from medfinder.phantoms import generate_case  # noqa: E402
from medfinder.search import Searcher  # noqa: E402
from medfinder.text.reports import parse_report  # noqa: E402

QUERIES = ["pleural effusion", "right pleural effusion", "cardiomegaly", "lung nodule without emphysema",
           "enlarged heart", "collapsed lung", "swollen lymph nodes", "consolidation in the right lower lobe",
           "emphysema", "hiatal hernia", "pericardial effusion", "ground glass opacity", "pneumothorax",
           "shortness of breath", "bronchiectasis and atelectasis", "coronary artery calcification"]


FINDING_WORDS = ["pleural effusion", "cardiomegaly", "lung nodule", "emphysema", "atelectasis", "consolidation",
                 "pneumothorax", "hiatal hernia", "lymphadenopathy", "bronchiectasis", "ground glass opacity",
                 "pericardial effusion", "coronary calcification", "lung mass", "septal thickening"]
MODIFIERS = ["right", "left", "bilateral", "small", "large", "new", "mild", "moderate", "basal", "apical", "",
             "upper lobe", "lower lobe"]


def _unique_queries(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct queries of one or two findings with modifiers, e.g. 'small left pleural effusion'."""
    out: dict[str, None] = {}
    while len(out) < n:
        parts = [f"{rng.choice(MODIFIERS)} {rng.choice(FINDING_WORDS)}".strip() for _ in range(int(rng.integers(1, 3)))]
        joiner = str(rng.choice([" and ", " without ", " with "]))
        out[joiner.join(parts)] = None
    return list(out)


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--distinct-reports", type=int, default=150)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    model = MedFinder.from_pretrained(args.model)
    t0 = time.perf_counter()
    reports = [generate_case(99, i, shape=(64, 64, 48), spacing=(5.0, 5.0, 6.0)).report
               for i in range(args.distinct_reports)]
    parsed = [parse_report(r) for r in reports]
    timings = {"reports_s": round(time.perf_counter() - t0, 1)}
    dims = {"image": model.embed_dim, "report": model.embed_dim, "report_text": model.text_dim}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index = CaseIndex.create(Path(tmp) / "index", model_id=str(args.model), fingerprint=model.fingerprint,
                                 dims=dims)
        centres = {c: rng.normal(size=(64, d)).astype(np.float32) for c, d in dims.items()}
        chunk = 5000
        for start in range(0, args.n, chunk):
            m = min(chunk, args.n - start)
            vecs = {c: clustered_unit_vectors(m, d, rng, centres[c]) for c, d in dims.items()}
            entries = []
            for j in range(m):
                r = (start + j) % len(reports)
                entries.append(CaseEntry(case_id=f"case-{start + j:07d}", vectors={c: vecs[c][j] for c in dims},
                                         report=reports[r], parsed_report=parsed[r],
                                         metadata={"sex": "FM"[j % 2], "age": int(30 + (start + j) % 60)}))
            index.add(entries)
        index.commit()
        index.close()
        timings["build_s"] = round(time.perf_counter() - t0, 1)
        searcher = Searcher(CaseIndex.open(Path(tmp) / "index", fingerprint=model.fingerprint), model)
        searcher.search(text="warm up", k=10)
        # Cold: every query is new, so the text tower runs (its per-sentence cache cannot help).
        # Repeated: the same 16 queries again and again, as example queries in the app are.
        cold_queries = _unique_queries(args.queries, rng)
        cold_times, text_times = [], []
        for query in cold_queries:
            t = time.perf_counter()
            searcher.search(text=query, k=10)
            cold_times.append(time.perf_counter() - t)
        for i in range(args.queries):
            t = time.perf_counter()
            searcher.search(text=QUERIES[i % len(QUERIES)], k=10)
            text_times.append(time.perf_counter() - t)
        volume = generate_case(98, 0).volume
        image_times = []
        for _ in range(10):
            t = time.perf_counter()
            searcher.search(image=volume, k=10)
            image_times.append(time.perf_counter() - t)
    print(json.dumps({
        "cases": args.n, "model": str(args.model), "timings": timings,
        "text_search_ms (cold: each query new)": {"p50": _pct(cold_times, 50), "p95": _pct(cold_times, 95),
                                                  "n": len(cold_times)},
        "text_search_ms (repeated queries)": {"p50": _pct(text_times, 50), "p95": _pct(text_times, 95),
                                              "n": len(text_times)},
        "image_search_ms (demo-size volume in memory: preprocess + encode + search)":
            {"p50": _pct(image_times, 50), "p95": _pct(image_times, 95), "n": len(image_times)},
    }, indent=2))


if __name__ == "__main__":
    main()
