"""The Milvus backend against the HNSW files: recall@10, single-query latency, insert time, in one run.

    python benchmarks/milvus_recall.py                    # 10^5 clustered vectors, dim 256
    python benchmarks/milvus_recall.py --n 100000 --milvus milvus://host:19530   # a Milvus server

Prints one JSON object. The vectors are ``benchmarks/ann_recall.py``'s clustered unit vectors
(queries from the same mixture, not in the index) and ground truth is exact search. Both backends are
driven through MedFinder's own ``VectorIndex`` objects as an index uses them: ``HnswIndex`` with its
defaults (search ef grown with the size by ``ef_for_size``) and ``MilvusIndex`` on a new collection
(COSINE, AUTOINDEX, strong consistency, every search filtered by the committed-label rule), timed
after a reader's open (``load_collection``, where Milvus Lite builds its index). "Single" latencies
send one query per call, as the app does; "batch" sends all queries in one call. Without ``--milvus`` the collection lives in an
embedded Milvus Lite file (a temporary folder); a Milvus standalone or cluster is given by address.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ann_recall import clustered_unit_vectors, recall_at  # noqa: E402

from medfinder.index.hnsw import HnswIndex, ef_for_size  # noqa: E402
from medfinder.index.milvus import MilvusIndex, connect, disconnect, normalise_uri  # noqa: E402
from medfinder.index.vectors import exact_search  # noqa: E402


def single_latencies(index: object, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels of every query, per-query latency in seconds), one query per call."""
    found, latencies = [], []
    for query in queries:
        start = time.perf_counter()
        labels, _ = index.query(query[None, :], k)
        latencies.append(time.perf_counter() - start)
        found.append(labels[0])
    return np.stack(found), np.asarray(latencies)


def summary(found: np.ndarray, truth: np.ndarray, latencies: np.ndarray, k: int) -> dict:
    return {
        f"recall@{k}": round(recall_at(found, truth, k), 4),
        "single_p50_ms": round(float(np.median(latencies)) * 1e3, 3),
        "single_p95_ms": round(float(np.percentile(latencies, 95)) * 1e3, 3),
        "single_qps": round(float(1.0 / latencies.mean()), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--points-per-cluster", type=int, default=200)
    parser.add_argument("--add-batch", type=int, default=10_000)
    parser.add_argument("--milvus", default=None, help="a Milvus address (default: a Milvus Lite file)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    n_clusters = max(50, args.n // args.points_per_cluster)
    centres = rng.standard_normal((n_clusters, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    data = clustered_unit_vectors(args.n, args.dim, rng, centres)
    queries = clustered_unit_vectors(args.queries, args.dim, rng, centres)
    ids = np.arange(args.n, dtype=np.int64)
    truth_rows, _ = exact_search(data, queries, args.k)
    truth = ids[truth_rows]

    start = time.perf_counter()
    hnsw = HnswIndex(args.dim, capacity=args.n)
    for begin in range(0, args.n, args.add_batch):
        hnsw.add(ids[begin : begin + args.add_batch], data[begin : begin + args.add_batch])
    hnsw_build_s = time.perf_counter() - start
    found, latencies = single_latencies(hnsw, queries, args.k)
    hnsw_result = {"build_s": round(hnsw_build_s, 1), "ef": max(hnsw.ef, ef_for_size(args.n)), "M": hnsw.M,
                   **summary(found, truth, latencies, args.k)}

    with tempfile.TemporaryDirectory(prefix="milvus-recall-") as tmp:
        folder = Path(tmp)
        recorded = normalise_uri(args.milvus or "milvus-lite", folder)
        client = connect(recorded, folder)
        collection = f"medfinder_bench_{uuid.uuid4().hex[:12]}"
        try:
            start = time.perf_counter()
            milvus = MilvusIndex.create(client, collection, args.dim, recorded)
            for begin in range(0, args.n, args.add_batch):
                milvus.add(ids[begin : begin + args.add_batch], data[begin : begin + args.add_batch])
            insert_s = time.perf_counter() - start
            # A reader opening the index in another process loads the collection, and Milvus Lite builds
            # its index then; in this process, flushing the growing segment first does the same.
            client.flush(collection)
            client.release_collection(collection)
            start = time.perf_counter()
            milvus = MilvusIndex.open(client, collection, args.dim, args.n, set(), recorded)
            open_s = time.perf_counter() - start
            start = time.perf_counter()
            milvus.query(queries[:1], args.k)
            first_query_s = time.perf_counter() - start
            found, latencies = single_latencies(milvus, queries, args.k)
            start = time.perf_counter()
            batch_found, _ = milvus.query(queries, args.k)
            batch_s = time.perf_counter() - start
            milvus_result = {"insert_s": round(insert_s, 1), "open_s": round(open_s, 1),
                             "first_query_s": round(first_query_s, 2),
                             **summary(found, truth, latencies, args.k),
                             "batch_qps": round(args.queries / batch_s, 1),
                             f"batch_recall@{args.k}": round(recall_at(batch_found, truth, args.k), 4)}
        finally:
            try:
                client.drop_collection(collection)
            finally:
                disconnect(client, recorded, folder)

    import pymilvus

    try:
        import milvus_lite

        lite_version = milvus_lite.__version__
    except (ImportError, AttributeError):
        lite_version = None
    print(json.dumps({
        "benchmark": "milvus_recall",
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "data": "clustered synthetic unit vectors (benchmarks/ann_recall.py), queries held out",
        "n": args.n, "dim": args.dim, "k": args.k, "queries": args.queries, "clusters": n_clusters,
        "milvus": {"address": "milvus-lite (temporary file)" if args.milvus is None else recorded,
                   "pymilvus": pymilvus.__version__, "milvus_lite": lite_version, "index": "AUTOINDEX, COSINE"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "hnsw": hnsw_result,
        "milvus_backend": milvus_result,
    }, indent=2))


if __name__ == "__main__":
    main()
