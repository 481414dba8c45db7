"""python -m medfinder: search an index, describe it, or build the demo index.

  python -m medfinder search --index DIR (--text Q | --image PATH) [-k K] [--json] [--channel C]
  python -m medfinder check FILE [FILE ...]
  python -m medfinder info --index DIR
  python -m medfinder demo-index [--out DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli_support import CliParser, fail, run_guarded
from .demo import DEMO_INDEX_DIR, DEMO_MODEL_DIR


def _parser() -> CliParser:
    p = CliParser(prog="python -m medfinder", description="MedFinder similar-case search for 3D CT.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=CliParser)
    s = sub.add_parser("search", help="search an index by text or by a CT")
    s.add_argument("--index", type=Path, required=True)
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="findings or symptoms, e.g. 'right pleural effusion'")
    q.add_argument("--image", type=Path, help="a CT: .nii/.nii.gz, DICOM folder or .zip, .nrrd, .npy")
    s.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    s.add_argument("--channel", choices=("keyword", "text", "image", "report"),
                   help="one channel only (default: the fused ranking)")
    s.add_argument("--model", type=Path, help="model folder (default: the one that built the index)")
    s.add_argument("--include", action="append", default=[], metavar="FINDING", help="only cases with this finding")
    s.add_argument("--exclude", action="append", default=[], metavar="FINDING", help="no cases with this finding")
    s.add_argument("--json", action="store_true", help="one JSON array on stdout, best first")
    c = sub.add_parser("check", help="load and validate CT files without searching")
    c.add_argument("paths", type=Path, nargs="+", help="CT files or DICOM folders")
    c.add_argument("--json", action="store_true")
    i = sub.add_parser("info", help="counts, model and settings of an index")
    i.add_argument("--index", type=Path, required=True)
    d = sub.add_parser("demo-index", help="build the demo index from synthetic phantoms")
    d.add_argument("--out", type=Path, default=DEMO_INDEX_DIR)
    d.add_argument("--workers", type=int, default=2)
    return p


def _search(args) -> int:
    from .search import Searcher, SearchFilters

    if args.k < 1:
        fail(f"-k must be at least 1, not {args.k}.")
    if not args.index.is_dir():
        fail(f"{args.index}: the index folder does not exist.")
    if args.image is not None and not args.image.exists():
        fail(f"{args.image}: the image file does not exist.")
    searcher = Searcher.open(args.index, args.model)
    channels = None
    if args.channel:
        # For image queries the CLI's 'text' channel means image-to-report.
        channels = ["report" if (args.image is not None and args.channel == "text") else args.channel]
    filters = SearchFilters(include_findings=tuple(args.include), exclude_findings=tuple(args.exclude))
    results = searcher.search(text=args.text, image=args.image, k=args.k, channels=channels, filters=filters)
    if args.json:
        print(json.dumps([r.to_json() for r in results]))
        return 0
    for r in results:
        per = ", ".join(f"{c} #{h.rank} ({h.score:.3f})" for c, h in r.channels.items())
        print(f"{r.rank:>3}. {r.case_id}  score {r.score:.4f}  [{per}]")
        if r.present_findings():
            print(f"     findings in report: {', '.join(r.present_findings())}")
    if not results:
        print("No matching cases.")
    return 0


def _check(args) -> int:
    """Exit 0 when every file loads; otherwise one sentence per refused file and exit 2."""
    from .errors import VolumeError
    from .volume import load_volume

    refused = 0
    summaries = []
    for path in args.paths:
        try:
            volume = load_volume(path)
        except VolumeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            refused += 1
            continue
        summaries.append({"path": str(path), "shape": list(volume.shape), "spacing_mm": list(volume.spacing),
                          "orientation": volume.orientation, "metadata": volume.metadata})
        if not args.json:
            print(repr(volume))
    if args.json:
        print(json.dumps(summaries, default=str))
    return 2 if refused else 0


def _info(args) -> int:
    from .index import CaseIndex

    with CaseIndex.open(args.index, verify=False) as index:
        print(json.dumps(index.info(), indent=2, default=str))
    return 0


def _demo_index(args) -> int:
    from .demo import ensure_demo_index

    ensure_demo_index(args.out, workers=args.workers, model_dir=DEMO_MODEL_DIR)
    print(f"Demo index ready at {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"search": _search, "check": _check, "info": _info, "demo-index": _demo_index}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(run_guarded(main))
