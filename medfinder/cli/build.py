"""``build`` (also ``python -m index_build``): build or extend an index from a manifest, a dataset layout,
or a PACS over DICOMweb (``--dicomweb URL``; credentials only from the environment)."""

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
    source.add_argument("--dicomweb", metavar="URL",
                        help="a PACS's DICOMweb root, e.g. http://pacs:8042/dicom-web (credentials: "
                             "MEDFINDER_DICOMWEB_USER and MEDFINDER_DICOMWEB_PASSWORD, or MEDFINDER_DICOMWEB_TOKEN)")
    p.add_argument("--out", type=Path, required=True, help="index folder (created, or extended when it exists)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder or built-in model name (default: {DEFAULT_MODEL}, the real-CT tower)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes loading and preprocessing volumes (without --ray; Ray schedules its own)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", choices=("hnsw", "exact", "milvus"), default=None,
                   help="where a new index keeps its vectors: hnsw files (default), exact (numpy) or milvus")
    p.add_argument("--vectors", metavar="URI", default=None,
                   help="the Milvus of a new index (implies --backend milvus): milvus://host:19530, https://host:port, "
                        "milvus-lite (a file in the index folder) or milvus-lite:///path/vectors.db")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model encodes")
    ray = p.add_argument_group("Ray (scale-out)")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="prepare and encode on Ray: no ADDRESS starts a local Ray; 'auto' or ray://host:10001 "
                          "joins a cluster (this process stays the index's only writer)")
    ray.add_argument("--ray-actors", type=int, default=None, metavar="N", help="encoder actors, one model each (default 1); on CPUs, one per core with --ray-cpus-per-actor 0.5")
    ray.add_argument("--ray-gpus-per-actor", type=float, default=None, metavar="G",
                     help="GPUs per encoder actor (default 0: encode on CPUs)")
    ray.add_argument("--ray-cpus-per-actor", type=float, default=None, metavar="C",
                     help="CPUs per encoder actor, its PyTorch threads (default 1)")
    p.add_argument("--commit-every", type=float, default=30.0, metavar="SECONDS",
                   help="commit at least this often, bounding the work an interruption loses (default 30)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    pacs = p.add_argument_group("with --dicomweb")
    pacs.add_argument("--reports", type=Path, metavar="CSV",
                      help="reports by study: columns AccessionNumber,report or StudyInstanceUID,report "
                           "(default: the text of each study's DICOM structured reports)")
    pacs.add_argument("--since", metavar="YYYYMMDD", help="only studies from this StudyDate on")
    pacs.add_argument("--link-to-pacs", action="store_true",
                      help="keep Study and Series UIDs for 'Open in PACS viewer' (the index is then identifiable; "
                           "off by default)")


def run(args: argparse.Namespace) -> int:
    if args.workers < 0:
        fail("--workers must be 0 or more.")
    ray_options = {"actors": args.ray_actors, "gpus_per_actor": args.ray_gpus_per_actor,
                   "cpus_per_actor": args.ray_cpus_per_actor}
    if args.ray is None and any(v is not None for v in ray_options.values()):
        fail("--ray-actors, --ray-gpus-per-actor and --ray-cpus-per-actor need --ray.")
    backend = args.backend or ("milvus" if args.vectors else "hnsw")
    if args.vectors and backend != "milvus":
        fail(f"--vectors names where Milvus keeps the vectors; it cannot be combined with --backend {backend}.")
    args.backend_settings = {"backend": backend, **({"vectors": args.vectors} if args.vectors else {})}
    if args.dicomweb is None:
        given = [flag for flag, value in (("--reports", args.reports), ("--since", args.since),
                                          ("--link-to-pacs", args.link_to_pacs)) if value]
        if given:
            fail(f"{given[0]} applies to a PACS build only; add --dicomweb URL.")
    else:
        return _run_dicomweb(args)
    from ..index.build import build_index
    from ..io import read_bimcv_r, read_ct_rate, read_dicom_tree, read_manifest

    if args.manifest:
        records, source = read_manifest(args.manifest), str(args.manifest)
    elif args.bimcv_r:
        records, source = read_bimcv_r(args.bimcv_r), f"bimcv-r:{args.bimcv_r}"
    elif args.ct_rate:
        records, source = read_ct_rate(args.ct_rate), f"ct-rate:{args.ct_rate}"
    else:
        records, source = read_dicom_tree(args.dicom_tree), "dicom-tree"
    _warn_if_demo_model_on_real_scans(args.model, records)
    settings = {**args.backend_settings, "source": source}
    if args.ray is not None:
        from ..index.ray_build import build_index_with_ray

        chosen = {k: v for k, v in ray_options.items() if v is not None}
        summary = build_index_with_ray(records, args.out, model=args.model, address=args.ray, batch_size=args.batch_size,
                                       settings=settings, device=args.device, commit_every_s=args.commit_every,
                                       progress=not args.quiet, **chosen)
    else:
        summary = build_index(records, args.out, model=args.model, workers=args.workers, batch_size=args.batch_size,
                              settings=settings, device=args.device, commit_every_s=args.commit_every,
                              progress=not args.quiet)
    print(json.dumps(summary.to_json(), indent=2))
    return 0


def _run_dicomweb(args: argparse.Namespace) -> int:
    """The PACS build: checks the options, then ``medfinder.pacs.build_from_dicomweb``."""
    from ..io.dicomweb import PacsClient, check_study_date

    if args.workers:
        fail("A PACS build fetches one series at a time; --workers must be 0 with --dicomweb.")
    if args.ray is not None:
        fail("A PACS build fetches one series at a time in this process; --ray does not apply to --dicomweb.")
    if args.since is not None:
        try:
            check_study_date(args.since)
        except ValueError as exc:
            fail(str(exc))
    if args.reports is not None and not args.reports.is_file():
        fail(f"{args.reports}: the report table does not exist.")
    client = PacsClient(args.dicomweb)
    client.check()  # a wrong URL or credentials: one sentence in a second, before PyTorch and the model load
    if _is_demo_model(args.model):
        print("warning: the demo model was trained on synthetic phantoms only; its image vectors are not meaningful "
              "on a PACS's scans. Use --model ct-i3resnet152 (the default) for real CT.", file=sys.stderr)
    from ..pacs.build import build_from_dicomweb

    summary = build_from_dicomweb(args.dicomweb, args.out, model=args.model, reports=args.reports, since=args.since,
                                  link_to_pacs=args.link_to_pacs, client=client, settings=args.backend_settings,
                                  batch_size=args.batch_size, device=args.device, commit_every_s=args.commit_every,
                                  progress=not args.quiet)
    print(json.dumps(summary.to_json(), indent=2))
    return 0


def _is_demo_model(model: str) -> bool:
    from ..demo import DEMO_MODEL_DIR
    from ..model import read_fingerprint

    demo = read_fingerprint(DEMO_MODEL_DIR)
    return demo is not None and read_fingerprint(model) == demo


def _warn_if_demo_model_on_real_scans(model: str, records: list) -> None:
    """The demo model learnt from synthetic phantoms only: on real scans its image vectors say nothing."""
    real = [r for r in records if r.image is not None and not r.case_id.startswith("phantom-")]
    if real and _is_demo_model(model):
        print(f"warning: the demo model was trained on synthetic phantoms only; its image vectors are not meaningful "
              f"on the {len(real)} real scan(s) here. Use --model ct-i3resnet152 (the default) for real CT.",
              file=sys.stderr)
