"""The demo weights' training cycle in one command: fresh phantoms, then both stages per candidate.

``python -m medfinder.recipe --n N --seed S --init MODEL_DIR --out DIR [--candidate CONFIG ...]
[--workers W] [--stage1-epochs E] [--stage2-epochs E] [--parallel]``

Each phantom is painted once, in ``W`` processes, and run through every candidate's preprocessing
while its volume is still in memory: nothing is written to disk and no volume is read back, so
the cores spend their time painting. Then, for each candidate config, stage 1 (the image tower
learns the findings through a training-only label head) and stage 2 (image tower locked, the
joint space learnt on cached features) run on those volumes, both through ``medfinder.train``,
starting from ``--init``'s weights in the candidate's preprocessing. On a GPU several candidates
train side by side (``--parallel``), one process each.

Training never looks at the test split, so the phantoms of ``0..N-1`` that fall in it (about
10 %, decided by case id) are not painted. ``DIR/manifest.csv`` records the painted corpus
(reports and labels; the image column names each phantom as ``phantom:SEED:INDEX``, which
``medfinder.train`` and ``medfinder.evaluate`` paint again when they read it), and
``DIR/<candidate>/stage1`` and ``DIR/<candidate>/stage2`` are model folders with their
``training.json``; the stage-2 folder is the candidate to evaluate.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import psutil
import torch

from ..errors import MedFinderError, os_error_sentence
from ..io.manifests import ManifestCase, read_manifest, split_of
from ..model import create_model_and_transforms
from ..phantoms import generate_case, phantom_case_id, phantom_path, write_manifest
from ..transforms.preprocess import PreprocessConfig, Preprocessor
from .datasets import pack_for_cache
from .train import TrainSettings, train

log = logging.getLogger("medfinder.recipe")

# Each worker process builds the candidates' preprocessors once, not once per phantom.
_PREPROCESSORS: dict[str, Preprocessor] = {}


def _init_worker(preprocess: dict[str, dict[str, Any]]) -> None:
    torch.set_num_threads(1)  # one core per process: the pool is the parallelism
    _PREPROCESSORS.clear()
    _PREPROCESSORS.update({name: Preprocessor(PreprocessConfig.from_dict(cfg)) for name, cfg in preprocess.items()})


def _paint(task: tuple[int, int]) -> tuple[list[str], dict[str, np.ndarray]]:
    seed, index = task
    case = generate_case(seed, index)
    packed = {name: pack_for_cache(p(case.volume)).numpy() for name, p in _PREPROCESSORS.items()}
    return case.manifest_row(str(phantom_path(seed, index))), packed


def training_indices(n: int, seed: int) -> list[int]:
    """Phantoms ``0..n-1`` of corpus ``seed`` outside the test split: the ones training can use."""
    return [i for i in range(n) if split_of(phantom_case_id(seed, i)) != "test"]


def paint_corpus(seed: int, indices: Sequence[int], preprocess: dict[str, dict[str, Any]], workers: int,
                 ) -> tuple[list[list[str]], dict[str, dict[str, np.ndarray]]]:
    """Manifest rows of phantoms ``indices`` of corpus ``seed`` and, per preprocessing name, their
    packed volumes by case id."""
    from tqdm.auto import tqdm

    rows: list[list[str]] = []
    volumes: dict[str, dict[str, np.ndarray]] = {name: {} for name in preprocess}
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    n = len(indices)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(preprocess,)) as pool:
            tasks = [(seed, i) for i in indices]
            for row, packed in tqdm(pool.map(_paint, tasks, chunksize=4), total=n, desc="phantoms", unit="case"):
                rows.append(row)
                for name, volume in packed.items():
                    volumes[name][row[0]] = volume
    except BrokenProcessPool:
        raise MedFinderError(
            f"A process painting phantoms died after {len(rows)} of {n} (out of memory? every painted "
            "volume is kept in memory for each candidate); try a smaller --n or fewer --workers."
        ) from None
    return rows, volumes


def painted_bytes(n: int, preprocess: dict[str, dict[str, Any]]) -> int:
    """Memory the painted volumes take until training ends: one byte per voxel and channel
    (``pack_for_cache``) for each phantom and candidate preprocessing."""
    return n * sum(PreprocessConfig.from_dict(cfg).in_channels * math.prod(cfg["shape"]) for cfg in preprocess.values())


def stage_settings(out: Path, config: str, name: str, init: str,
                   args: RecipeSettings) -> tuple[TrainSettings, TrainSettings]:
    """The README's two stages for one candidate config, written under ``out/name``."""
    manifest = str(out / "manifest.csv")
    stage1 = TrainSettings(
        manifest=manifest, out=str(out / name / "stage1"), config=config, init=init,
        epochs=args.stage1_epochs, batch_size=16, lr=args.stage1_lr, contrastive_weight=0.0,
        label_head_weight=1.0, view_weight=0.0, workers=0, device=args.device,
    )
    stage2 = replace(
        stage1, out=str(out / name / "stage2"), config=None, init=stage1.out, epochs=args.stage2_epochs,
        batch_size=64, lr=1e-3, contrastive_weight=1.0, label_head_weight=0.0, view_weight=0.5,
        finding_weight=2.0, lock_image=True, feature_views=4,
    )
    return stage1, stage2


def run_candidate(config: str, name: str, records: list[ManifestCase], volumes: dict[str, np.ndarray], out: Path,
                  init: str, args: RecipeSettings) -> dict[str, Any]:
    """Stage 1 then stage 2 for one candidate config; returns both training summaries."""
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    stage1, stage2 = stage_settings(out, config, name, init, args)
    started = time.perf_counter()
    first = train(stage1, records=records, preprocessed=volumes)
    second = train(stage2, records=records, preprocessed=volumes)
    summary = {"candidate": name, "config": config, "process": os.getpid(), "stage1": first, "stage2": second,
               "wall_s": round(time.perf_counter() - started, 1)}
    (out / name / "recipe.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _candidate_process(config: str, name: str, records: list[ManifestCase], volumes: dict[str, np.ndarray],
                       out: Path, init: str, args: RecipeSettings, threads: int, failures: Any) -> None:
    torch.set_num_threads(threads)  # the candidates share the cores for unpacking and collating batches
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {name}: %(message)s", force=True)
    try:
        run_candidate(config, name, records, volumes, out, init, args)
    except (MedFinderError, OSError) as exc:
        # The parent reports it as its one sentence; a traceback here would break that contract.
        failures.put((name, str(exc) if isinstance(exc, MedFinderError) else os_error_sentence(exc)))
        sys.exit(1)


def _train_side_by_side(names: dict[str, str], records: list[ManifestCase], volumes: dict[str, dict[str, np.ndarray]],
                        out: Path, init: str, args: RecipeSettings) -> None:
    """One forked process per candidate config (``names``: config -> output folder name); a failure
    in any of them becomes one sentence naming the candidate and its reason."""
    # Forked before this process touches CUDA, so each child starts its own context and shares
    # the painted volumes copy-on-write.
    ctx = mp.get_context("fork")
    threads = max(1, (os.cpu_count() or 1) // len(names))
    failures = ctx.SimpleQueue()
    procs = [ctx.Process(target=_candidate_process,
                         args=(c, name, records, volumes[c], out, init, args, threads, failures))
             for c, name in names.items()]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    reasons = {}
    while not failures.empty():
        name, reason = failures.get()
        reasons[name] = reason.rstrip(".")
    failed = [name for name, proc in zip(names.values(), procs) if proc.exitcode != 0]
    if failed:
        unknown = "its process ended with an error (see the log above)"
        raise MedFinderError("; ".join(f"Training candidate {name} failed: {reasons.get(name, unknown)}"
                                       for name in failed) + ".")


@dataclass(frozen=True)
class RecipeSettings:
    """One training cycle: phantoms ``0..n-1`` of corpus ``seed``, both stages per candidate config.

    Args:
        n, seed: the phantom corpus (the test-split phantoms among them are not painted).
        init: model folder whose weights both stages start from.
        out: output folder (must be new or empty).
        candidates: configs to train (bundled names or JSON paths); empty: ``init``'s own.
        workers: processes that paint and preprocess phantoms.
        stage1_epochs, stage1_lr, stage2_epochs: the two stages' length and stage 1's learning rate.
        device: "auto", "cpu" or "cuda".
        parallel: train the candidates side by side, one forked process each.
    """

    n: int
    seed: int
    init: str
    out: Path
    candidates: tuple[str, ...] = ()
    workers: int = 2
    stage1_epochs: int = 4
    stage1_lr: float = 1e-3
    stage2_epochs: int = 60
    device: str = "auto"
    parallel: bool = False


def run_recipe(args: RecipeSettings, command: str = "") -> dict[str, Any]:
    """Paint, train every candidate, and write ``out/recipe.json``; returns its summary."""
    init = str(args.init)
    candidates = list(args.candidates) or [init]
    if not Path(init).is_dir():
        raise MedFinderError(f"The --init model folder {init} does not exist.")
    # Each candidate's output folder is named after its config ("my-config.json" -> "my-config",
    # a model folder by its own name).
    names = {c: Path(c).resolve().stem if c.endswith(".json") else Path(c).resolve().name for c in candidates}
    if len(set(names.values())) != len(candidates):
        raise MedFinderError(
            "Two candidates would write to the same output folder (a config is named by its file or "
            "folder name, without .json); give each candidate a config with its own name."
        )
    if args.parallel and len(candidates) > 1 and "fork" not in mp.get_all_start_methods():
        raise MedFinderError("--parallel needs processes started by fork, which this system lacks; leave it out.")
    # Build every candidate from --init before painting anything: a typo or weights that do
    # not fit a config should cost seconds, not the painting.
    preprocess = {c: create_model_and_transforms(c, pretrained=init)[1].config.to_dict() for c in candidates}
    indices = training_indices(args.n, args.seed)
    need, available = painted_bytes(len(indices), preprocess), psutil.virtual_memory().available
    if need > 0.9 * available:  # the training stages need room beside the volumes
        raise MedFinderError(
            f"{len(indices)} phantoms would keep {need / 2**30:.1f} GiB of preprocessed volumes in memory, more than "
            f"90 % of the {available / 2**30:.1f} GiB available; use a smaller --n or fewer candidates."
        )
    out: Path = args.out
    if out.is_dir() and any(out.iterdir()):
        # train() appends to the logs it finds and each stage keeps the best epoch it sees, so
        # a second cycle in the same folder would mix its record with the first one's.
        raise MedFinderError(f"The output folder {out} is not empty; give each cycle a new folder.")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, volumes = paint_corpus(args.seed, indices, preprocess, args.workers)
    manifest = write_manifest(out / "manifest.csv", rows)
    painted_s = round(time.perf_counter() - started, 1)
    log.info("Painted %d phantoms in %.1f s.", len(rows), painted_s)
    records = read_manifest(manifest)
    if args.parallel and len(candidates) > 1:
        _train_side_by_side(names, records, volumes, out, init, args)
    else:
        for c in candidates:
            run_candidate(c, names[c], records, volumes.pop(c), out, init, args)  # pop: free it once trained
    summary = {"n": args.n, "painted": len(rows), "seed": args.seed, "init": init, "candidates": [names[c] for c in candidates],
               "paint_s": painted_s, "wall_s": round(time.perf_counter() - started, 1),
               "command": command}
    (out / "recipe.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary

