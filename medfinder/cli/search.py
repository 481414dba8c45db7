"""Commands that read: ``search``, ``info`` and ``check``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .support import fail


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, required=True, help="index folder")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="findings or symptoms, e.g. 'right pleural effusion'")
    q.add_argument("--image", type=Path, help="a CT: .nii/.nii.gz, DICOM folder or .zip, .nrrd, .npy")
    q.add_argument("--study", metavar="STUDY_UID_OR_ACCESSION",
                   help="a study in the PACS (with --dicomweb): its main CT series is the query")
    p.add_argument("--dicomweb", metavar="URL", help="the PACS's DICOMweb root, for --study (credentials: "
                   "MEDFINDER_DICOMWEB_USER and MEDFINDER_DICOMWEB_PASSWORD, or MEDFINDER_DICOMWEB_TOKEN)")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--channel", choices=("keyword", "text", "image", "report"),
                   help="one channel only (default: the fused ranking)")
    p.add_argument("--model", help="model folder or built-in model name (default: the one that built the index)")
    p.add_argument("--include", action="append", default=[], metavar="FINDING", help="only cases with this finding")
    p.add_argument("--exclude", action="append", default=[], metavar="FINDING", help="no cases with this finding")
    p.add_argument("--json", action="store_true", help="one JSON array on stdout, best first")
    p.add_argument("--evidence", action="store_true",
                   help="also say where in each result's scan the match lies (world RAS+ mm; runs the model per result)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")


def run(args: argparse.Namespace) -> int:
    from ..search import Searcher, SearchFilters

    if args.k < 1:
        fail(f"-k must be at least 1, not {args.k}.")
    if not args.index.is_dir():
        fail(f"{args.index}: the index folder does not exist.")
    if args.image is not None and not args.image.exists():
        fail(f"{args.image}: the image file does not exist.")
    if (args.study is None) != (args.dicomweb is None):
        fail("--study and --dicomweb go together: the study is looked up in that PACS.")
    client = None
    if args.study is not None:
        from ..io.dicomweb import PacsClient

        client = PacsClient(args.dicomweb)
        client.check()  # a wrong URL or credentials fail here, before the model loads
    searcher = Searcher.open(args.index, args.model, device=args.device)
    channels = None
    image_query = args.image is not None or args.study is not None
    if args.channel:
        # For image queries the CLI's 'text' channel means image-to-report.
        channels = ["report" if (image_query and args.channel == "text") else args.channel]
    filters = SearchFilters(include_findings=tuple(args.include), exclude_findings=tuple(args.exclude))
    if client is not None:
        from ..pacs import search_by_study

        results = search_by_study(searcher, client, args.study, k=args.k, channels=channels, filters=filters,
                                  evidence=args.evidence)
    else:
        results = searcher.search(text=args.text, image=args.image, k=args.k, channels=channels, filters=filters,
                                  evidence=args.evidence)
    if args.json:
        print(json.dumps([r.to_json() for r in results]))
        return 0
    for r in results:
        per = ", ".join(f"{c} #{h.rank} ({h.score:.3f})" for c, h in r.channels.items())
        print(f"{r.rank:>3}. {r.case_id}  score {r.score:.4f}  [{per}]")
        if r.present_findings():
            print(f"     findings in report: {', '.join(r.present_findings())}")
        for e in r.evidence or []:
            label = f"{e.finding} (report)" if e.finding else "image"
            print(f"     evidence {label}: ({e.ras_mm[0]:.1f}, {e.ras_mm[1]:.1f}, {e.ras_mm[2]:.1f}) mm, score {e.score:.2f}")
    if not results:
        print("No matching cases.")
    return 0


def configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, required=True, help="index folder")


def run_info(args: argparse.Namespace) -> int:
    from ..index import CaseIndex

    with CaseIndex.open(args.index, verify=False) as index:
        print(json.dumps(index.info(), indent=2, default=str))
    return 0


def configure_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", type=Path, nargs="+", help="CT files or DICOM folders")
    p.add_argument("--json", action="store_true")


def run_check(args: argparse.Namespace) -> int:
    """Exit 0 when every file loads; otherwise one sentence per refused file and exit 2."""
    from ..errors import VolumeError
    from ..io import load_volume

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
