"""Load and preprocessing times for the real test CTs and a synthetic 512x512x300 int16 .nii.gz.

Usage: python benchmarks/load_speed.py [--repeat 3]
Prints JSON: seconds per file for load_volume (read + validate) and for the medfinder-demo
preprocessing, with the share taken by gzip decompression for the large file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medfinder.io.load import load_volume  # noqa: E402
from medfinder.transforms.preprocess import Preprocessor, get_preset  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    pre = Preprocessor(get_preset("medfinder-demo"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        big = rng.normal(0, 20, size=(512, 512, 300)).astype(np.int16) + 40
        big[:, :60] = -1000
        path = Path(tmp) / "big_512x512x300.nii.gz"
        nib.save(nib.Nifti1Image(big, np.diag([0.7, 0.7, 1.0, 1.0])), str(path))
        del big
        files = {
            "abdomen_ct_crop.nii.gz": DATA / "abdomen_ct_crop.nii.gz",
            "abdomen_ct_dicom (20 x 512x512, JPEG 2000)": DATA / "abdomen_ct_dicom",
            "synthetic 512x512x300 int16 .nii.gz": path,
        }
        for name, p in files.items():
            load_s = _best(lambda: load_volume(p), args.repeat)
            vol = load_volume(p)
            prep_s = _best(lambda: pre(vol), args.repeat)
            results[name] = {"load_validate_s": round(load_s, 3), "preprocess_s": round(prep_s, 3),
                             "total_s": round(load_s + prep_s, 3), "shape": list(vol.shape)}
        gunzip_s = _best(lambda: gzip.decompress(path.read_bytes()), args.repeat)
        results["synthetic 512x512x300 int16 .nii.gz"]["gunzip_only_s"] = round(gunzip_s, 3)
    print(json.dumps({"preset": "medfinder-demo", "repeat": args.repeat, "files": results}, indent=2))


if __name__ == "__main__":
    main()
