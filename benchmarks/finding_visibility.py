"""How much of a small finding survives a model's preprocessing, per HU window channel.

python benchmarks/finding_visibility.py [--model DIR | --config NAME] [--seed 3031] [--cases 20]
    [--findings NAME ...]

For phantoms that show a finding, the volume is preprocessed twice: as generated, and with the
finding's voxels set to the median HU of a 2-voxel shell around them (the tissue it sits in). The
difference is what the image tower can see of the finding at its input grid. Prints JSON per
finding and window: the peak difference in HU (window units times window width, so a window's
clipping shows), and how many input voxels change by more than --min-hu; "invisible" counts the
cases where none does. A finding can be visible and still hard to rank (a lung nodule against
vessel cross-sections of the same size), so this bounds what a finer grid could add; it does not
predict precision.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from medfinder.model import MedFinder, create_model_and_transforms
from medfinder.phantoms import PHANTOM_FINDINGS, PhantomCase, generate_case
from medfinder.transforms.preprocess import Preprocessor

SMALL_FINDINGS = ("Coronary artery wall calcification", "Arterial wall calcification", "Lung nodule", "Lymphadenopathy")


def finding_signal(preprocessor: Preprocessor, case: PhantomCase, with_finding: np.ndarray, name: str,
                   min_hu: float) -> list[dict[str, float]]:
    """Per window: peak HU-equivalent difference and input voxels changed by more than min_hu.

    ``with_finding`` is ``preprocessor(case.volume)``, shared by every finding of the case.
    """
    mask = np.zeros(case.volume.hu.shape, bool)
    for finding in case.findings:
        if finding.name == name:
            mask |= finding.mask()
    shell = ndimage.binary_dilation(mask, iterations=2) & ~mask
    hu = case.volume.hu.copy()
    hu[mask] = int(np.median(case.volume.hu[shell]))
    without = preprocessor(replace(case.volume, hu=hu)).numpy()
    rows = []
    for channel, (low, high) in enumerate(preprocessor.config.windows):
        diff_hu = np.abs(with_finding[channel] - without[channel]) * (high - low)
        rows.append({"peak_hu": float(diff_hu.max()), "voxels": int((diff_hu > min_hu).sum())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder; default: the preprocessing of --config")
    parser.add_argument("--config", default="medfinder-demo")
    parser.add_argument("--seed", type=int, default=3031, help="phantom corpus seed")
    parser.add_argument("--cases", type=int, default=20, help="phantoms per finding")
    parser.add_argument("--max-index", type=int, default=400, help="phantoms searched for cases")
    parser.add_argument("--min-hu", type=float, default=25.0, help="a voxel counts as changed above this")
    parser.add_argument("--findings", nargs="+", default=list(SMALL_FINDINGS), choices=PHANTOM_FINDINGS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    preprocessor = (MedFinder.from_pretrained(args.model).make_preprocessor() if args.model
                    else create_model_and_transforms(args.config)[1])
    signals: dict[str, list[list[dict[str, float]]]] = {name: [] for name in args.findings}
    for index in range(args.max_index):
        wanted = [name for name, rows in signals.items() if len(rows) < args.cases]
        if not wanted:
            break
        case = generate_case(args.seed, index)
        shown = [name for name in wanted if any(f.name == name for f in case.findings)]
        if shown:
            with_finding = preprocessor(case.volume).numpy()
            for name in shown:
                signals[name].append(finding_signal(preprocessor, case, with_finding, name, args.min_hu))
    config = preprocessor.config
    result = {"benchmark": "finding_visibility", "model": args.model or args.config, "seed": args.seed,
              "spacing_mm": list(config.spacing), "min_hu": args.min_hu, "findings": {}}
    for name, cases in signals.items():
        per_window = {}
        for channel, (low, high) in enumerate(config.windows):
            peaks = np.array([c[channel]["peak_hu"] for c in cases])
            voxels = np.array([c[channel]["voxels"] for c in cases])
            per_window[f"{low:g}..{high:g} HU"] = {
                "peak_hu_median": round(float(np.median(peaks)), 1),
                "peak_hu_p10_p90": [round(float(np.percentile(peaks, q)), 1) for q in (10, 90)],
                "voxels_median": float(np.median(voxels)),
                "invisible": int((voxels == 0).sum()),
            }
        result["findings"][name] = {"cases": len(cases), "windows": per_window}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
