"""Seconds per training sample of the image tower, fp32 against bf16 autocast, on this machine.

python benchmarks/train_step_speed.py [--config NAME] [--batch-size B] [--steps N] [--threads T]

One step = two augmented views of a batch of model-size inputs through the image tower,
a backward pass and an AdamW update, as ``medfinder.train`` does it end to end. Prints JSON:
median seconds per sample for fp32, fp32 with channels-last, and bf16 autocast with channels-last.
Training on a CPU stays fp32: the comment where ``medfinder.train.train`` sets ``amp`` says why.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from medfinder.model import create_model_and_transforms
from medfinder.training.train import TrainSettings
from medfinder.transforms.augment import augment_volumes


def seconds_per_sample(config: str, batch_size: int, steps: int, bf16: bool, channels_last: bool) -> float:
    torch.manual_seed(0)
    model, _ = create_model_and_transforms(config)
    tower = model.image.train()
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    tower.to(memory_format=layout)
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-4)
    settings = TrainSettings(manifest="", out="")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, model.preprocess_config.in_channels, *model.preprocess_config.shape)
    times = []
    for step in range(steps + 1):  # the first step picks kernels and allocates: not timed
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            views = [tower(augment_volumes(images, settings, generator).contiguous(memory_format=layout))
                     for _ in range(2)]
        loss = sum(v.float().pow(2).mean() for v in views)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append((time.perf_counter() - start) / batch_size)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="medfinder-demo")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    result = {
        "config": args.config,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native,
        "fp32_s_per_sample": seconds_per_sample(args.config, args.batch_size, args.steps, False, False),
        "fp32_channels_last_s_per_sample": seconds_per_sample(args.config, args.batch_size, args.steps, False, True),
        "bf16_channels_last_s_per_sample": seconds_per_sample(args.config, args.batch_size, args.steps, True, True),
    }
    result["bf16_speedup"] = round(result["fp32_s_per_sample"] / result["bf16_channels_last_s_per_sample"], 2)
    for key in [k for k in result if k.endswith("_s_per_sample")]:
        result[key] = round(result[key], 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
