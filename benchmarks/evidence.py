"""Evidence against the phantoms' ground truth: hit rates per finding, the baselines, the cost, as JSON.

    python benchmarks/evidence.py --corpus /tmp/ev4242 --n 100 --seed 4242
    python benchmarks/evidence.py --corpus /tmp/ev4242 --methods gradient gradcam features

The corpus (phantoms of a seed nothing trained or selected on, with ``findings.jsonl``) is written
and indexed with the demo model when ``--corpus`` does not hold it yet.

- **Text queries**: each finding's name, searched as a user would (the fused ranking). For each of the
  top 10 results whose report truly has that finding, the best evidence point is a *hit* when it lies
  inside one of that finding's boxes, each widened by 10 mm on every side (the box is mapped through the
  saved image's affine: the point goes into the image's voxel space).
- **Image queries**: phantoms of another seed searched by image; for each top-10 result that shares a
  finding (with a box) with the query, a hit when the best point lies in a widened box of a shared finding.
- **Baselines**, on the same cases: the scan's centre, and a random point inside the body (seeded).
- **Cost**: evidence seconds per result, and a search's latency with and without evidence.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medfinder.evidence import METHODS  # noqa: E402
from medfinder.index import build_index  # noqa: E402
from medfinder.io import load_volume, read_manifest  # noqa: E402
from medfinder.phantoms import FINDINGS_FILE, PHANTOM_FINDINGS, generate_case, write_corpus  # noqa: E402
from medfinder.search import Searcher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WIDEN_MM = 10.0


def boxes_of(corpus: Path) -> dict[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    """case id -> [(label, box (3, 2) half-open voxel ranges, saved image affine)]."""
    images = {r.case_id: r.image for r in read_manifest(corpus / "manifest.csv")}
    out: dict[str, list] = {}
    for line in (corpus / FINDINGS_FILE).read_text().splitlines():
        row = json.loads(line)
        affine = nib.load(str(images[row["case_id"]])).affine
        out[row["case_id"]] = [(f["label"], np.asarray(f["box"], dtype=float), affine) for f in row["findings"]]
    return out


def inside(point: tuple[float, float, float], box: np.ndarray, affine: np.ndarray) -> bool:
    """The world point in the box widened by WIDEN_MM on each side, in the image's voxel space."""
    voxel = np.linalg.solve(affine, np.array([*point, 1.0]))[:3]
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    margin = WIDEN_MM / spacing
    return bool(np.all(voxel >= box[:, 0] - 0.5 - margin) and np.all(voxel <= box[:, 1] - 0.5 + margin))


def baselines(volume, rng: np.random.Generator) -> dict[str, tuple[float, float, float]]:
    centre = volume.affine @ np.array([*(np.array(volume.shape) - 1) / 2, 1.0])
    body = np.argwhere(volume.hu > -500)
    pick = body[rng.integers(len(body))]
    random = volume.affine @ np.array([*pick, 1.0])
    return {"centre": tuple(centre[:3]), "random_in_body": tuple(random[:3])}


def rate(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def summarise(hits: dict[str, dict[str, list[bool]]]) -> dict:
    """hits[method][finding] -> per-finding rates and their mean over findings with any case."""
    out = {}
    for method, per in hits.items():
        rates = {f: rate(v) for f, v in sorted(per.items()) if v}
        out[method] = {"per_finding": rates, "cases": {f: len(v) for f, v in sorted(per.items()) if v},
                       "mean_over_findings": round(statistics.mean(rates.values()), 3) if rates else None}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--model", default=str(REPO / "assets" / "model"))
    parser.add_argument("--methods", nargs="+", default=["gradient"], choices=METHODS)
    parser.add_argument("--image-queries", type=int, default=12)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    corpus, index = args.corpus, args.corpus / "index"
    if not (corpus / "manifest.csv").exists():
        write_corpus(args.n, args.seed, corpus, workers=2, progress=False)
    if not (index / "index.json").exists():
        build_index(read_manifest(corpus / "manifest.csv"), index, model=args.model, workers=2, progress=False)
    truth = boxes_of(corpus)
    labels = {r.case_id: {k for k, v in r.labels.items() if v} for r in read_manifest(corpus / "manifest.csv")}
    rng = np.random.default_rng(args.seed)
    result: dict = {"corpus": str(corpus), "seed": args.seed, "cases": len(truth), "k": args.k,
                    "widen_mm": WIDEN_MM, "model": args.model}

    for kind in ("text", "image"):
        hits = {m: {} for m in [*args.methods, "centre", "random_in_body"]}
        seconds: dict[str, list[float]] = {m: [] for m in args.methods}
        queries = ([(name, name.lower()) for name in PHANTOM_FINDINGS] if kind == "text" else
                   [(None, generate_case(args.seed + 1, i)) for i in range(args.image_queries)])
        for method in args.methods:
            searcher = Searcher.open(index, args.model, evidence_method=method)
            for finding, query in queries:
                if kind == "text":
                    results = searcher.search(text=query, k=args.k)
                    wanted = {finding}
                else:
                    results = searcher.search(image=query.volume, k=args.k, channels=["image"])
                    query_boxes = {f.name for f in query.findings if f.mask_bbox() is not None}
                    wanted = query_boxes
                for r in results:
                    shared = [(label, box, aff) for label, box, aff in truth.get(r.case_id, [])
                              if label in wanted and label in labels[r.case_id]]
                    if not shared:
                        continue
                    started = time.perf_counter()
                    found = searcher.evidence(r)
                    seconds[method].append(time.perf_counter() - started)
                    point = found[0].ras_mm if found else None
                    for label in sorted({label for label, _, _ in shared}):  # sorted: the random baseline draws in a fixed order
                        boxes = [(box, aff) for lab, box, aff in shared if lab == label]
                        hit = point is not None and any(inside(point, box, aff) for box, aff in boxes)
                        hits[method].setdefault(label, []).append(hit)
                        if method == args.methods[0]:
                            volume = load_volume(r.source)
                            for name, base in baselines(volume, rng).items():
                                hits[name].setdefault(label, []).append(any(inside(base, b, a) for b, a in boxes))
        result[f"{kind}_queries"] = summarise(hits)
        result[f"{kind}_queries"]["evidence_s_per_result"] = {
            m: round(statistics.median(v), 3) for m, v in seconds.items() if v}

    searcher = Searcher.open(index, args.model)
    for evidence in (False, True):
        times = []
        for name in PHANTOM_FINDINGS[:6]:
            searcher._evidence_cache.clear()
            started = time.perf_counter()
            searcher.search(text=name.lower(), k=args.k, evidence=evidence)
            times.append(time.perf_counter() - started)
        result[f"search_s_{'with' if evidence else 'without'}_evidence_median"] = round(statistics.median(times), 3)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
