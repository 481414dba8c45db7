"""HNSW (hnswlib) against exact numpy search: recall@10, queries/s, memory, build time.

    python benchmarks/ann_recall.py                       # 10^5 and 10^6 vectors, dim 256
    python benchmarks/ann_recall.py --n 100000 --dim 256 --ef 32 64 96 128

Prints one JSON object. The vectors are synthetic but clustered (a Gaussian mixture on the
unit sphere with uneven cluster sizes and spreads), because real report and image embeddings
are clustered by anatomy and finding; uniform noise on the sphere would be the wrong test
(every neighbour is nearly equidistant). Queries come from the same mixture but are not in the
index. "Single" figures send one query per call through the public ``query`` method, as the
app does; "batch" figures send all queries in one call.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medfinder.index.hnsw import HNSW_DEFAULTS, HnswIndex
from medfinder.index.vectors import ExactIndex, exact_search  # noqa: E402


def clustered_unit_vectors(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """n points of a mixture around ``centres``; each point's cosine to its centre is ~0.6-0.8."""
    n_clusters = centres.shape[0]
    # Lognormal weights: a few common presentations, a long tail of rare ones.
    weights = rng.lognormal(0.0, 1.0, n_clusters)
    members = rng.choice(n_clusters, size=n, p=weights / weights.sum())
    spread = rng.uniform(0.8, 1.4, n_clusters).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        block = members[start : start + step]
        noise = rng.standard_normal((block.shape[0], dim), dtype=np.float32) / np.sqrt(dim)
        out[start : start + step] = centres[block] + noise * spread[block, None]
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = sum(len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth))
    return hits / (truth.shape[0] * k)


def single_query_qps(index: object, queries: np.ndarray, k: int) -> tuple[float, float]:
    """(queries per second, median latency in ms) with one query per call."""
    latencies = []
    for query in queries:
        start = time.perf_counter()
        index.query(query[None, :], k)
        latencies.append(time.perf_counter() - start)
    latencies_array = np.asarray(latencies)
    return float(1.0 / latencies_array.mean()), float(np.median(latencies_array) * 1e3)


def _saved_size(index: HnswIndex) -> int:
    """Bytes of the index as CaseIndex writes it to disk."""
    with tempfile.TemporaryDirectory(prefix="ann-recall-") as tmp:
        path = Path(tmp) / "index.bin"
        index.save(path)
        return path.stat().st_size


def run_size(n: int, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    n_clusters = max(50, n // args.points_per_cluster)
    centres = rng.standard_normal((n_clusters, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    data = clustered_unit_vectors(n, args.dim, rng, centres)
    queries = clustered_unit_vectors(args.queries, args.dim, rng, centres)
    ids = np.arange(n, dtype=np.int64)
    k = args.k

    start = time.perf_counter()
    truth_rows, _ = exact_search(data, queries, k)
    exact_batch_s = time.perf_counter() - start
    truth = ids[truth_rows]

    exact = ExactIndex(args.dim, capacity=n)
    exact.add(ids, data)
    exact_qps, exact_ms = single_query_qps(exact, queries[: args.exact_single_queries], k)
    del exact
    gc.collect()

    rss_before = rss_bytes()
    start = time.perf_counter()
    # A fixed ef per sweep row: the library's own growth with the size (ef_for_size) is what
    # this sweep measures, so it must not apply here.
    hnsw = HnswIndex(args.dim, M=args.M, ef_construction=args.ef_construction, capacity=n, grow_ef=False)
    for begin in range(0, n, args.add_batch):
        hnsw.add(ids[begin : begin + args.add_batch], data[begin : begin + args.add_batch])
    build_s = time.perf_counter() - start
    rss_after = rss_bytes()

    sweep = []
    for ef in args.ef:
        hnsw.ef = ef
        start = time.perf_counter()
        found, _ = hnsw.query(queries, k)
        batch_s = time.perf_counter() - start
        single_qps, single_ms = single_query_qps(hnsw, queries[: args.hnsw_single_queries], k)
        sweep.append({
            "ef": ef,
            f"recall@{k}": round(recall_at(found, truth, k), 4),
            "single_qps": round(single_qps, 1),
            "single_p50_ms": round(single_ms, 3),
            "single_speedup_vs_exact": round(single_qps / exact_qps, 1),
            "batch_qps": round(args.queries / batch_s, 1),
            "batch_speedup_vs_exact": round(exact_batch_s / batch_s, 1),
        })

    meeting = [row for row in sweep if row[f"recall@{k}"] >= args.target_recall]
    best = min(meeting, key=lambda row: row["ef"]) if meeting else None
    result = {
        "n": n,
        "clusters": n_clusters,
        "exact": {
            "single_qps": round(exact_qps, 1),
            "single_p50_ms": round(exact_ms, 2),
            "batch_qps": round(args.queries / exact_batch_s, 1),
            "bytes_per_vector": args.dim * 4,
        },
        "hnsw": {
            "M": args.M,
            "ef_construction": args.ef_construction,
            "build_s": round(build_s, 1),
            "build_vectors_per_s": round(n / build_s, 1),
            "rss_bytes_per_vector": round((rss_after - rss_before) / n, 1),
            "file_bytes_per_vector": round(_saved_size(hnsw) / n, 1),
            "ef_sweep": sweep,
        },
        "smallest_ef_meeting_target": best,
        "target_met": bool(best and best["single_speedup_vs_exact"] >= args.target_speedup),
    }
    del hnsw, data
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256, help="the joint embedding size (medfinder-demo: 256)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--M", type=int, default=HNSW_DEFAULTS["M"])
    parser.add_argument("--ef-construction", type=int, default=HNSW_DEFAULTS["ef_construction"])
    parser.add_argument("--ef", type=int, nargs="+", default=[32, 48, 64, 96, 128, 256])
    parser.add_argument("--points-per-cluster", type=int, default=200)
    parser.add_argument("--add-batch", type=int, default=50_000)
    parser.add_argument("--exact-single-queries", type=int, default=30)
    parser.add_argument("--hnsw-single-queries", type=int, default=300)
    parser.add_argument("--target-recall", type=float, default=0.98)
    parser.add_argument("--target-speedup", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    results = [run_size(n, args, rng) for n in args.n]
    print(json.dumps({
        "benchmark": "ann_recall",
        "data": "clustered synthetic unit vectors (Gaussian mixture on the sphere), queries held out",
        "dim": args.dim,
        "k": args.k,
        "queries": args.queries,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
