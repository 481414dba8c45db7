"""Cases as model inputs for training and evaluation: preprocessed, cached one byte per voxel,
with unusable scans skipped and reported instead of stopping an epoch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..io.load import load_volume
from ..io.manifests import ManifestCase
from ..io.volume import Volume
from ..transforms.preprocess import Preprocessor

log = logging.getLogger(__name__)


class CaseDataset(Dataset):
    """Preprocessed volumes with their reports and labels.

    Records without an image are left out up front; a volume that fails to load or preprocess
    yields ``None`` (collated away by ``collate_cases``) and is logged once with its reason in
    ``failures``. With ``cache=True`` each preprocessed volume is kept in memory, one byte per
    voxel (see ``pack_for_cache``).
    """

    def __init__(
        self,
        records: Sequence[ManifestCase],
        preprocessor: Preprocessor,
        finding_names: Sequence[str] = (),
        loader: Callable[[Path], Volume] | None = None,
        cache: bool = False,
    ) -> None:
        self.records = [r for r in records if r.image is not None]
        without_image = len(records) - len(self.records)
        if without_image:
            log.info("Leaving out %d case(s) without an image.", without_image)
        self.preprocessor = preprocessor
        self.finding_names = list(finding_names)
        self.loader = loader or load_volume
        self.cache = cache
        self._cached: dict[int, torch.Tensor] = {}
        self.failures: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, index: int) -> torch.Tensor | None:
        if index not in self._cached:
            image = self._preprocessed(index)
            if image is None or not self.cache:
                return image
            self._cached[index] = pack_for_cache(image)
        # Every cached read, the first included, comes from the packed copy, so a case looks the
        # same in every epoch.
        return unpack_from_cache(self._cached[index])

    def _preprocessed(self, index: int) -> torch.Tensor | None:
        record = self.records[index]
        if record.case_id in self.failures:
            return None
        try:
            image = self.preprocessor(self.loader(record.image))  # type: ignore[arg-type]
        except Exception as exc:  # any unreadable file must skip the case, never stop an epoch
            reason = f"{type(exc).__name__}: {exc}"
            self.failures[record.case_id] = reason
            log.warning("Skipping case %s: image %s could not be used (%s).", record.case_id, record.image, reason)
            return None
        return image

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = self._image(index)
        if image is None:
            return None
        record = self.records[index]
        labels = torch.tensor([record.labels.get(n, -1) for n in self.finding_names], dtype=torch.float32)
        return {
            "index": index,
            "case_id": record.case_id,
            "image": image,
            "report": record.report,
            "labels": labels.clamp(min=0),
            "label_mask": labels >= 0,
        }

    def adopt(self, packed: Mapping[str, Any]) -> int:
        """Take volumes that are already preprocessed (as ``pack_for_cache`` keeps them), keyed
        by case id, into the cache; return how many of this dataset's cases were found.

        For a caller that preprocessed the cases itself, e.g. ``medfinder.recipe``, which paints
        each phantom once and runs both training stages on the same volumes: they are loaded and
        preprocessed again only if absent.
        """
        found = 0
        for index, record in enumerate(self.records):
            volume = packed.get(record.case_id)
            if volume is not None:
                self._cached[index] = torch.as_tensor(volume)
                found += 1
        return found

    def preload(self, workers: int = 0) -> None:
        """Fill the in-memory cache, preprocessing in ``workers`` processes."""
        todo = [i for i in range(len(self)) if i not in self._cached]
        if not todo:
            return
        from tqdm.auto import tqdm

        uncached = _Uncached(self)
        loader = DataLoader(
            torch.utils.data.Subset(uncached, todo), batch_size=None, num_workers=workers, collate_fn=_identity
        )
        for index, image, failure in tqdm(loader, total=len(todo), desc="preprocessing", unit="case"):
            if image is None:
                self.failures[self.records[index].case_id] = failure
            else:
                self._cached[index] = torch.from_numpy(image)
        if self.failures:
            log.warning("%d case(s) skipped because their image could not be used.", len(self.failures))

    def check(self, indices: Sequence[int], workers: int = 0) -> dict[str, str]:
        """Preprocess the cases at ``indices`` once without keeping them, recording which fail:
        {case id: reason}. A data-parallel run without the cache learns up front which cases to skip."""
        from tqdm.auto import tqdm

        loader = DataLoader(torch.utils.data.Subset(_Uncached(self), list(indices)), batch_size=None,
                            num_workers=workers, collate_fn=_identity)
        failed: dict[str, str] = {}
        for index, image, failure in tqdm(loader, total=len(indices), desc="checking", unit="case", leave=False):
            if image is None:
                failed[self.records[index].case_id] = failure
        self.failures.update(failed)
        return failed

    def usable_indices(self) -> list[int]:
        failed = set(self.failures)
        return [i for i, r in enumerate(self.records) if r.case_id not in failed]


class _Uncached(Dataset):
    """Worker-side view of a CaseDataset that returns (index, image or None, failure)."""

    def __init__(self, parent: CaseDataset) -> None:
        self.parent = parent

    def __len__(self) -> int:
        return len(self.parent)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str]:
        # Not parent._image: in a worker process that would fill the worker's own copy of the
        # cache, so preloading held every volume twice (and ran out of memory at 4,000 cases).
        image = self.parent._preprocessed(index)
        # Packed: fewer bytes to send. As numpy: sent through the worker's pipe, not /dev/shm,
        # where a small one (64 MB in a default Docker container) loses the volume in the worker's
        # queue thread and leaves preloading waiting for ever.
        packed = pack_for_cache(image).numpy() if image is not None else None
        return index, packed, self.parent.failures.get(self.parent.records[index].case_id, "")


def pack_for_cache(image: torch.Tensor) -> torch.Tensor:
    """A preprocessed volume as kept in memory: uint8 when it lies in [0, 1], else float16.

    The preprocessor clips every HU window to [0, 1], so 255 levels per window are steps of
    4.7 HU in the demo's lung window, 1.6 HU in the mediastinal one and 9.2 HU in the
    high-density one: rounding errors of 1.4, 0.5 and 2.7 HU (standard deviation), under the
    8-20 HU noise the phantoms carry and a real CT's. A byte per voxel instead of float16's two
    is what lets a 10,000-case corpus train in 24 GB. Anything outside [0, 1] (another
    preprocessor) stays float16 rather than being clipped.
    """
    if image.numel() and image.min() >= 0 and image.max() <= 1:
        return image.mul(255).round_().to(torch.uint8)
    return image.half()


def unpack_from_cache(stored: torch.Tensor) -> torch.Tensor:
    """The float32 volume back from ``pack_for_cache``."""
    if stored.dtype == torch.uint8:
        return stored.float().div_(255)
    return stored.float()


def _identity(item: Any) -> Any:
    return item


def collate_for_pipe(items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """``collate_cases`` with numpy arrays for tensors, so a worker sends the batch through its pipe.

    For loaders whose workers spend seconds preprocessing each volume, the copy costs little and
    /dev/shm is not needed; ``batch_from_pipe`` turns the arrays back into tensors.
    """
    batch = collate_cases(items)
    if batch is None:
        return None
    if isinstance(batch["image"], list):
        batch["image"] = [x.numpy() for x in batch["image"]]
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_from_pipe(batch: dict[str, Any] | None) -> dict[str, Any] | None:
    if batch is None:
        return None
    if isinstance(batch["image"], list):
        batch["image"] = [torch.from_numpy(x) for x in batch["image"]]
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def collate_cases(items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stack the usable cases of a batch; ``None`` when none of them loaded.

    Volumes of different shapes (a preprocessing that keeps each scan's own extent) stay a list:
    padding them to one shape would feed the tower air that the index's vectors never saw.
    """
    items = [item for item in items if item is not None]
    if not items:
        return None
    images = [item["image"] for item in items]
    return {
        "index": torch.tensor([item["index"] for item in items]),
        "case_id": [item["case_id"] for item in items],
        "image": torch.stack(images) if len({tuple(x.shape) for x in images}) == 1 else images,
        "report": [item["report"] for item in items],
        "labels": torch.stack([item["labels"] for item in items]),
        "label_mask": torch.stack([item["label_mask"] for item in items]),
    }
