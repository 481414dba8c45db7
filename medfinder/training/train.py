"""Contrastive training of MedFinder on a manifest of CT volumes and reports.

``python -m medfinder.train --manifest CSV --out DIR [--config NAME] [--epochs N] [--batch-size B]
[--lr LR] [--workers W] [--resume]``

Each step: two augmented views of every volume (small random affine + intensity jitter, never a
left-right flip, since reports state laterality) and a sampled window of its report's sentences;
loss = symmetric InfoNCE of each view against the text (averaged) + ``view_weight`` x the views'
consistency + optionally ``finding_weight`` x a finding loss against the label columns.
AdamW with linear warmup and cosine decay; bf16 autocast on a GPU (not on a CPU: see where
``train`` sets ``amp``); DataLoader workers;
gradient accumulation (negatives stay per micro-batch). Under ``torchrun --nproc_per_node N`` the same
command trains data-parallel (DDP, ``medfinder.training.distributed``): the global batch is
``--batch-size`` x N and the contrastive loss sees every rank's features. The split is the hash split of
``medfinder.datasets`` (80/10/10); the best epoch by validation text-to-image R@10 is saved in
``DIR`` (``config.json`` + ``model.safetensors``), the latest state in ``DIR/checkpoint`` for
``--resume``, one JSON line per epoch in ``DIR/train_log.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..errors import MedFinderError, ModelError
from ..io.manifests import ManifestCase, read_manifest, select_split
from ..io.volume import Volume
from ..model import MedFinder, create_model_and_transforms, read_fingerprint
from ..text.sentences import split_sentences
from ..transforms.augment import augment_volumes
from . import distributed
from .datasets import CaseDataset, collate_cases
from .evaluate import (
    finding_names_of,
    keyword_precision,
    label_matrix,
    retrieval_metrics,
)
from .losses import FindingLoss, contrastive_loss, view_consistency_loss
from .settings import DEFAULT_CONFIG, TrainSettings

log = logging.getLogger("medfinder.train")

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "training_state.pt"
LOG_FILE = "train_log.jsonl"


def sample_report(report: str, rng: random.Random, full_probability: float, min_fraction: float) -> str:
    """The whole report, or a contiguous window of at least ``min_fraction`` of its sentences."""
    sentences = split_sentences(report)
    if len(sentences) < 2 or rng.random() < full_probability:
        return report
    length = rng.randint(max(1, math.ceil(min_fraction * len(sentences))), len(sentences))
    start = rng.randint(0, len(sentences) - length)
    return " ".join(sentences[start : start + length])


# --------------------------------------------------------------------------- pieces
def _param_groups(model: MedFinder, finding_loss: FindingLoss, settings: TrainSettings,
                  label_head: nn.Module | None = None) -> list[dict[str, Any]]:
    decay: list[Any] = []
    no_decay: list[Any] = []
    text: list[Any] = []
    if label_head is not None:
        decay.append(label_head.weight)
        no_decay.append(label_head.bias)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("text.model."):
            text.append(param)
        elif param.ndim < 2 or name == "logit_scale":  # CLIP: no decay on gains, biases, temperature
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay + list(finding_loss.parameters()), "weight_decay": 0.0},
    ]
    if text:
        groups.append({"params": text, "weight_decay": settings.weight_decay, "lr": settings.text_lr or settings.lr * 0.01})
    return groups


def validation_recall(model: MedFinder, dataset: CaseDataset, batch_size: int,
                      features: torch.Tensor | None = None) -> dict[str, Any]:
    """Text-to-image retrieval on the validation cases (full reports, no augmentation).

    ``features``: the image tower's outputs for ``dataset.usable_indices()``, when it is locked.
    With finding labels, also single-finding precision@10 against the images alone (the
    finding's name through ``encode_text``), the demo's other target, so that a run which
    trades one for the other shows it in its log.
    """
    indices = dataset.usable_indices()
    if features is not None:
        reports = [dataset.records[i].report for i in indices]
        if len(reports) < 2:
            return {}
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            image_embeds = model.embed_image_features(features).double().cpu().numpy()
        model.train(was_training)
        return _retrieval_validation(model, dataset, indices, image_embeds, reports)
    images, reports = [], []
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start : start + batch_size]]
        batch = collate_cases(items)
        if batch is None:
            continue
        images.append(model.encode_image(batch["image"], batch_size=batch_size))
        reports.extend(batch["report"])
    if len(reports) < 2:
        return {}
    return _retrieval_validation(model, dataset, indices, torch.cat(images).double().numpy(), reports)


def _retrieval_validation(model: MedFinder, dataset: CaseDataset, indices: Sequence[int],
                          image_embeds: np.ndarray, reports: list[str]) -> dict[str, Any]:
    text_embeds = model.encode_text(reports).double().numpy()
    result: dict[str, Any] = retrieval_metrics(text_embeds @ image_embeds.T)
    if dataset.finding_names:
        labels = label_matrix([dataset.records[i] for i in indices], dataset.finding_names)
        names = model.encode_text(dataset.finding_names).double().numpy()
        keyword = keyword_precision(names @ image_embeds.T, labels, dataset.finding_names, ks=(10,))
        if keyword["per_finding"]:
            result["keyword_P@10"] = keyword["mean"]["P@10"]
    return result


def validation_label_auc(model: MedFinder, label_head: nn.Module, dataset: CaseDataset,
                         batch_size: int) -> dict[str, Any]:
    """ROC AUC of the label head per finding, and their mean over the findings that have
    positives and negatives: the per-finding figures show what the image tower cannot see yet."""
    indices = dataset.usable_indices()
    scores, labels, masks = [], [], []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(indices), batch_size):
            batch = collate_cases([dataset[i] for i in indices[start : start + batch_size]])
            if batch is None:
                continue
            scores.append(label_head(tower_features(model, batch["image"], model.device)).float().cpu())
            labels.append(batch["labels"])
            masks.append(batch["label_mask"])
    model.train(was_training)
    if not scores:
        return {}
    s, y, m = torch.cat(scores).numpy(), torch.cat(labels).numpy(), torch.cat(masks).numpy()
    by_finding = {name: roc_auc(s[m[:, j], j], y[m[:, j], j]) for j, name in enumerate(dataset.finding_names)}
    aucs = {name: a for name, a in by_finding.items() if a is not None}
    if not aucs:
        return {}
    return {"label_AUC": float(np.mean(list(aucs.values()))),
            "label_AUC_by_finding": {name: round(a, 4) for name, a in aucs.items()}}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (the Mann-Whitney U statistic, ties counted half); None if one class is absent."""
    positives, negatives = scores[labels > 0.5], scores[labels <= 0.5]
    if len(positives) == 0 or len(negatives) == 0:
        return None
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


@dataclass
class _State:
    epoch: int = 0
    step: int = 0
    best: float = -float("inf")  # the first epoch is always saved, whatever its metric
    elapsed_s: float = 0.0


def _save_checkpoint(out: Path, model: MedFinder, optimizer: Any, scheduler: Any, finding_loss: FindingLoss,
                     state: _State, settings: TrainSettings, rngs: dict[str, Any],
                     label_head: nn.Module | None = None) -> None:
    folder = out / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "finding_loss": finding_loss.state_dict(),
        "label_head": label_head.state_dict() if label_head is not None else None,
        "state": asdict(state),
        "settings": asdict(settings),
        "rngs": rngs,
        # Ties the state to the weights beside it: a run killed between replacing the weights and
        # replacing the state leaves a pair that --resume then refuses rather than mixes.
        "fingerprint": model.fingerprint,
    }
    tmp = folder / (STATE_FILE + ".tmp")
    # The state is written first and replaced last, so a failed save (a full disk) leaves the
    # previous checkpoint whole rather than this step's weights with the previous step's optimizer.
    try:
        torch.save(payload, tmp)
        model.save_pretrained(folder)
        tmp.replace(folder / STATE_FILE)
    except RuntimeError as exc:
        # torch.save reports a short write (a full disk) as a RuntimeError from its zip writer.
        raise ModelError(f"The training checkpoint could not be written to {folder} ({exc}); is the disk full?") from None
    finally:
        tmp.unlink(missing_ok=True)


def feature_bank(model: MedFinder, dataset: CaseDataset, indices: Sequence[int], settings: TrainSettings,
                 generator: torch.Generator, device: torch.device,
                 context: distributed.Distributed = distributed.Distributed()) -> torch.Tensor:
    """(views, N, D) image-tower features of ``indices``: view 0 as is, the others augmented.

    With the tower locked its features never change, so each volume goes through the CNN
    ``feature_views`` times in all instead of once per epoch: training the projections then
    costs milliseconds per step, and hundreds of epochs fit in the time of one. Under DDP each rank
    computes every ``world_size``-th volume's features and the ranks exchange them.
    """
    if context.enabled:
        mine = feature_bank(model, dataset, distributed.shard(indices, context), settings, generator, device)
        gathered = distributed.gather_rows(mine.transpose(0, 1).contiguous(), context)  # (N, views, D), by rank
        order = torch.cat([torch.arange(r, len(indices), context.world_size) for r in range(context.world_size)])
        bank = torch.empty_like(gathered)
        bank[order.to(gathered.device)] = gathered
        return bank.transpose(0, 1).contiguous()
    from tqdm.auto import tqdm

    model.image.eval()
    views = []
    with torch.inference_mode():
        for view in tqdm(range(max(1, settings.feature_views)), desc="image features", unit="view", leave=False):
            chunks = []
            for start in range(0, len(indices), settings.batch_size):
                batch = collate_cases([dataset[i] for i in indices[start : start + settings.batch_size]])
                # On a CPU an augmented view takes 2.2-2.5x as long as view 0: the affine
                # resampling costs more than the tower's forward pass (measured in stop 20).
                augment = (lambda images: augment_volumes(images, settings, generator)) if view > 0 else None
                chunks.append(tower_features(model, batch["image"], device, augment).float())
            views.append(torch.cat(chunks))
    return torch.stack(views)


def tower_features(model: MedFinder, images: torch.Tensor | list[torch.Tensor], device: torch.device,
                   augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(B, tower dim) image-tower features of a collated batch, each volume augmented by ``augment`` if given.

    A batch of volumes of different shapes (each scan at its own extent) is a list: one pass per volume.
    """
    images = on_device(images, device)
    volumes = [images] if isinstance(images, torch.Tensor) else [x.unsqueeze(0) for x in images]
    return torch.cat([model.image(augment(volume) if augment is not None else volume) for volume in volumes])


def on_device(images: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """A collated batch's images as float32 on ``device`` (a no-op where they already are)."""
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True).float()
    return [x.to(device, non_blocking=True).float() for x in images]


def _feature_batches(n: int, batch_size: int, views: int, generator: torch.Generator) -> list[tuple[list[int], torch.Tensor]]:
    """One epoch of (positions, view per position) batches over a feature bank of n volumes."""
    order = torch.randperm(n, generator=generator).tolist()
    size = min(batch_size, n)
    return [(order[start : start + size], torch.randint(0, views, (size,), generator=generator))
            for start in range(0, n - size + 1, size)]


# --------------------------------------------------------------------------- training
def train(
    settings: TrainSettings,
    records: Sequence[ManifestCase] | None = None,
    loader: Callable[[Path], Volume] | None = None,
    resume: bool = False,
    preprocessed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and return a summary (best validation metrics, steps, wall time, split sizes).

    ``preprocessed``: volumes already run through this model's preprocessing and packed as the
    cache keeps them (``datasets.pack_for_cache``), keyed by case id; only the others are loaded.
    Started by torchrun, this process is one rank of a data-parallel run (``distributed.setup``).
    """
    context, device = distributed.setup(settings.device)
    try:
        return _train(settings, context, device, records, loader, resume, preprocessed)
    finally:
        distributed.cleanup(context)


class _Step(nn.Module):
    """The loss of one micro-batch. DDP wraps this module, so every parameter the loss reaches
    (model, finding loss, label head) has its gradient averaged over the ranks; in one process it
    runs unwrapped, the same operations in the same order as ever.

    Args:
        model: the MedFinder being trained.
        finding_loss: the auxiliary finding loss (its scale and bias are trained too).
        label_head: the training-only classifier on image-tower features, or None.
        settings: the run's settings (loss weights, augmentation).
        finding_names: the label columns the finding loss and the label head use.
        pos_weight: per-finding weight of a positive label in the head's loss, or None.
        context: the data-parallel context; its features are gathered for the contrastive loss.
    """

    def __init__(self, model: MedFinder, finding_loss: FindingLoss, label_head: nn.Module | None,
                 settings: TrainSettings, finding_names: list[str], pos_weight: torch.Tensor | None,
                 context: distributed.Distributed) -> None:
        super().__init__()
        self.model = model
        self.finding_loss = finding_loss
        self.label_head = label_head
        self.settings = settings
        self.finding_names = finding_names
        self.pos_weight = pos_weight
        self.context = context

    def forward(self, batch: dict[str, Any], texts: list[str], bank: torch.Tensor | None, track_centres: bool,
                augment_generator: torch.Generator) -> torch.Tensor:
        model, settings, device = self.model, self.settings, self.model.device
        if bank is not None:
            n_views = 1
            features = [bank[batch["view"].to(device), torch.tensor(batch["positions"], device=device)]]
        else:
            n_views = 2 if settings.view_weight > 0 else 1
            images = on_device(batch["image"], device)  # moved once, for every view
            augment = (lambda images: augment_volumes(images, settings, augment_generator)) if settings.augment else None
            features = [tower_features(model, images, device, augment) for _ in range(n_views)]
        views = [model.embed_image_features(f, track_centres) for f in features]
        loss = torch.zeros((), device=device)
        if settings.contrastive_weight > 0:
            text_embeds = distributed.gather_features(model.embed_text(texts, update_center=track_centres), self.context)
            contrastive = sum(contrastive_loss(distributed.gather_features(v, self.context), text_embeds, model.scale())
                              for v in views) / n_views
            loss = loss + settings.contrastive_weight * contrastive
        if n_views == 2:
            loss = loss + settings.view_weight * view_consistency_loss(views[0], views[1])
        if self.finding_names:
            finding_embeds = model.embed_text(self.finding_names, update_center=False) if settings.finding_weight > 0 else None
            labels = batch["labels"].to(device)
            mask = batch["label_mask"].to(device)
            if settings.finding_weight > 0:
                finding = sum(self.finding_loss(v, finding_embeds, labels, mask) for v in views) / n_views
                loss = loss + settings.finding_weight * finding
            if self.label_head is not None and bank is None:
                head = sum(_masked_bce(self.label_head(f.float()), labels, mask, self.pos_weight) for f in features) / n_views
                loss = loss + settings.label_head_weight * head
        return loss


def _train(
    settings: TrainSettings,
    context: distributed.Distributed,
    device: torch.device,
    records: Sequence[ManifestCase] | None,
    loader: Callable[[Path], Volume] | None,
    resume: bool,
    preprocessed: Mapping[str, Any] | None,
) -> dict[str, Any]:
    started = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    world = context.world_size

    checkpoint = out / CHECKPOINT_DIR
    resume_payload = None
    if resume:
        if not (checkpoint / STATE_FILE).is_file():
            raise ModelError(f"Cannot resume: {checkpoint / STATE_FILE} does not exist.")
        resume_payload = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        model = MedFinder.from_pretrained(checkpoint)
        if resume_payload.get("fingerprint", model.fingerprint) != model.fingerprint:
            raise ModelError(
                f"Cannot resume: the weights in {checkpoint} do not belong to the training state beside them "
                "(a run stopped while saving?); start again or restore an earlier copy of the folder."
            )
        preprocessor = model.make_preprocessor()
    else:
        # --init alone is a model folder that brings its own config. With an explicit --config
        # its weights go into that config (say, a new HU window): the tensors must still fit, or
        # load_weights names the mismatch.
        model, preprocessor = create_model_and_transforms(
            settings.config or settings.init or DEFAULT_CONFIG, pretrained=settings.init if settings.config else None
        )
    model.to(device)
    if settings.activation_checkpointing:
        model.image.set_activation_checkpointing(True)

    records = list(records) if records is not None else read_manifests(settings.manifest.split(os.pathsep))
    train_records = select_split(records, "train")
    val_records = select_split(records, "val")
    wants_labels = settings.finding_weight > 0 or settings.label_head_weight > 0
    finding_names = finding_names_of(train_records) if wants_labels else []
    train_set = CaseDataset(train_records, preprocessor, finding_names, loader=loader, cache=settings.cache)
    val_set = CaseDataset(val_records, preprocessor, finding_names, loader=loader, cache=settings.cache)
    if settings.cache:
        if preprocessed is not None:
            train_set.adopt(preprocessed)
            val_set.adopt(preprocessed)
        train_set.preload(settings.workers)
        if context.is_main:  # only rank 0 validates
            val_set.preload(settings.workers)
    elif context.enabled:
        # Every rank must skip the same unusable cases, or their batches (and collectives) would differ.
        mine = train_set.check(distributed.shard(range(len(train_set)), context), settings.workers)
        train_set.failures.update(distributed.union_of(mine, context))
    usable = train_set.usable_indices() if (settings.cache or context.enabled) else list(range(len(train_set)))
    if len(usable) < 2 * world:
        raise MedFinderError(f"The manifest {settings.manifest} has fewer than {2 * world} usable training cases.")
    on_gpu = device.type == "cuda"
    generator = torch.Generator().manual_seed(settings.seed)  # batch order
    augment_generator = torch.Generator(device=device).manual_seed(
        distributed.rank_seed(settings.seed + 1, context.rank, 1 << 20) if context.enabled else settings.seed + 1)
    train_subset = torch.utils.data.Subset(train_set, usable)
    sampler = (distributed.sampler(train_subset, context, settings.seed, drop_last=True) if context.enabled else None)
    batches = DataLoader(
        train_subset,
        batch_size=settings.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(usable) // world > settings.batch_size,
        num_workers=0 if settings.cache else settings.workers,
        collate_fn=collate_cases,
        pin_memory=on_gpu,
        generator=generator if sampler is None else None,
        persistent_workers=not settings.cache and settings.workers > 0,
    )
    finding_loss = FindingLoss().to(device)
    label_head = (nn.Linear(model.image.dim, len(finding_names)).to(device)
                  if settings.label_head_weight > 0 and finding_names else None)
    # Rare findings (a hernia in 9 % of cases) otherwise give the tower little reason to see them.
    pos_weight = (label_pos_weight([train_set.records[i] for i in usable], finding_names, settings.label_balance).to(device)
                  if label_head is not None and settings.label_balance > 0 else None)
    bank = None
    val_features = None
    if settings.lock_image:
        if not settings.cache:
            raise MedFinderError("--lock-image caches image features, so it cannot be combined with --no-cache.")
        model.image.requires_grad_(False)
        bank = feature_bank(model, train_set, usable, settings, augment_generator, device, context)
        bank_labels = torch.stack([train_set[i]["labels"] for i in usable]).to(device) if finding_names else None
        bank_masks = torch.stack([train_set[i]["label_mask"] for i in usable]).to(device) if finding_names else None
        bank_reports = [train_set.records[i].report for i in usable]
        val_features = (feature_bank(model, val_set, val_set.usable_indices(),
                                     replace(settings, feature_views=1), augment_generator, device)[0]
                        if len(val_set) and context.is_main else None)
    optimizer = torch.optim.AdamW(_param_groups(model, finding_loss, settings, label_head), lr=settings.lr)
    global_batch = settings.batch_size * world
    n_batches = len(usable) // min(global_batch, len(usable)) if bank is not None else len(batches)
    steps_per_epoch = max(1, math.ceil(n_batches / settings.accumulate))
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    from transformers import get_cosine_schedule_with_warmup

    warmup_steps = int(settings.warmup_fraction * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    state = _State()
    text_rng = random.Random(settings.seed)
    if resume_payload is not None:
        optimizer.load_state_dict(resume_payload["optimizer"])
        scheduler.load_state_dict(resume_payload["scheduler"])
        finding_loss.load_state_dict(resume_payload["finding_loss"])
        if label_head is not None and resume_payload.get("label_head"):
            label_head.load_state_dict(resume_payload["label_head"])
        state = _State(**resume_payload["state"])
        generator.set_state(resume_payload["rngs"]["generator"])
        augment_generator.set_state(resume_payload["rngs"]["augment"])
        text_rng.setstate(resume_payload["rngs"]["text"])
        torch.set_rng_state(resume_payload["rngs"]["torch"])
    step_module = _Step(model, finding_loss, label_head, settings, finding_names, pos_weight, context)
    step: nn.Module = step_module
    if context.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Unused parameters: a label head with a locked tower, projections in a supervised stage.
        step = DistributedDataParallel(step_module, device_ids=[device.index] if on_gpu else None,
                                       find_unused_parameters=True)

    # bf16 autocast on a GPU only. On a CPU with native bf16 (AVX512-BF16) it made a step 1.25x
    # faster (benchmarks/train_step_speed.py), but with torch 2.13's oneDNN it intermittently gave
    # NaN weights after two steps of the tiny test model (1 run in about 15); fp32 never did.
    amp = settings.amp and on_gpu
    log_path = out / LOG_FILE
    from tqdm.auto import tqdm

    summary: dict[str, Any] = {}
    while state.epoch < settings.epochs and (settings.max_steps is None or state.step < settings.max_steps):
        epoch_start = time.perf_counter()
        model.train()
        if context.enabled:
            # Each epoch's random streams come from (seed, rank, epoch): a resumed run draws them again
            # without every rank's generator state; the batch order is shared by all ranks.
            generator.manual_seed(settings.seed + state.epoch)
            augment_generator.manual_seed(distributed.rank_seed(settings.seed + 1, context.rank, state.epoch))
            text_rng = random.Random(distributed.rank_seed(settings.seed, context.rank, state.epoch))
            if sampler is not None:
                sampler.set_epoch(state.epoch)
        if bank is not None:
            model.image.eval()  # locked: BatchNorm statistics stay those the features were made with
            epoch_batches: Any = [
                {"positions": pos, "view": view, "report": [bank_reports[p] for p in pos],
                 **({"labels": bank_labels[pos], "label_mask": bank_masks[pos]} if bank_labels is not None else {})}
                for pos, view in (
                    (distributed.shard(pos, context), view[context.rank :: world])
                    for pos, view in _feature_batches(len(usable), global_batch, bank.shape[0], generator))
            ]
        else:
            epoch_batches = batches
        losses: list[float] = []
        progress = tqdm(epoch_batches, desc=f"epoch {state.epoch + 1}/{settings.epochs}", unit="batch", leave=False,
                        disable=not context.is_main)
        optimizer.zero_grad(set_to_none=True)
        for micro, batch in enumerate(progress):
            if batch is None:
                continue
            texts = [
                sample_report(r, text_rng, settings.full_report_probability, settings.min_window_fraction)
                for r in batch["report"]
            ]
            # With a locked image tower the centres follow the batches only while warming up, then
            # stay fixed: a centre that keeps moving while the learning rate decays pulls the
            # embeddings away from where the weights put them (the loss rose 4.7 -> 5.4 at a
            # learning rate of 1e-12).
            track_centres = bank is None or state.step <= warmup_steps
            last_micro = (micro + 1) % settings.accumulate == 0 or micro + 1 == len(epoch_batches)
            # DDP averages gradients on the last micro-batch of an accumulation only.
            sync = step.no_sync() if context.enabled and not last_micro else nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = step(batch, texts, bank, track_centres, augment_generator)
                (loss / settings.accumulate).backward()
            losses.append(float(loss.detach()))
            if last_micro:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                model.clamp_logit_scale_()
                state.step += 1
            progress.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", T=f"{1 / float(model.scale().detach()):.3f}")
            if settings.max_steps is not None and state.step >= settings.max_steps:
                break
        progress.close()
        state.epoch += 1
        epoch_loss = distributed.mean_across(float(np.mean(losses)), context) if losses else None
        if context.is_main:
            if not len(val_set):
                validation = {}
            elif settings.contrastive_weight > 0:
                validation = validation_recall(model, val_set, settings.batch_size,
                                               val_features if bank is not None else None)
            else:  # nothing is aligned yet: judge the image tower by its label head instead
                validation = validation_label_auc(model, label_head, val_set, settings.batch_size) if label_head else {}
            state.elapsed_s += time.perf_counter() - epoch_start
            metric = validation.get("R@10", validation.get("label_AUC", -epoch_loss if epoch_loss is not None else -float("inf")))
            improved = metric > state.best
            if improved:
                state.best = metric
                model.save_pretrained(out)
            rngs = {"generator": generator.get_state(), "augment": augment_generator.get_state(),
                    "text": text_rng.getstate(), "torch": torch.get_rng_state()}
            _save_checkpoint(out, model, optimizer, scheduler, finding_loss, state, settings, rngs, label_head)
            summary = {
                "epoch": state.epoch,
                "step": state.step,
                "loss": epoch_loss,
                "temperature": 1 / float(model.scale().detach()),
                "lr": scheduler.get_last_lr()[0],
                "val": validation,
                "best": improved,
                "epoch_s": round(time.perf_counter() - epoch_start, 1),
            }
            if context.enabled:
                summary["ranks"] = world
            with log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(summary) + "\n")
            tqdm.write(
                f"epoch {state.epoch}: loss {summary['loss']:.4f}  "
                + "  ".join(f"val {k} {v:.3f}" for k, v in validation.items() if k in ("R@10", "keyword_P@10", "label_AUC"))
                + f"{'  (best)' if improved else ''}  {summary['epoch_s']} s"
            )
        distributed.barrier(context)  # the other ranks wait for rank 0's validation and checkpoint
    result = {
        "out": str(out),
        "fingerprint": read_fingerprint(out),
        "epochs": state.epoch,
        "steps": state.step,
        "best_val": state.best,
        "best_val_metric": "R@10" if settings.contrastive_weight > 0 else "label_AUC",
        "train_cases": len(usable),
        "val_cases": len(val_set.usable_indices()),
        "skipped": {**train_set.failures, **val_set.failures},
        "wall_s": round(time.perf_counter() - started, 1),
        "settings": asdict(settings),
    }
    if context.enabled:
        result["ranks"] = world
    if context.is_main:
        (out / "training.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def read_manifests(paths: Sequence[str]) -> list[ManifestCase]:
    """Records of several manifests, in order; a case id in two of them is an error."""
    records: list[ManifestCase] = []
    seen: dict[str, str] = {}
    for path in paths:
        for record in read_manifest(path):
            if record.case_id in seen:
                raise MedFinderError(
                    f"The case id {record.case_id!r} is in both {seen[record.case_id]} and {path}."
                )
            seen[record.case_id] = path
            records.append(record)
    return records


def label_pos_weight(records: Sequence[ManifestCase], names: Sequence[str], balance: float) -> torch.Tensor:
    """(F,) weight of a positive label per finding: (negatives / positives) ** ``balance``.

    Counts only the records that state the finding. A finding the training cases never show
    keeps weight 1: there is nothing to balance.
    """
    weights = []
    for name in names:
        stated = [r.labels[name] for r in records if name in r.labels]
        positives = sum(1 for v in stated if v == 1)
        negatives = len(stated) - positives
        weights.append((negatives / positives) ** balance if positives and negatives else 1.0)
    return torch.tensor(weights, dtype=torch.float32)


def _masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none", pos_weight=pos_weight)
    mask = mask.float()
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)
