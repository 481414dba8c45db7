"""python -m index_build --manifest CSV --out DIR [--model PATH] [--workers N]
(or --bimcv-r ROOT, --ct-rate ROOT, --dicom-tree ROOT instead of --manifest)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from medfinder.cli_support import CliParser, fail, run_guarded
from medfinder.demo import DEMO_MODEL_DIR


def _parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m index_build", description="Build or extend a MedFinder case index.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="CSV with case_id,image,report (image relative to the CSV)")
    source.add_argument("--bimcv-r", type=Path, metavar="ROOT", help="a BIMCV-R dataset folder")
    source.add_argument("--ct-rate", type=Path, metavar="ROOT", help="a CT-RATE dataset folder")
    source.add_argument("--dicom-tree", type=Path, metavar="ROOT", help="a folder of DICOM series (no reports)")
    p.add_argument("--out", type=Path, required=True, help="index folder (created, or extended when it exists)")
    p.add_argument("--model", type=Path, default=DEMO_MODEL_DIR, help="model folder (default: the demo model)")
    p.add_argument("--workers", type=int, default=0, help="processes loading and preprocessing volumes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", choices=("hnsw", "exact"), default="hnsw")
    p.add_argument("--commit-every", type=float, default=30.0, metavar="SECONDS",
                   help="commit at least this often, bounding the work an interruption loses (default 30)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 0:
        fail("--workers must be 0 or more.")
    from medfinder import datasets
    from index_build.build import build_index
    from index_build.dicom_tree import read_dicom_tree

    if args.manifest:
        records, source = datasets.read_manifest(args.manifest), str(args.manifest)
    elif args.bimcv_r:
        records, source = datasets.read_bimcv_r(args.bimcv_r), f"bimcv-r:{args.bimcv_r}"
    elif args.ct_rate:
        records, source = datasets.read_ct_rate(args.ct_rate), f"ct-rate:{args.ct_rate}"
    else:
        records, source = read_dicom_tree(args.dicom_tree), "dicom-tree"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    summary = build_index(records, args.out, model_dir=args.model, workers=args.workers,
                          batch_size=args.batch_size, settings={"backend": args.backend, "source": source},
                          commit_every_s=args.commit_every, progress=not args.quiet)
    print(json.dumps(summary.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
