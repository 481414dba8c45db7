"""index_build throughput: cases per second on N demo-size phantoms, for each worker count.

    python benchmarks/build_throughput.py                      # 300 phantoms, workers 2 and 0
    python benchmarks/build_throughput.py --manifest M.csv --workers 0 1 2

Each worker count builds a fresh index with ``python -m index_build`` in a subprocess (the
way users run it, imports and model load included) and times the whole command; the
``build_s`` figure is index_build's own summary (loading, preprocessing, encoding and
writing, without start-up). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medfinder.demo import DEMO_MODEL_DIR  # noqa: E402
from medfinder.phantoms import write_corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="phantoms to generate when no --manifest is given")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--manifest", type=Path, help="an existing manifest instead of fresh phantoms")
    ap.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 0])
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="build-throughput-") as tmp:
        manifest = args.manifest or write_corpus(args.n, args.seed, Path(tmp) / "corpus", workers=2, progress=False)
        runs = []
        for workers in args.workers:
            out = Path(tmp) / f"index_w{workers}"
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "index_build", "--manifest", str(manifest), "--out", str(out),
                 "--model", str(args.model), "--workers", str(workers), "--batch-size", str(args.batch_size),
                 "--quiet"], cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if proc.returncode != 0:
                raise SystemExit(f"index_build with {workers} workers failed: {proc.stderr[-2000:]}")
            summary = json.loads(proc.stdout)
            runs.append({
                "workers": workers, "added": summary["added"], "failed": summary["failed"],
                "build_s": summary["seconds"], "cases_per_s": summary["cases_per_s"],
                "command_wall_s": round(wall, 2), "load_avg_before": round(load_before, 2),
            })
    by_workers = {r["workers"]: r for r in runs}
    result = {"benchmark": "build_throughput", "manifest": str(args.manifest or f"{args.n} phantoms, seed {args.seed}"),
              "model": str(args.model), "cpu_count": os.cpu_count(), "runs": runs}
    if 0 in by_workers and len(by_workers) > 1:
        base = by_workers[0]["cases_per_s"]
        result["speedup_vs_0_workers"] = {str(w): round(r["cases_per_s"] / base, 2)
                                          for w, r in by_workers.items() if w != 0 and base}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
