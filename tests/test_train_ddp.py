"""Data-parallel training: two gloo processes on the CPU against one process with the same global batch,
rank 0's checkpoints, a resumed torchrun run, and activation checkpointing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from test_datasets import write_tiny_corpus

from medfinder.io.manifests import read_manifest, select_split, split_of
from medfinder.training.train import CHECKPOINT_DIR, LOG_FILE, STATE_FILE, TrainSettings, train

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recording_first_gradients(store: dict[str, Any]) -> Any:
    """Wrap clip_grad_norm_ (the trainer calls it once per optimiser step, after DDP has averaged the
    gradients) so that the first step's gradients are kept, in the model's parameter order."""
    original = torch.nn.utils.clip_grad_norm_

    def recording(parameters: Any, *args: Any, **kwargs: Any) -> Any:
        parameters = list(parameters)
        if "grads" not in store:
            store["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in parameters]
        return original(parameters, *args, **kwargs)

    return recording


def _rank(rank: int, world: int, port: int, settings: dict[str, Any], out: str) -> None:
    """One rank, as torchrun would start it (its environment), running the real trainer."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    store: dict[str, Any] = {}
    torch.nn.utils.clip_grad_norm_ = _recording_first_gradients(store)
    result = train(TrainSettings(**settings))
    torch.save({"grads": store["grads"], "steps": result["steps"], "ranks": result.get("ranks")}, f"{out}.{rank}")


def _equal_split_corpus(folder: Path) -> tuple[Path, int]:
    """A tiny corpus whose training split has an even number of cases (one global batch of all of them)."""
    for n in range(12, 24):
        train_ids = [f"case{i:03d}" for i in range(n) if split_of(f"case{i:03d}") == "train"]
        if len(train_ids) % 2 == 0:
            manifest = write_tiny_corpus(folder, n=n)
            assert len(select_split(read_manifest(manifest), "train")) == len(train_ids)
            return manifest, len(train_ids)
    raise AssertionError("no corpus size gives an even training split")


def _tiny_config(folder: Path) -> Path:
    """medfinder-tiny with instance norm (a batch-independent tower) and embedding centering on."""
    from medfinder.model import load_config

    config = load_config("medfinder-tiny").to_dict()
    config["image"]["norm"] = "instance"
    config["centering"] = True
    config["name"] = "medfinder-tiny-instance"
    path = folder / "tiny-instance.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_two_gloo_ranks_take_the_single_process_step_of_the_same_global_batch(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks of batch B and one process of batch 2B compute the same first-step loss and gradients.

    The step is made computably identical: the global batch is the whole training split (so which
    rank holds which case does not matter); no augmentation (``augment=False``: the ranks draw other
    views than one process would) and one view (``view_weight=0``); whole reports
    (``full_report_probability=1``: no report windows drawn); an instance-norm tower (BatchNorm
    statistics are per rank under DDP); centering on, whose running mean the ranks must average for
    the centre to be the global batch's. What is checked is what DDP must get right: every rank's
    features in the contrastive loss (all-gather with gradients), gradients averaged into exactly the
    single-process gradient, the centre, and rank 0 alone writing the checkpoint and the log.
    Tolerance: 1e-5 on the loss; on each parameter's gradient, a distance of at most 1e-4 of its
    norm plus 1e-5 (float sums in another order: measured 2e-6 to 1.4e-5 relative; the absolute part
    is for gradients that are zero but for rounding, such as a convolution bias before a norm).
    """
    manifest, n_train = _equal_split_corpus(tmp_path / "corpus")
    config = _tiny_config(tmp_path)
    common = dict(manifest=str(manifest), config=str(config), epochs=1, max_steps=1, view_weight=0.0,
                  full_report_probability=1.0, augment=False, seed=3, workers=0, lr=1e-3)

    store: dict[str, Any] = {}
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", _recording_first_gradients(store))
    single = train(TrainSettings(out=str(tmp_path / "single"), batch_size=n_train, **common))
    assert single["steps"] == 1
    single_loss = json.loads((tmp_path / "single" / LOG_FILE).read_text().splitlines()[0])["loss"]

    out = tmp_path / "ddp"
    mp.spawn(_rank, args=(2, _free_port(), {**common, "out": str(out), "batch_size": n_train // 2},
                          str(tmp_path / "grads")), nprocs=2, join=True)
    ranks = [torch.load(f"{tmp_path / 'grads'}.{r}", weights_only=True) for r in range(2)]
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert len(log) == 1 and log[0]["ranks"] == 2, "rank 0 alone writes the log"
    assert (out / CHECKPOINT_DIR / STATE_FILE).is_file() and not list((out / CHECKPOINT_DIR).glob("*.tmp"))
    assert ranks[0]["steps"] == ranks[1]["steps"] == 1 and ranks[0]["ranks"] == 2
    assert log[0]["loss"] == pytest.approx(single_loss, abs=1e-5)

    reference = store["grads"]
    assert sum(g is not None for g in reference) >= 4  # image tower, projections, temperature
    for rank in ranks:
        assert [g is None for g in rank["grads"]] == [g is None for g in reference]
        for got, want in zip(rank["grads"], reference):
            if want is not None:
                assert float((got - want).norm()) <= 1e-4 * float(want.norm()) + 1e-5, tuple(want.shape)

    # torchrun resumes the two-rank run from rank 0's checkpoint, through the command line.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "medfinder.train", "--manifest", str(manifest), "--out", str(out),
               "--config", str(config), "--epochs", "2", "--max-steps", "2", "--batch-size", str(n_train // 2),
               "--view-weight", "0", "--full-report-probability", "1", "--no-augment", "--seed", "3",
               "--device", "cpu", "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["steps"] == 2 and summary["ranks"] == 2 and summary["epochs"] == 2
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]
    state = torch.load(out / CHECKPOINT_DIR / STATE_FILE, weights_only=True)
    assert state["state"]["step"] == 2 and state["scheduler"]["last_epoch"] == 2


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    """Recomputing the stages in the backward pass changes memory, not the result."""
    from medfinder.model import create_model_and_transforms

    torch.manual_seed(0)
    model, _ = create_model_and_transforms("medfinder-tiny")
    tower = model.image.train()
    images = torch.rand(2, 2, 16, 16, 16)
    grads = []
    for enabled in (False, True):
        tower.set_activation_checkpointing(enabled)
        tower.zero_grad()
        state = {k: v.clone() for k, v in tower.state_dict().items()}
        tower(images).square().sum().backward()
        grads.append([p.grad.clone() for p in tower.parameters()])
        tower.load_state_dict(state)  # BatchNorm's running statistics moved; the weights did not
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
