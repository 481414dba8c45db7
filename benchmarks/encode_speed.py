"""Time to embed one demo-size CT (about 160x160x128 at 2.2 mm), preprocessing included.

python benchmarks/encode_speed.py [--model DIR | --config NAME] [--image CT] [--repeats N] [--threads T]

Prints JSON: median and 90th-percentile seconds for preprocessing, encoding and both (a query
scan), and for encoding with the model's test-time views (a scan being indexed; only when the
model has views), on a phantom chest CT when medfinder.phantoms is available, else on a
synthetic body-like volume; ``--image`` times a CT of your own instead (a file or a DICOM folder).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from medfinder.io.volume import Volume
from medfinder.model import MedFinder, create_model_and_transforms


def demo_volume(shape: tuple[int, int, int] = (160, 160, 128), spacing: float = 2.2) -> tuple[Volume, str]:
    try:
        from medfinder.phantoms import generate_case

        return generate_case(seed=7, index=0, shape=shape, spacing=(spacing,) * 3).volume, "phantom"
    except ImportError:
        rng = np.random.default_rng(0)
        x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        body = (x / 0.9) ** 2 + (y / 0.7) ** 2 <= 1.0
        lungs = ((np.abs(x) - 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 1.1) ** 2 <= 1.0
        hu = np.where(body, 40, -1000) + rng.normal(0, 20, shape)
        hu[lungs & body] = -850
        affine = np.diag([spacing, spacing, spacing, 1.0])
        return Volume(hu=hu.astype(np.int16), spacing=(spacing,) * 3, affine=affine), "synthetic"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder; default: untrained --config")
    parser.add_argument("--config", default="medfinder-demo")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--image", type=Path, help="a CT to time instead of the phantom")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        model = MedFinder.from_pretrained(args.model)
        preprocessor = model.make_preprocessor()
    else:
        model, preprocessor = create_model_and_transforms(args.config)
    if args.image:
        from medfinder.io import load_volume

        volume, kind = load_volume(args.image), args.image.name
    else:
        volume, kind = demo_volume()
    for _ in range(3):  # warm-up: first calls allocate and pick kernels
        model.encode_image(preprocessor(volume))
    views = model.test_time_augmentation.views
    pre, enc, total, indexed = [], [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        x = preprocessor(volume)
        t1 = time.perf_counter()
        model.encode_image(x)
        t2 = time.perf_counter()
        pre.append(t1 - t0)
        enc.append(t2 - t1)
        total.append(t2 - t0)
        if views:
            t3 = time.perf_counter()
            model.encode_image(x, test_time_augmentation=True)
            indexed.append(time.perf_counter() - t3 + (t1 - t0))

    def stats(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {"median_s": round(statistics.median(values), 4), "p90_s": round(ordered[int(0.9 * (len(ordered) - 1))], 4)}

    print(json.dumps({
        "model": model.config.name,
        "volume": {"kind": kind, "shape": list(volume.hu.shape), "spacing_mm": list(volume.spacing)},
        "input": list(x.shape),  # the model's shape, or the scan's own extent within it
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "preprocess": stats(pre),
        "encode": stats(enc),
        "total": stats(total),
        "target_s": 0.3,
        # preprocessing included; what index_build spends on each scan's vector
        "index_encode": {"test_time_views": views, **stats(indexed)} if views else None,
    }, indent=2))


if __name__ == "__main__":
    main()
