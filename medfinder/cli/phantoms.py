"""``phantoms`` (also ``python -m medfinder.phantoms``): write synthetic chest CT cases.

Writes ``OUT/images/*.nii.gz``, ``OUT/manifest.csv`` (``case_id,image,report``, one 0/1 column per
finding label, ``sex,age``) and ``OUT/findings.jsonl`` (each finding's voxel box: the ground truth
of evidence), or with ``--render DIR`` the four example pictures of the README.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    from ..phantoms import DEMO_SHAPE, DEMO_SPACING

    p.add_argument("--n", type=int, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (same seed, same cases)")
    p.add_argument("--out", type=Path, help="output folder")
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=list(DEMO_SHAPE))
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=list(DEMO_SPACING))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--render", type=Path, metavar="DIR", help="write the four example PNGs to DIR instead")


def run(args: argparse.Namespace) -> int:
    from ..phantoms import render_examples, write_corpus
    from .support import fail

    if args.render is not None:
        for path in render_examples(args.render):
            print(path)
        return 0
    if args.n is None or args.out is None:
        fail("--n and --out are required (or --render DIR).")
    print(write_corpus(args.n, args.seed, args.out, tuple(args.shape), tuple(args.spacing), args.workers))
    return 0
