"""How many test-time views an index's scans should be stored with: retrieval against the count.

    python benchmarks/test_time_views.py --manifest /tmp/ph3031/manifest.csv [--model assets/model]
        [--views 0 4 8] [--workers 2]

Embeds the manifest's scans once per view count, as ``index_build`` stores them
(``MedFinder.encode_image(..., test_time_augmentation=True)`` with the model's test-time
augmentation set to that many views, everything else as in its config), and scores what a text
query finds among them: single-finding precision@10/@20 (finding names against the scans alone)
and report-to-scan R@10, as ``medfinder.evaluate`` does. Also times the index-side encoding per
scan. Run it on selection seeds, never on the evaluation seed. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medfinder.demo import DEMO_MODEL_DIR  # noqa: E402
from medfinder.io.manifests import read_manifest  # noqa: E402
from medfinder.model import MedFinder  # noqa: E402
from medfinder.training.datasets import CaseDataset, batch_from_pipe, collate_for_pipe
from medfinder.training.evaluate import (  # noqa: E402
    finding_names_of,
    keyword_precision,
    label_matrix,
    retrieval_metrics,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    ap.add_argument("--views", type=int, nargs="+", default=[0, 4, 8])
    ap.add_argument("--workers", type=int, default=2, help="processes that load and preprocess the scans")
    args = ap.parse_args()

    model = MedFinder.from_pretrained(args.model)
    records = read_manifest(args.manifest)
    dataset = CaseDataset(records, model.make_preprocessor())
    images, kept = [], []
    batches = DataLoader(dataset, batch_size=8, num_workers=args.workers, collate_fn=collate_for_pipe)
    for batch in map(batch_from_pipe, batches):
        if batch is not None:
            images.append(batch["image"])
            kept.extend(dataset.records[i] for i in batch["index"].tolist())
    scans = torch.cat(images)
    names = finding_names_of(kept)
    labels = label_matrix(kept, names)
    finding_embeds = model.encode_text(names).double().numpy()
    report_embeds = model.encode_text([r.report for r in kept]).double().numpy()

    runs = []
    configured = model.test_time_augmentation
    for views in args.views:
        model.test_time_augmentation = replace(configured, views=views)
        started = time.perf_counter()
        embeds = model.encode_image(scans, test_time_augmentation=True).double().numpy()
        seconds = time.perf_counter() - started
        keyword = keyword_precision(finding_embeds @ embeds.T, labels, names)["mean"]
        runs.append({
            "views": views,
            "keyword_P@10": round(keyword["P@10"], 4),
            "keyword_P@20": round(keyword["P@20"], 4),
            "text_to_image_R@10": retrieval_metrics(report_embeds @ embeds.T)["R@10"],
            "encode_s_per_scan": round(seconds / len(kept), 4),
        })
    model.test_time_augmentation = configured
    print(json.dumps({
        "benchmark": "test_time_views",
        "manifest": str(args.manifest),
        "model": str(args.model),
        "fingerprint": model.fingerprint,
        "configured": {"views": configured.views, "translate_voxels": configured.translate_voxels,
                       "rotate_degrees": configured.rotate_degrees, "scale_range": configured.scale_range,
                       "seed": configured.seed},
        "cases": len(kept),
        "threads": torch.get_num_threads(),
        "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
