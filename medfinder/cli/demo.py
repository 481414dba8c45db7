"""``demo-index``: build the demo index from synthetic phantoms."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    from ..demo import DEMO_INDEX_DIR

    p.add_argument("--out", type=Path, default=DEMO_INDEX_DIR, help="index folder (default: demo_index)")
    p.add_argument("--workers", type=int, default=2, help="processes painting phantoms and loading scans")


def run(args: argparse.Namespace) -> int:
    from ..demo import ensure_demo_index

    ensure_demo_index(args.out, workers=args.workers)
    print(f"Demo index ready at {args.out}")
    return 0
