"""PACS throughput: an index build over DICOMweb against the same series read from local files, peak
memory against the number of series, and the listener's delay from the last instance to searchable.

    python benchmarks/pacs_build.py                        # 8, 16, 32 series; the demo model
    python benchmarks/pacs_build.py --series 8 16 32 64 --model ct-i3resnet152

It starts its own Orthanc (Debian orthanc + orthanc-dicomweb), uploads copies of the real abdomen series
(tests/data/abdomen_ct_dicom: 20 slices of 512x512, JPEG 2000) under new UIDs, and also writes them as a
DICOM tree on disk. Every build is ``python -m index_build`` in a subprocess, as users run it;
``cases_per_s`` is the build's own figure (fetching or reading, decoding, preprocessing, encoding,
writing; no start-up), ``peak_rss_mb`` the subprocess's maximum resident set (``wait4``). A build holds
one batch (8 cases) of prepared scans, so sizes from 8 series on compare the same working set. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from medfinder.demo import DEMO_MODEL_DIR  # noqa: E402
from medfinder.index import CaseIndex  # noqa: E402
from orthanc import AVAILABLE, SKIP_REASON, Orthanc, free_port  # noqa: E402

SOURCE = REPO / "tests" / "data" / "abdomen_ct_dicom"


def write_copies(tree: Path, start: int, stop: int) -> list[list[Path]]:
    """Copies ``start..stop-1`` of the abdomen series, each its own study, as folders under ``tree``."""
    out = []
    for i in range(start, stop):
        study, series = generate_uid(), generate_uid()
        folder = tree / f"series_{i:03d}"
        folder.mkdir(parents=True)
        files = []
        for path in sorted(SOURCE.iterdir()):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / path.name)
            files.append(folder / path.name)
        out.append(files)
    return out


def run_build(args: list[str], env: dict[str, str]) -> dict:
    """``python -m index_build ARGS``: its summary, wall time and peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "index_build", *args, "--quiet"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = [], []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read())) for s, b in
               ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"index_build {' '.join(args)} failed: {''.join(err)[-2000:]}")
    summary = json.loads("".join(out))
    return {"added": summary["added"], "build_s": summary["seconds"], "cases_per_s": summary["cases_per_s"],
            "command_wall_s": round(time.perf_counter() - started, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "skipped": summary.get("skipped", {})}


def listener_latency(server: Orthanc, model: str, root: Path, settle_s: float, env: dict[str, str]) -> dict:
    """Seconds from the last C-STORE answered to the series being committed (searchable)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    out, port = root / "listened", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medfinder", "listen", "--index", str(out), "--port", str(port),
                             "--host", "127.0.0.1", "--allow", "BENCH", "--settle", str(settle_s), "--model", model,
                             "--quiet"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(CTImageStorage, [pydicom.dcmread(next(SOURCE.iterdir())).file_meta.TransferSyntaxUID])
        deadline = time.monotonic() + 300
        assoc = None
        while assoc is None or not assoc.is_established:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"the listener did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)
            assoc = ae.associate("127.0.0.1", port, ae_title="MEDFINDER")
        series = write_copies(root / "pushed", 0, 1)[0]
        for path in series:
            assoc.send_c_store(pydicom.dcmread(path))
        assoc.release()
        last = time.perf_counter()
        while True:
            try:
                if CaseIndex.read_info(out)["counts"]["cases"] >= 1:
                    break
            except Exception:
                pass
            if time.perf_counter() - last > 300:
                raise SystemExit("the pushed series never became searchable")
            time.sleep(0.02)
        latency = time.perf_counter() - last
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"settle_s": settle_s, "last_instance_to_searchable_s": round(latency, 2),
            "beyond_settle_s": round(latency - settle_s, 2), "slices": len(series)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, nargs="+", default=[8, 16, 32], help="archive sizes to build (ascending)")
    ap.add_argument("--model", default=str(DEMO_MODEL_DIR))
    ap.add_argument("--repeat", type=int, default=2, help="builds per source at the largest size (best kept)")
    ap.add_argument("--settle", type=float, default=1.0, help="the listener's --settle")
    args = ap.parse_args()
    if not AVAILABLE:
        raise SystemExit(SKIP_REASON)
    sizes = sorted(set(args.series))
    with tempfile.TemporaryDirectory(prefix="pacs-bench-") as tmp:
        root = Path(tmp)
        server = Orthanc(root / "orthanc").start()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MEDFINDER_")}, **server.env()}
        try:
            tree, written, by_size = root / "tree", 0, []
            for n in sizes:
                for files in write_copies(tree, written, n):
                    server.upload(files)
                written = n
                run = run_build(["--dicomweb", server.dicomweb, "--out", str(root / f"web_{n}"), "--model",
                                 args.model], env)
                by_size.append({"series": n, **run})
            n = sizes[-1]
            web, files = [by_size[-1]], []
            for i in range(args.repeat):  # interleaved, so that a busy spell of the machine hits both
                files.append(run_build(["--dicom-tree", str(tree), "--out", str(root / f"files_{i}"), "--model",
                                        args.model], env))
                if i + 1 < args.repeat:
                    web.append(run_build(["--dicomweb", server.dicomweb, "--out", str(root / f"web_again_{i}"),
                                          "--model", args.model], env))
            best_web = max(web, key=lambda r: r["cases_per_s"])
            best_files = max(files, key=lambda r: r["cases_per_s"])
            listener = listener_latency(server, args.model, root, args.settle, env)
        finally:
            server.stop()
    rss = [r["peak_rss_mb"] for r in by_size]
    result = {
        "benchmark": "pacs_build",
        "series": "copies of tests/data/abdomen_ct_dicom (20 x 512x512 JPEG 2000), one study each",
        "model": args.model,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "throughput_at": n,
        "dicomweb": best_web,
        "files": best_files,
        "dicomweb_over_files_rate": round(best_web["cases_per_s"] / best_files["cases_per_s"], 3),
        "all_runs": {"dicomweb_cases_per_s": [r["cases_per_s"] for r in web],
                     "files_cases_per_s": [r["cases_per_s"] for r in files]},
        "peak_rss_by_series": [{"series": r["series"], "peak_rss_mb": r["peak_rss_mb"], "cases_per_s": r["cases_per_s"]}
                               for r in by_size],
        "peak_rss_growth_mb": round(rss[-1] - rss[0], 1),
        "listener": listener,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
