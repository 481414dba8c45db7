"""Load test: start the app, run N concurrent gradio_client clients doing mixed text and image
searches for a fixed time on loopback only, and print JSON (requests, errors, latencies, peak RSS).

Usage: python benchmarks/app_load.py [--clients 20] [--seconds 60] [--image-share 0.2] [--think-seconds 0]
       [--index DIR --model DIR]   (default: the demo index, built on first use)

With ``--think-seconds 0`` every client fires its next request the moment the last one returns
(a closed loop: the worst case, and what the default measures); a positive value makes each
client pause a random 0.5x-1.5x of it between requests, as a person reading results does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
QUERIES = ["pleural effusion", "right pleural effusion", "cardiomegaly", "lung nodule without emphysema",
           "enlarged heart", "collapsed lung", "swollen lymph nodes", "consolidation", "emphysema",
           "hiatal hernia", "pericardial effusion", "ground glass", "no pleural effusion", "atelectasis"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(q * (len(values) - 1))))], 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--image-share", type=float, default=0.2, help="fraction of requests that are image searches")
    parser.add_argument("--index", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--image", type=Path, help="CT used for image searches (default: a demo example)")
    parser.add_argument("--warmup-seconds", type=float, default=5.0,
                        help="latencies of requests sent after this are also reported on their own")
    parser.add_argument("--think-seconds", type=float, default=0.0,
                        help="mean pause of each client between its requests (0 = back to back)")
    args = parser.parse_args()

    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(_free_port()),
               GRADIO_ANALYTICS_ENABLED="False")
    if args.index:
        env["MEDFINDER_INDEX"] = str(args.index)
    if args.model:
        env["MEDFINDER_MODEL"] = str(args.model)
    url = f"http://127.0.0.1:{env['GRADIO_SERVER_PORT']}/"
    server = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    process = psutil.Process(server.pid)
    peak_rss = 0
    try:
        from gradio_client import Client, handle_file

        started = time.monotonic()
        client = None
        while time.monotonic() - started < 600:
            if server.poll() is not None:
                raise SystemExit(f"the app exited: {server.stderr.read().decode()[-2000:]}")
            try:
                client = Client(url, verbose=False)
                break
            except Exception:
                time.sleep(1.0)
        if client is None:
            raise SystemExit("the app did not start within 10 minutes")
        if args.image is None:
            sys.path.insert(0, str(REPO))
            from medfinder.demo import ensure_demo_examples

            image = list(ensure_demo_examples().values())[-1]  # a demo-size chest phantom
        else:
            image = args.image
        latencies: dict[str, list[float]] = {"text": [], "image": []}
        # The first seconds, when all clients connect at once, are also left out in a second summary.
        steady: dict[str, list[float]] = {"text": [], "image": []}
        steady_from = time.monotonic() + args.warmup_seconds
        errors: list[str] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds

        scratch = Path(tempfile.mkdtemp(prefix="app-load-"))

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            c = Client(url, verbose=False)
            # Each client uploads its own scan (a byte-different copy), as different users would.
            own = scratch / f"client{seed}_{image.name}"
            shutil.copy(image, own)
            with open(own, "ab") as fh:
                fh.write(b"\0" * (seed + 1))  # trailing bytes after the gzip stream: a distinct file
            while time.monotonic() < stop_at:
                kind = "image" if rng.random() < args.image_share else "text"
                t = time.perf_counter()
                after_warmup = time.monotonic() >= steady_from
                try:
                    if kind == "text":
                        c.predict(rng.choice(QUERIES), [], [], "any", 0, 100, 10, api_name="/search_text")
                    else:
                        c.predict(handle_file(str(own)), "Similar cases", 10, api_name="/search_image")
                    with lock:
                        latencies[kind].append(time.perf_counter() - t)
                        if after_warmup:
                            steady[kind].append(latencies[kind][-1])
                except Exception as exc:  # counted, never fatal: that is what we measure
                    with lock:
                        errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:120]}")
                if args.think_seconds > 0:
                    time.sleep(args.think_seconds * rng.uniform(0.5, 1.5))

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            try:
                peak_rss = max(peak_rss, process.memory_info().rss + sum(
                    c.memory_info().rss for c in process.children(recursive=True)))
            except psutil.Error:
                pass
            time.sleep(0.2)
        requests = sum(len(v) for v in latencies.values()) + len(errors)
        print(json.dumps({
            "clients": args.clients, "seconds": args.seconds, "think_seconds": args.think_seconds,
            "image_share": args.image_share, "requests": requests, "errors": len(errors),
            "error_samples": errors[:5],
            "text": {"n": len(latencies["text"]), "p50_s": _percentile(latencies["text"], 0.5),
                     "p95_s": _percentile(latencies["text"], 0.95),
                     "mean_s": round(statistics.mean(latencies["text"]), 4) if latencies["text"] else None},
            "image": {"n": len(latencies["image"]), "p50_s": _percentile(latencies["image"], 0.5),
                      "p95_s": _percentile(latencies["image"], 0.95)},
            f"after_first_{args.warmup_seconds:g}_s": {
                kind: {"n": len(v), "p50_s": _percentile(v, 0.5), "p95_s": _percentile(v, 0.95)}
                for kind, v in steady.items()},
            "throughput_rps": round(requests / args.seconds, 2),
            "peak_rss_mb": round(peak_rss / 1e6, 1),
        }, indent=2))
    finally:
        if "scratch" in locals():
            shutil.rmtree(scratch, ignore_errors=True)
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
