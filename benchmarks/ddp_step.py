"""A training step with 2 gloo processes (DDP) against 1 process, on this machine's CPUs.

    python benchmarks/ddp_step.py --config medfinder-demo --global-batch 8 --steps 5

One step is what ``medfinder.train`` does per optimiser step, through its own step module: two
augmented views of each volume through the image tower, the report tower (frozen, cached), the
contrastive loss over the global batch (all-gathered across the ranks), the view-consistency term,
backward (DDP averaging the gradients) and AdamW. Volumes are random tensors of the config's input
size; reports are fixed phantom-style sentences. Prints one JSON object: median seconds per step and
samples per second for one process (all CPUs' threads, and one thread) and for two ranks of half the
batch each (one thread each), with the same global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPORTS = [
    "Findings: Right pleural effusion with basal atelectasis. Heart size normal.",
    "Findings: No pleural effusion. Calcified nodule in the left upper lobe.",
    "Findings: Cardiomegaly. Small left pleural effusion. No pneumothorax.",
    "Findings: Emphysema in both upper lobes. No consolidation.",
]


def time_steps(rank: int, world: int, port: int, args: argparse.Namespace, threads: int, out: str | None) -> list[float]:
    from medfinder.model import create_model_and_transforms
    from medfinder.training import distributed
    from medfinder.training.losses import FindingLoss
    from medfinder.training.train import TrainSettings, _param_groups, _Step

    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
    context, device = distributed.setup("cpu")
    try:
        torch.manual_seed(0)
        model, _ = create_model_and_transforms(args.config)
        settings = TrainSettings(manifest="", out="")
        finding_loss = FindingLoss()
        step_module = _Step(model, finding_loss, None, settings, [], None, context)
        step: torch.nn.Module = step_module
        if context.enabled:
            from torch.nn.parallel import DistributedDataParallel

            step = DistributedDataParallel(step_module, find_unused_parameters=True)
        optimizer = torch.optim.AdamW(_param_groups(model, finding_loss, settings), lr=1e-4)
        local = args.global_batch // world
        generator = torch.Generator().manual_seed(rank)
        images = torch.rand(local, model.preprocess_config.in_channels, *model.preprocess_config.shape, generator=generator)
        reports = [REPORTS[(rank * local + i) % len(REPORTS)] for i in range(local)]
        model.train()
        times = []
        for index in range(args.steps + args.warmup):
            start = time.perf_counter()
            loss = step({"image": images, "report": reports}, reports, None, True, generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if index >= args.warmup:
                times.append(time.perf_counter() - start)
        if out is not None:
            Path(f"{out}.{rank}").write_text(json.dumps(times))
        return times
    finally:
        distributed.cleanup(context)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    time_steps(rank, world, port, args, 1, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="medfinder-demo")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1

    results = {}
    for label, threads in ((f"1 process, {cpus} threads", cpus), ("1 process, 1 thread", 1)):
        times = time_steps(0, 1, 0, args, threads, None)
        results[label] = statistics.median(times)
    with tempfile.TemporaryDirectory(prefix="ddp-step-") as tmp:
        mp.spawn(_rank, args=(2, free_port(), args, f"{tmp}/times"), nprocs=2, join=True)
        per_rank = [json.loads(Path(f"{tmp}/times.{r}").read_text()) for r in range(2)]
    # A DDP step ends when the slower rank's does.
    results["2 gloo ranks, 1 thread each"] = statistics.median(max(a, b) for a, b in zip(*per_rank))
    print(json.dumps({
        "benchmark": "ddp_step",
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "config": args.config,
        "global_batch": args.global_batch,
        "steps_timed": args.steps,
        "machine": {"cpus": cpus, "python": platform.python_version(), "torch": torch.__version__},
        "median_step_s": {k: round(v, 3) for k, v in results.items()},
        "samples_per_s": {k: round(args.global_batch / v, 2) for k, v in results.items()},
        "ddp_speedup_vs_1_process_all_threads": round(results[f"1 process, {cpus} threads"] / results["2 gloo ranks, 1 thread each"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
