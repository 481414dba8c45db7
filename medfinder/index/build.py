"""The batched, resumable index build: cases in, one CaseIndex out, a single writer.

Three steps, each a seam another engine can take over:

- ``prepare_case`` (any process): load, preprocess, thumbnail and parse one case; a failure is a reason;
- ``encode_cases`` (where the model is): the vectors of a batch of prepared cases;
- ``CaseWriter`` (one process, the only writer): adds batches, commits every ``commit_every_s`` seconds,
  so an interrupted build loses at most that much and re-running it skips every committed case.

``build_index`` runs them on this machine: a local pool of ``workers`` processes prepares, this process
encodes and writes; ``medfinder.index.ray_build.build_index_with_ray`` runs the first two on a Ray
cluster and keeps the writer here. A case that cannot be used is logged with its reason and counted,
never stopping the build.

Its records are a list (a manifest, a dataset layout) or a ``CaseStream`` (a PACS): a source that
lists its cases as it goes, is told which are already indexed before it fetches anything, loads each
scan itself, and counts the series it leaves out (``BuildSummary.skipped``). A stream is prepared in
this process, one case at a time, so memory does not grow with the size of the archive.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Container, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from ..errors import CaseIndexError, MedFinderError, PacsError, SeriesSkipped
from ..io.manifests import ManifestCase
from ..io.volume import Volume
from ..transforms.preprocess import Preprocessor
from ..viewer import thumbnail_png
from .case_index import CaseEntry, CaseIndex

log = logging.getLogger(__name__)

#: Keys the dataset adapters use internally (split grouping, where a case came from); never case metadata.
#: Every other manifest column is kept, except names that look identifying (CaseIndex drops those).
INTERNAL_METADATA = ("patient_id", "source_name", "missing_image")

#: How a case's scan is loaded: by default ``load_volume`` on ``case.image``; a PACS source fetches it.
ScanLoader = Callable[[ManifestCase], Volume]


@runtime_checkable
class CaseStream(Protocol):
    """Cases listed as the build goes (a PACS): ``cases(done)`` yields those not in ``done`` (case ids
    already indexed), ``load`` fetches a case's scan, ``skipped`` counts what was left out, by reason.

    ``load`` may raise ``SeriesSkipped`` (counted in ``skipped``, the build goes on) or ``PacsError``
    (the source is gone: the build commits what it added and stops).
    """

    skipped: Any

    def cases(self, done: Container[str]) -> Iterator[ManifestCase]: ...

    def load(self, case: ManifestCase) -> Volume: ...


@dataclass
class BuildSummary:
    added: int = 0
    skipped_done: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: Cases a source left out before the build (a PACS's localizers, say): reason -> count.
    skipped: dict[str, int] = field(default_factory=dict)
    #: Seconds from the start until the first case was written: the pipeline's start-up (model loading,
    #: worker processes, the first batch), which a short build pays in full and a long one amortises.
    first_case_s: float | None = None

    @property
    def cases_per_s(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = {"added": self.added, "skipped_already_indexed": self.skipped_done, "failed": len(self.failed),
               "failures": self.failed, "seconds": round(self.seconds, 2), "cases_per_s": round(self.cases_per_s, 2)}
        if self.skipped:
            out["skipped"] = dict(self.skipped)
        if self.first_case_s is not None:
            out["first_case_s"] = round(self.first_case_s, 2)
        return out


def load_scan(case: ManifestCase) -> Volume:
    """The default ``ScanLoader``: the file or folder ``case.image`` names."""
    from ..io.load import load_volume

    # A DICOM tree's folders are often named after patients: such a case is named by its id.
    return load_volume(case.image, label=case.metadata.get("source_name"))


def prepare_case(case: ManifestCase, preprocessor: Preprocessor, load: ScanLoader = load_scan) -> dict[str, Any]:
    """Everything of one case that needs no model: its preprocessed scan (as numpy), thumbnail, shape,
    spacing and parsed report, or the reason it cannot be used (``"error"``)."""
    from ..text.reports import parse_report

    hidden_source = case.metadata.get("source_name")
    item: dict[str, Any] = {"record": case, "image": None, "error": None, "skipped": None, "parsed": None,
                            "thumbnail": None, "shape": None, "spacing": None}
    try:
        if case.report:
            item["parsed"] = parse_report(case.report)
        if case.image is not None:
            volume = load(case)
            # As a numpy array the volume goes back through a worker's pipe. A tensor would go
            # through /dev/shm, and where that is small (64 MB in a default Docker container) the
            # batch is lost in the worker's queue thread and the build waits for it for ever.
            item["image"] = preprocessor(volume).numpy()
            item["thumbnail"] = thumbnail_png(volume)
            item["shape"], item["spacing"] = volume.shape, volume.spacing
    except PacsError:
        raise  # the source is gone: no later case can be loaded either
    except SeriesSkipped as exc:
        item["skipped"], item["error"] = exc.reason, str(exc)
    except MedFinderError as exc:
        item["error"] = str(exc)
    except Exception as exc:  # a broken case must never stop the build
        item["error"] = f"{type(exc).__name__}: {exc}"
    if item["error"] and hidden_source and case.image is not None:
        # Library exceptions (nibabel, pydicom) can quote the file's path.
        item["error"] = item["error"].replace(str(case.image), hidden_source)
    return item


def encode_cases(model: Any, items: list[dict[str, Any]]) -> list[CaseEntry]:
    """The index entries of a batch of prepared cases (none of them failed): every vector the model serves."""
    vectors: list[dict[str, np.ndarray]] = [{} for _ in items]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(items):
        if item["image"] is not None:
            # One stack per shape: a preprocessing that keeps each scan's own extent gives several.
            by_shape.setdefault(item["image"].shape, []).append(i)
    for indices in by_shape.values():
        stacked = torch.from_numpy(np.stack([items[i]["image"] for i in indices]))
        images = model.encode_image(stacked, test_time_augmentation=True).numpy()  # the model's views, if it has any
        for row, i in enumerate(indices):
            vectors[i]["image"] = images[row]
    with_report = [i for i, item in enumerate(items) if item["record"].report]
    if with_report:
        texts = [items[i]["record"].report for i in with_report]
        joint = model.encode_text(texts).numpy() if model.aligned else None  # an unaligned model has no report channel
        raw = model.text_features(texts).numpy()
        for row, i in enumerate(with_report):
            if joint is not None:
                vectors[i]["report"] = joint[row]
            vectors[i]["report_text"] = raw[row]
    entries = []
    for item, vecs in zip(items, vectors):
        record: ManifestCase = item["record"]
        metadata = {k: v for k, v in record.metadata.items() if k not in INTERNAL_METADATA}
        entries.append(CaseEntry(
            case_id=record.case_id, vectors=vecs, report=record.report,
            source=record.metadata.get("source_name", str(record.image) if record.image is not None else ""),
            shape=item["shape"], spacing=item["spacing"], metadata=metadata,
            thumbnail_png=item["thumbnail"], parsed_report=item["parsed"],
        ))
    return entries


class CaseWriter:
    """The one writer of a build: adds batches of entries and commits at least every ``commit_every_s``."""

    def __init__(self, index: CaseIndex, summary: BuildSummary, commit_every_s: float,
                 started: float | None = None) -> None:
        self.index = index
        self.summary = summary
        self.commit_every_s = commit_every_s
        self._last_commit = time.perf_counter()
        self._started = self._last_commit if started is None else started

    def fail(self, case_id: str, reason: str) -> None:
        self.summary.failed[case_id] = reason
        log.warning("Case %s skipped: %s", case_id, reason)

    def add(self, entries: list[CaseEntry]) -> None:
        if entries:
            self.index.add(entries)
            self.summary.added += len(entries)
            if self.summary.first_case_s is None:
                self.summary.first_case_s = time.perf_counter() - self._started
        if time.perf_counter() - self._last_commit > self.commit_every_s:
            self.commit()

    def commit(self) -> None:
        self.index.commit()
        self._last_commit = time.perf_counter()


def open_or_create(out: Path, model: Any, model_name: str | Path, settings: dict | None) -> CaseIndex:
    """The index at ``out`` opened for writing by ``model``, or a new one with the channels it serves."""
    from ..model import model_id

    if (out / "index.json").exists():
        wanted = (settings or {}).get("vectors")
        if wanted:
            from .milvus import normalise_uri

            recorded = CaseIndex.read_info(out)["settings"].get("vectors")
            if recorded != normalise_uri(str(wanted), out):
                raise CaseIndexError(
                    f"The case index at {out} keeps its vectors in {recorded or 'its own folder'}, not in {wanted}; "
                    "an index's vectors cannot move to another place."
                )
        return CaseIndex.open(out, fingerprint=model.fingerprint, writable=True)
    return CaseIndex.create(out, model_id=model_id(model_name), fingerprint=model.fingerprint,
                            dims=model.index_channels(), settings=settings)


def build_index(
    records: Sequence[ManifestCase] | CaseStream,
    out: str | Path,
    model: str | Path,
    workers: int = 0,
    batch_size: int = 8,
    settings: dict | None = None,
    commit_every_s: float = 30.0,
    progress: bool = True,
    device: str = "auto",
    load: ScanLoader = load_scan,
) -> BuildSummary:
    """Add every record not yet in the index at ``out`` (created when absent), encoding with ``model``
    (a model folder or a built-in model name) on ``device``; ``load`` fetches each case's scan.

    ``records`` may be a ``CaseStream`` (a PACS), which loads its own scans and needs ``workers=0``.
    """
    from ..devices import resolve_device
    from ..model import load_model

    started = time.perf_counter()
    stream = records if isinstance(records, CaseStream) else None
    if stream is not None and workers:
        raise MedFinderError("A PACS build fetches and prepares one series at a time in this process; "
                             f"--workers must be 0, not {workers}.")
    out = Path(out)
    model_name = model
    model = load_model(model_name).to(resolve_device(device))
    index = open_or_create(out, model, model_name, settings)
    summary = BuildSummary()
    try:
        done = index.case_ids()
        preprocessor = model.make_preprocessor()
        if stream is None:
            todo = [r for r in records if r.case_id not in done]
            summary.skipped_done = len(records) - len(todo)
            dataset: Dataset = _PreparedCases(todo, preprocessor, load)
            total: int | None = len(todo)
        else:
            seen = _CountingSet(done)
            dataset = _StreamedCases(stream.cases(seen), preprocessor, stream.load)
            total = None
        writer = CaseWriter(index, summary, commit_every_s, started)
        loader = DataLoader(dataset, batch_size=1, collate_fn=_single, num_workers=workers, persistent_workers=False)
        bar = tqdm(total=total, desc="indexing", unit=" cases", disable=not progress)
        try:
            for batch in _batches(loader, batch_size):
                usable = []
                for item in batch:
                    if item["skipped"]:
                        summary.skipped[item["skipped"]] = summary.skipped.get(item["skipped"], 0) + 1
                        log.warning("Series %s left out: %s", item["record"].case_id, item["error"])
                    elif item["error"]:
                        writer.fail(item["record"].case_id, item["error"])
                    else:
                        usable.append(item)
                writer.add(encode_cases(model, usable) if usable else [])
                bar.update(len(batch))
                bar.set_postfix(failed=len(summary.failed))
        except (PacsError, KeyboardInterrupt):
            # The source went away (or the user stopped): what was added is whole; keep it.
            writer.commit()
            raise
        finally:
            bar.close()
            if stream is not None:
                summary.skipped_done = seen.hits
                for reason, count in dict(stream.skipped).items():
                    summary.skipped[reason] = summary.skipped.get(reason, 0) + count
        writer.commit()
    finally:
        index.close()
    summary.seconds = time.perf_counter() - started
    return summary


class _CountingSet:
    """The case ids already indexed, counting the ones a stream asks about and finds."""

    def __init__(self, ids: set[str]) -> None:
        self.ids = ids
        self.hits = 0

    def __contains__(self, case_id: object) -> bool:
        found = case_id in self.ids
        self.hits += found
        return found


class _StreamedCases(IterableDataset):
    """``prepare_case`` for each case a stream yields, in this process (``workers=0``)."""

    def __init__(self, cases: Iterator[ManifestCase], preprocessor: Preprocessor, load: ScanLoader) -> None:
        self.cases = cases
        self.preprocessor = preprocessor
        self.load = load

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for case in self.cases:
            yield prepare_case(case, self.preprocessor, self.load)


class _PreparedCases(Dataset):
    """``prepare_case`` for each record, in the local pool's workers."""

    def __init__(self, records: Sequence[ManifestCase], preprocessor: Preprocessor, load: ScanLoader) -> None:
        self.records = records
        self.preprocessor = preprocessor
        self.load = load

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return prepare_case(self.records[i], self.preprocessor, self.load)


def _single(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]


def _batches(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
