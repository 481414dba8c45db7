"""``listen``: a DICOM Storage SCP that adds the CT studies a PACS or a modality sends to an index."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from .support import fail


def configure(p: argparse.ArgumentParser) -> None:
    # The listener's defaults apply where an option is not given (importing it here would load PyTorch
    # for every command's --help).
    p.add_argument("--index", type=Path, required=True, help="index folder (created when absent)")
    p.add_argument("--port", type=int, required=True, help="TCP port for DICOM associations, e.g. 11112")
    p.add_argument("--ae-title", help="this node's AE title (default MEDFINDER)")
    p.add_argument("--allow", action="append", default=[], metavar="AE_TITLE",
                   help="an AE title allowed to send (repeatable; at least one); others are rejected")
    p.add_argument("--settle", type=float, metavar="SECONDS",
                   help="a study is indexed once no instance arrived for this long (default 10)")
    p.add_argument("--model", help="model folder or built-in name (default: the index's own; for a new index "
                                   "ct-i3resnet152)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: every interface)")
    p.add_argument("--quiet", action="store_true", help="no line per indexed series")


def run(args: argparse.Namespace) -> int:
    """Listen until SIGINT or SIGTERM; then commit and print a JSON summary."""
    from ..index import CaseIndex
    from ..pacs.listener import StudyListener
    from .build import DEFAULT_MODEL

    if not args.allow:
        fail("Give at least one --allow AE_TITLE: the listener accepts studies only from the AE titles you name.")
    if args.index.exists() and not args.index.is_dir():
        fail(f"{args.index}: not a folder.")
    model = args.model
    if model is None:
        model = CaseIndex.read_info(args.index)["model"]["id"] if (args.index / "index.json").exists() else DEFAULT_MODEL
    given = {"ae_title": args.ae_title, "settle_s": args.settle}
    listener = StudyListener(args.index, model, port=args.port, allow=args.allow, host=args.host,
                             progress=not args.quiet, **{k: v for k, v in given.items() if v is not None})
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        listener.start()
        summary = listener.serve(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(json.dumps(summary.to_json(), indent=2))
    return 0
