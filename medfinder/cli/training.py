"""Commands that train and measure models: ``train``, ``evaluate`` and ``recipe``.

Manifests written by the recipe name their phantoms ``phantom:SEED:INDEX`` rather than files;
these commands paint such a case again when they read it (``medfinder.phantoms.load_scan``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def configure_train(p: argparse.ArgumentParser) -> None:
    from ..training.settings import DEFAULT_CONFIG, TrainSettings

    defaults = TrainSettings(manifest="", out="")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", nargs="+", help="manifest CSV(s): case_id,image,report,labels... (several are joined)")
    source.add_argument("--bimcv-r", type=Path, metavar="ROOT", help="a BIMCV-R dataset folder (scans and reports)")
    source.add_argument("--ct-rate", type=Path, metavar="ROOT", help="a CT-RATE dataset folder (scans and reports)")
    p.add_argument("--out", required=True, help="output model folder (best checkpoint; resume state inside)")
    p.add_argument("--config", default=None,
                   help=f"bundled config name or JSON path (default {DEFAULT_CONFIG}, or --init's own config)")
    p.add_argument("--init", default=None,
                   help="start from this model folder's weights (in --config's architecture and "
                        "preprocessing when both are given)")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--text-lr", type=float, default=None, help="learning rate of a fine-tuned text tower")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--warmup-fraction", type=float, default=defaults.warmup_fraction)
    p.add_argument("--accumulate", type=int, default=defaults.accumulate, help="gradient accumulation steps")
    p.add_argument("--workers", type=int, default=defaults.workers, help="processes that load and preprocess volumes")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--contrastive-weight", type=float, default=defaults.contrastive_weight,
                   help="weight of the image-report InfoNCE (0 with --label-head-weight: a supervised stage)")
    p.add_argument("--view-weight", type=float, default=defaults.view_weight,
                   help="weight of the two-view consistency term (0 = a single view per step)")
    p.add_argument("--finding-weight", type=float, default=defaults.finding_weight,
                   help="weight of the auxiliary finding loss on the manifest's label columns (0 = off)")
    p.add_argument("--label-head-weight", type=float, default=defaults.label_head_weight,
                   help="weight of a training-only linear classifier on image-tower features (0 = off)")
    p.add_argument("--label-balance", type=float, default=defaults.label_balance,
                   help="weigh each finding's positives in the label head's loss by (negatives / positives) "
                        "to this power: 0 = off, 0.5 = square root, 1 = fully balanced")
    p.add_argument("--lock-image", action="store_true",
                   help="keep the image tower of --init fixed and train projections and temperature on its "
                        "cached features (LiT); epochs then take seconds")
    p.add_argument("--feature-views", type=int, default=defaults.feature_views,
                   help="views per volume cached with --lock-image (the first as preprocessed, the rest augmented)")
    p.add_argument("--full-report-probability", type=float, default=defaults.full_report_probability)
    p.add_argument("--min-window-fraction", type=float, default=defaults.min_window_fraction)
    p.add_argument("--no-cache", action="store_true", help="stream volumes instead of keeping them in memory")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on a GPU")
    p.add_argument("--no-augment", action="store_true", help="train on the volumes as preprocessed (no random views)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute the image tower's stages in the backward pass: less GPU memory for a large tower")
    p.add_argument("--device", default=defaults.device, choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when present; under torchrun each process takes the GPU of its LOCAL_RANK")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")


def run_train(a: argparse.Namespace) -> int:
    from ..phantoms import load_scan
    from ..training.settings import TrainSettings
    from ..training.train import train
    from .support import fail

    if a.lock_image and not (a.init or a.resume or _pretrained_image(a.config)):
        fail("--lock-image keeps a trained image tower fixed: give --init MODEL_DIR, or a --config whose image "
             "tower is pretrained (ct-i3resnet152-lit).")
    if a.epochs < 1 or a.batch_size < 2 or a.accumulate < 1 or a.workers < 0 or a.lr <= 0:
        fail("--epochs and --accumulate must be >= 1, --batch-size >= 2, --workers >= 0 and --lr > 0.")
    if not 0 <= a.label_balance <= 1:
        fail(f"--label-balance must be between 0 and 1, not {a.label_balance}.")
    records = None
    if a.manifest:
        manifest = os.pathsep.join(a.manifest)
    else:  # a dataset layout: scans paired with their reports
        from ..io import read_bimcv_r, read_ct_rate

        records = read_bimcv_r(a.bimcv_r) if a.bimcv_r else read_ct_rate(a.ct_rate)
        manifest = f"bimcv-r:{a.bimcv_r}" if a.bimcv_r else f"ct-rate:{a.ct_rate}"
    settings = TrainSettings(
        manifest=manifest, out=a.out, config=a.config, init=a.init, epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr, text_lr=a.text_lr, weight_decay=a.weight_decay,
        warmup_fraction=a.warmup_fraction, accumulate=a.accumulate, workers=a.workers, seed=a.seed,
        view_weight=a.view_weight, contrastive_weight=a.contrastive_weight, finding_weight=a.finding_weight,
        label_head_weight=a.label_head_weight, label_balance=a.label_balance, lock_image=a.lock_image,
        feature_views=a.feature_views, full_report_probability=a.full_report_probability,
        min_window_fraction=a.min_window_fraction, cache=not a.no_cache, amp=not a.no_amp, device=a.device,
        max_steps=a.max_steps, augment=not a.no_augment, activation_checkpointing=a.activation_checkpointing,
    )
    result = train(settings, records=records, resume=a.resume, loader=load_scan)
    if int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun, one summary (rank 0's)
        print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))
    return 0


def _pretrained_image(config: str | None) -> bool:
    """Whether a config's image tower comes with pretrained weights (so --lock-image needs no --init)."""
    if not config:
        return False
    from ..model import load_config

    return bool(load_config(config).image.weights)


def configure_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder or built-in model name")
    p.add_argument("--manifest", required=True, type=Path, help="manifest CSV: case_id,image,report,labels...")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for loading volumes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")


def run_evaluate(args: argparse.Namespace) -> int:
    from ..phantoms import load_scan
    from ..training.evaluate import evaluate_manifest, json_safe

    result = evaluate_manifest(args.model, args.manifest, args.split, workers=args.workers,
                               batch_size=args.batch_size, loader=load_scan)
    print(json.dumps(json_safe(result), indent=2) if args.json else _evaluation_summary(result))
    return 0


def _evaluation_summary(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']} ({result['fingerprint']}), {result['cases']} cases, split {result['split']}"]
    for direction in ("text_to_image", "image_to_text"):
        m = result[direction]
        lines.append(
            f"{direction:14s} R@1 {m['R@1']:.3f}  R@5 {m['R@5']:.3f}  R@10 {m['R@10']:.3f}  "
            f"MdR {m['median_rank']:.1f}  MnR {m['mean_rank']:.1f}"
        )
    if "keyword" in result:
        mean = result["keyword"]["mean"]
        lines.append(f"keyword        P@10 {mean['P@10']:.3f}  P@20 {mean['P@20']:.3f}")
        for name, entry in result["keyword"]["per_finding"].items():
            lines.append(f"  {name:36s} n={entry['positives']:4d}  P@10 {entry['P@10']:.2f}  P@20 {entry['P@20']:.2f}")
    if "image_to_image_label_overlap" in result:
        for k, m in result["image_to_image_label_overlap"].items():
            lines.append(f"label overlap{k:4s}  {m['overlap']:.3f} (chance {m['chance']:.3f})")
    return "\n".join(lines)


def configure_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, required=True,
                   help="phantoms 0..N-1 of the corpus; the ~10%% in the test split (by case id) are not painted")
    p.add_argument("--seed", type=int, required=True, help="phantom corpus seed (keep it apart from evaluation seeds)")
    p.add_argument("--init", required=True, help="model folder whose weights both stages start from")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--candidate", action="append", default=None,
                   help="config to train (bundled name or JSON path); repeat for several (default: --init's own)")
    p.add_argument("--workers", type=int, default=2, help="processes that paint and preprocess phantoms")
    p.add_argument("--stage1-epochs", type=int, default=4)
    p.add_argument("--stage1-lr", type=float, default=1e-3)
    p.add_argument("--stage2-epochs", type=int, default=60)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--parallel", action="store_true",
                   help="train the candidates side by side, one process each (a single candidate trains in this one)")


def run_recipe(args: argparse.Namespace) -> int:
    from ..training.recipe import RecipeSettings
    from ..training.recipe import run_recipe as cycle
    from .support import fail

    if args.n < 10 or args.workers < 1 or args.stage1_epochs < 1 or args.stage2_epochs < 1:
        fail("--n must be at least 10, and --workers and the epochs at least 1.")
    settings = RecipeSettings(
        n=args.n, seed=args.seed, init=args.init, out=args.out, candidates=tuple(args.candidate or ()),
        workers=args.workers, stage1_epochs=args.stage1_epochs, stage1_lr=args.stage1_lr,
        stage2_epochs=args.stage2_epochs, device=args.device, parallel=args.parallel,
    )
    summary = cycle(settings, command=args.invocation)
    print(json.dumps(summary, indent=2))
    return 0
