"""How fast the synthetic corpus is written: cases per second for N cases with W workers.

    python benchmarks/phantom_speed.py --n 300 --workers 2
    python benchmarks/phantom_speed.py --n 1 --workers 1 --shape 512 512 300 --spacing 0.7 0.7 1.0

Prints one JSON object. The issue's target: 300 demo-size cases in under 180 s with 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medfinder.phantoms import DEMO_SHAPE, DEMO_SPACING, write_corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", type=int, nargs=3, default=list(DEMO_SHAPE))
    ap.add_argument("--spacing", type=float, nargs=3, default=list(DEMO_SPACING))
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        manifest = write_corpus(args.n, args.seed, Path(tmp), tuple(args.shape), tuple(args.spacing),
                                workers=args.workers, progress=False)
        seconds = time.perf_counter() - t0
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = time.process_time() - cpu0 + children.ru_utime + children.ru_stime
        size = sum(p.stat().st_size for p in (Path(tmp) / "images").iterdir())
        assert manifest.exists()
    print(json.dumps({
        "benchmark": "phantom_speed", "n": args.n, "workers": args.workers, "shape": args.shape,
        "spacing": args.spacing, "seconds": round(seconds, 2), "cases_per_s": round(args.n / seconds, 3),
        "cpu_s_per_case": round(cpu / args.n, 3), "mb_per_case": round(size / args.n / 1e6, 2),
        "cpu_count": os.cpu_count(), "load_avg_before": round(load_before, 2),
        "peak_rss_mb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
