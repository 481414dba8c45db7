"""The batched, resumable index build.

Workers load and preprocess volumes and parse reports; the main process encodes in batches
and adds to the CaseIndex, committing every ``commit_every_s`` seconds so that an interrupted
build loses at most that much work and re-running it skips every case already committed.
A case that cannot be used is logged with its reason and counted, never aborting the build.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medfinder.datasets import CaseRecord
from medfinder.errors import MedFinderError
from medfinder.index import CaseEntry, CaseIndex
from medfinder.preprocess import Preprocessor
from medfinder.viewer import thumbnail_png

log = logging.getLogger(__name__)

#: Keys the dataset adapters use internally (split grouping, where a case came from); never case metadata.
#: Every other manifest column is kept, except names that look identifying (CaseIndex drops those).
INTERNAL_METADATA = ("patient_id", "source_name", "missing_image")


@dataclass
class BuildSummary:
    added: int = 0
    skipped_done: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def cases_per_s(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"added": self.added, "skipped_already_indexed": self.skipped_done, "failed": len(self.failed),
                "failures": self.failed, "seconds": round(self.seconds, 2), "cases_per_s": round(self.cases_per_s, 2)}


class _PreparedCases(Dataset):
    """Worker side: load, preprocess, thumbnail and parse one case; failures become reasons."""

    def __init__(self, records: Sequence[CaseRecord], preprocessor: Preprocessor) -> None:
        self.records = records
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from medfinder.reports import parse_report
        from medfinder.volume import load_volume

        record = self.records[i]
        # A DICOM tree's folders are often named after patients: such a case is named by its id.
        hidden_source = record.metadata.get("source_name")
        item: dict[str, Any] = {"record": record, "image": None, "error": None, "parsed": None,
                                "thumbnail": None, "shape": None, "spacing": None}
        try:
            if record.report:
                item["parsed"] = parse_report(record.report)
            if record.image is not None:
                volume = load_volume(record.image, label=hidden_source)
                # As a numpy array the volume goes back through the worker's pipe. A tensor would go
                # through /dev/shm, and where that is small (64 MB in a default Docker container) the
                # batch is lost in the worker's queue thread and the build waits for it for ever.
                item["image"] = self.preprocessor(volume).numpy()
                item["thumbnail"] = thumbnail_png(volume)
                item["shape"], item["spacing"] = volume.shape, volume.spacing
        except MedFinderError as exc:
            item["error"] = str(exc)
        except Exception as exc:  # a broken case must never stop the build
            item["error"] = f"{type(exc).__name__}: {exc}"
        if item["error"] and hidden_source and record.image is not None:
            # Library exceptions (nibabel, pydicom) can quote the file's path.
            item["error"] = item["error"].replace(str(record.image), hidden_source)
        return item


def _single(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]


def open_or_create(out: Path, model: Any, model_dir: Path, settings: dict | None) -> CaseIndex:
    if (out / "index.json").exists():
        return CaseIndex.open(out, fingerprint=model.fingerprint, writable=True)
    dims = {"image": model.embed_dim, "report": model.embed_dim, "report_text": model.text_dim}
    return CaseIndex.create(out, model_id=str(Path(model_dir).resolve()), fingerprint=model.fingerprint,
                            dims=dims, settings=settings)


def build_index(
    records: Sequence[CaseRecord],
    out: str | Path,
    model_dir: str | Path,
    workers: int = 0,
    batch_size: int = 8,
    settings: dict | None = None,
    commit_every_s: float = 30.0,
    progress: bool = True,
) -> BuildSummary:
    """Add every record not yet in the index at ``out`` (created when absent)."""
    from medfinder.model import MedFinder

    started = time.perf_counter()
    out = Path(out)
    model = MedFinder.from_pretrained(model_dir)
    index = open_or_create(out, model, Path(model_dir), settings)
    summary = BuildSummary()
    try:
        done = index.case_ids()
        todo = [r for r in records if r.case_id not in done]
        summary.skipped_done = len(records) - len(todo)
        loader = DataLoader(_PreparedCases(todo, model.make_preprocessor()), batch_size=1, collate_fn=_single,
                            num_workers=workers, persistent_workers=False)
        last_commit = time.perf_counter()
        bar = tqdm(total=len(todo), desc="indexing", unit="case", disable=not progress)
        for batch in _batches(loader, batch_size):
            usable = []
            for item in batch:
                if item["error"]:
                    summary.failed[item["record"].case_id] = item["error"]
                    log.warning("Case %s skipped: %s", item["record"].case_id, item["error"])
                else:
                    usable.append(item)
            if usable:
                index.add(_entries(model, usable))
                summary.added += len(usable)
            bar.update(len(batch))
            bar.set_postfix(failed=len(summary.failed))
            if time.perf_counter() - last_commit > commit_every_s:
                index.commit()
                last_commit = time.perf_counter()
        bar.close()
        index.commit()
    finally:
        index.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _batches(loader: DataLoader, size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in loader:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _entries(model: Any, items: list[dict[str, Any]]) -> list[CaseEntry]:
    vectors: list[dict[str, np.ndarray]] = [{} for _ in items]
    with_image = [i for i, item in enumerate(items) if item["image"] is not None]
    if with_image:
        stacked = torch.from_numpy(np.stack([items[i]["image"] for i in with_image]))
        images = model.encode_image(stacked, test_time_augmentation=True).numpy()  # the model's views, if it has any
        for row, i in enumerate(with_image):
            vectors[i]["image"] = images[row]
    with_report = [i for i, item in enumerate(items) if item["record"].report]
    if with_report:
        texts = [items[i]["record"].report for i in with_report]
        joint = model.encode_text(texts).numpy()
        raw = model.text_features(texts).numpy()
        for row, i in enumerate(with_report):
            vectors[i]["report"] = joint[row]
            vectors[i]["report_text"] = raw[row]
    entries = []
    for item, vecs in zip(items, vectors):
        record: CaseRecord = item["record"]
        metadata = {k: v for k, v in record.metadata.items() if k not in INTERNAL_METADATA}
        entries.append(CaseEntry(
            case_id=record.case_id, vectors=vecs, report=record.report,
            source=record.metadata.get("source_name", str(record.image) if record.image is not None else ""),
            shape=item["shape"], spacing=item["spacing"], metadata=metadata,
            thumbnail_png=item["thumbnail"], parsed_report=item["parsed"],
        ))
    return entries
