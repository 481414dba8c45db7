"""Data-parallel training across processes and machines (DDP), as ``torchrun`` launches it.

``torchrun --nproc_per_node N -m medfinder.train ...`` starts N copies of the trainer with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; ``setup`` turns that
environment into a process group (NCCL on GPUs, gloo on CPUs). Without those variables nothing here
does anything and the trainer runs as one process, as it always has.

What each rank does differently from a single process:

- **Sampling**: a ``DistributedSampler`` gives each rank its share of every epoch's shuffled cases
  (``sampler``); with a locked image tower every rank draws the same global batches and keeps its
  slice (``shard``). The global batch is ``--batch-size`` x ranks.
- **The contrastive loss sees every rank's features**: ``gather_features`` all-gathers image and
  text embeddings *with gradients* (``torch.distributed.nn.functional.all_gather``, whose backward
  sums each rank's gradient into its own slice), and every rank computes the loss over the global
  batch, as open_clip's ``gather_features(..., gather_with_grad=True)`` does. DDP then averages the
  parameter gradients, which gives exactly the single-process gradient of the global batch (tested).
- **Running means**: ``Centering`` averages its batch mean over the ranks (``MedFinder``'s model layer),
  so the centre is the global batch's. BatchNorm statistics stay per rank, as plain DDP keeps them:
  use ``norm: "instance"`` for a tower whose output must not depend on how a batch is split.
- **Writing**: rank 0 alone validates, writes checkpoints, logs and ``training.json``; the others wait.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..devices import resolve_device
from ..errors import MedFinderError


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a data-parallel run (one process: rank 0 of 1).

    Args:
        rank: this process's rank among all processes.
        local_rank: its rank on this machine (which GPU it drives).
        world_size: how many processes train together.
        started: whether ``setup`` created the process group (and ``cleanup`` must destroy it).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    started: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes (checkpoints, logs, the best model)."""
        return self.rank == 0


def setup(device: str = "auto") -> tuple[Distributed, torch.device]:
    """The process group torchrun's environment describes, and this process's device.

    Without ``WORLD_SIZE`` > 1 in the environment: a single process, and ``device`` as resolved
    by ``medfinder.devices.resolve_device``. On CUDA each rank drives GPU ``LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    resolved = resolve_device(device)
    if world_size <= 1:
        return Distributed(), resolved
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise MedFinderError("WORLD_SIZE is set but RANK is not: start distributed training with torchrun.") from None
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise MedFinderError(
                f"Rank {rank} wants GPU {local_rank}, but this machine has {torch.cuda.device_count()}; "
                "give torchrun --nproc_per_node no more than its GPUs."
            )
        torch.cuda.set_device(local_rank)
        resolved = torch.device("cuda", local_rank)
    started = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        started = True
    return Distributed(rank=rank, local_rank=local_rank, world_size=world_size, started=started), resolved


def cleanup(context: Distributed) -> None:
    if context.started and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Distributed) -> None:
    if context.enabled:
        dist.barrier()


def gather_features(features: torch.Tensor, context: Distributed) -> torch.Tensor:
    """Every rank's ``features`` (B_r, D) concatenated in rank order, gradients flowing back to each
    rank's own rows. Ranks may hold different numbers of rows."""
    if not context.enabled:
        return features
    import torch.distributed.nn.functional as dist_nn

    sizes = _sizes(features.shape[0], features.device)
    padded = F.pad(features, (0, 0, 0, max(sizes) - features.shape[0]))
    with warnings.catch_warnings():
        # Deprecated in favour of a private module (torch.distributed._functional_collectives);
        # this public one is what open_clip uses and works with gloo and NCCL alike.
        warnings.simplefilter("ignore", FutureWarning)
        gathered = dist_nn.all_gather(padded)
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)], dim=0)


def gather_rows(rows: torch.Tensor, context: Distributed) -> torch.Tensor:
    """``gather_features`` without gradients (feature banks), in rank order."""
    if not context.enabled:
        return rows
    sizes = _sizes(rows.shape[0], rows.device)
    padded = F.pad(rows, (0, 0) * (rows.ndim - 1) + (0, max(sizes) - rows.shape[0]))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)


def _sizes(size: int, device: torch.device) -> list[int]:
    mine = torch.tensor([size], device=device)
    sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(s.item()) for s in sizes]


def sampler(dataset: Any, context: Distributed, seed: int, drop_last: bool) -> Any:
    """Each rank's share of an epoch's shuffled cases (call ``set_epoch`` every epoch)."""
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True,
                              seed=seed, drop_last=drop_last)


def shard(items: Sequence[Any], context: Distributed) -> list[Any]:
    """This rank's slice of a global batch (or of a list of volumes): every ``world_size``-th item."""
    return list(items[context.rank :: context.world_size])


def mean_across(value: float, context: Distributed) -> float:
    """The mean of a number over the ranks (a loss to log)."""
    if not context.enabled:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item()) / context.world_size


def union_of(items: dict[str, str], context: Distributed) -> dict[str, str]:
    """The union of every rank's dictionary (cases that failed to load, say)."""
    if not context.enabled:
        return dict(items)
    parts: list[Any] = [None] * context.world_size
    dist.all_gather_object(parts, dict(items))
    merged: dict[str, str] = {}
    for part in parts:
        merged.update(part)
    return merged


def rank_seed(seed: int, *parts: int) -> int:
    """A seed of its own for each (rank, epoch, ...): random streams no two ranks share, and that a
    resumed run can draw again without saving every rank's generator state."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])
