"""Text-query fusion: reciprocal rank fusion against a weighted sum of normalised scores.

    python benchmarks/fusion_compare.py --manifest /tmp/ph2026/manifest.csv [--model assets/model]

Indexes the manifest's cases (reports and images) with the model, then asks every finding by its
label name and by the paraphrases in ``paraphrase_queries.yaml`` (whose labels the phantoms
carry), and scores precision@10 and @20 against the manifest's label columns for: each channel
alone (keyword, text = report similarity, image = text-to-image) and the fused ranking by RRF and
by the weighted sum. Two settings: the index as built (every case has its report), and an index
whose reports are withheld from the text channels for half the cases (``--report-share``), which
is what an archive with missing or unparsed reports looks like. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medfinder.demo import DEMO_MODEL_DIR  # noqa: E402
from medfinder.index import CaseIndex  # noqa: E402
from medfinder.index.build import build_index  # noqa: E402
from medfinder.io.manifests import ManifestCase, read_manifest  # noqa: E402
from medfinder.model import MedFinder  # noqa: E402
from medfinder.search import Searcher  # noqa: E402

KS = (10, 20)


def _queries(records: list[ManifestCase]) -> list[tuple[str, str]]:
    labels = {name for r in records for name in r.labels}
    out = [(name, name) for name in sorted(labels)]
    spec = yaml.safe_load((REPO / "benchmarks" / "paraphrase_queries.yaml").read_text(encoding="utf-8"))
    out += [(q["query"], q["label"]) for q in spec["queries"] if q["label"] in labels]
    return out


def _precision(ids: list[str], positives: set[str], k: int) -> float:
    return sum(1 for c in ids[:k] if c in positives) / k


def _evaluate(searcher: Searcher, queries: list[tuple[str, str]], positives: dict[str, set[str]]) -> dict:
    variants = {"keyword": ("rrf", ["keyword"]), "text": ("rrf", ["text"]), "image": ("rrf", ["image"]),
                "fused_rrf": ("rrf", None), "fused_weighted": ("weighted", None)}
    scores: dict[str, dict[str, list[float]]] = {v: {f"P@{k}": [] for k in KS} for v in variants}
    for name, (fusion, channels) in variants.items():
        searcher.fusion = fusion
        for query, label in queries:
            ids = [r.case_id for r in searcher.search(text=query, k=max(KS), channels=channels)]
            for k in KS:
                scores[name][f"P@{k}"].append(_precision(ids, positives[label], k))
    return {name: {m: round(float(np.mean(v)), 3) for m, v in s.items()} for name, s in scores.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    ap.add_argument("--report-share", type=float, default=0.5,
                    help="share of cases that keep their report in the second setting")
    args = ap.parse_args()
    records = read_manifest(args.manifest)
    queries = _queries(records)
    positives = {label: {r.case_id for r in records if r.labels.get(label) == 1} for _, label in queries}
    model = MedFinder.from_pretrained(args.model)
    rng = np.random.default_rng(0)
    keep = set(rng.choice([r.case_id for r in records], size=int(args.report_share * len(records)),
                          replace=False).tolist())
    partial = [ManifestCase(r.case_id, r.image, r.report if r.case_id in keep else "", r.labels, r.metadata)
               for r in records]
    result = {"benchmark": "fusion_compare", "manifest": str(args.manifest), "model": str(args.model),
              "cases": len(records), "queries": len(queries)}
    with tempfile.TemporaryDirectory(prefix="fusion-") as tmp:
        for setting, recs in (("all_reports", records), (f"reports_for_{args.report_share:.0%}", partial)):
            out = Path(tmp) / setting
            build_index(recs, out, model=args.model, workers=2, progress=False)
            searcher = Searcher(CaseIndex.open(out, fingerprint=model.fingerprint), model)
            result[setting] = _evaluate(searcher, queries, positives)
            searcher.index.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
