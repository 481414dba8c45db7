"""``build`` (also ``python -m index_build``): build or extend an index from a manifest or a dataset layout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .support import fail

#: The model ``build`` uses on a user's own data: the real-CT tower (the demo model is the demo's).
DEFAULT_MODEL = "ct-i3resnet152"


def configure(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="CSV with case_id,image,report (image relative to the CSV)")
    source.add_argument("--bimcv-r", type=Path, metavar="ROOT", help="a BIMCV-R dataset folder")
    source.add_argument("--ct-rate", type=Path, metavar="ROOT", help="a CT-RATE dataset folder")
    source.add_argument("--dicom-tree", type=Path, metavar="ROOT", help="a folder of DICOM series (no reports)")
    p.add_argument("--out", type=Path, required=True, help="index folder (created, or extended when it exists)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder or built-in model name (default: {DEFAULT_MODEL}, the real-CT tower)")
    p.add_argument("--workers", type=int, default=0, help="processes loading and preprocessing volumes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", choices=("hnsw", "exact"), default="hnsw")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model encodes")
    p.add_argument("--commit-every", type=float, default=30.0, metavar="SECONDS",
                   help="commit at least this often, bounding the work an interruption loses (default 30)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..index.build import build_index
    from ..io import read_bimcv_r, read_ct_rate, read_dicom_tree, read_manifest

    if args.workers < 0:
        fail("--workers must be 0 or more.")
    if args.manifest:
        records, source = read_manifest(args.manifest), str(args.manifest)
    elif args.bimcv_r:
        records, source = read_bimcv_r(args.bimcv_r), f"bimcv-r:{args.bimcv_r}"
    elif args.ct_rate:
        records, source = read_ct_rate(args.ct_rate), f"ct-rate:{args.ct_rate}"
    else:
        records, source = read_dicom_tree(args.dicom_tree), "dicom-tree"
    _warn_if_demo_model_on_real_scans(args.model, records)
    summary = build_index(records, args.out, model=args.model, workers=args.workers, batch_size=args.batch_size,
                          settings={"backend": args.backend, "source": source}, device=args.device,
                          commit_every_s=args.commit_every, progress=not args.quiet)
    print(json.dumps(summary.to_json(), indent=2))
    return 0


def _warn_if_demo_model_on_real_scans(model: str, records: list) -> None:
    """The demo model learnt from synthetic phantoms only: on real scans its image vectors say nothing."""
    from ..demo import DEMO_MODEL_DIR
    from ..model import read_fingerprint

    demo = read_fingerprint(DEMO_MODEL_DIR)
    real = [r for r in records if r.image is not None and not r.case_id.startswith("phantom-")]
    if real and demo is not None and read_fingerprint(model) == demo:
        print(f"warning: the demo model was trained on synthetic phantoms only; its image vectors are not meaningful "
              f"on the {len(real)} real scan(s) here. Use --model ct-i3resnet152 (the default) for real CT.",
              file=sys.stderr)
