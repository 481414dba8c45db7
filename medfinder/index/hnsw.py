"""The HNSW backend (hnswlib's graph in cosine space) behind the ``VectorIndex`` interface.

Defaults ``M=16, ef_construction=200, ef=96`` and the search ef's growth with the index size
come from ``benchmarks/ann_recall.py`` (clustered synthetic unit vectors, 256 dimensions): see
``HNSW_DEFAULTS`` and ``ef_for_size``.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import threading
from pathlib import Path

import hnswlib
import numpy as np

from ..errors import CaseIndexError
from .vectors import as_ids, checked_batch, empty_result, exact_search, normalise

#: Measured with benchmarks/ann_recall.py (clustered unit vectors, dim 256, 2 cores): M=16 and
#: ef_construction=200 store 1.18 kB per vector on disk and build 10^5 vectors in 31 s, 10^6 in
#: 9.5 min; ef=96 gives recall@10 0.998 at 10^5 vectors. The search ef is raised with the index
#: size (``ef_for_size``), because a fixed ef loses recall as the graph grows (ef 96: 0.91 at 10^6).
HNSW_DEFAULTS: dict[str, int] = {"M": 16, "ef_construction": 200, "ef": 96}


def ef_for_size(count: int) -> int:
    """The search ef that keeps recall@10 at or above 0.98 for an index of ``count`` vectors.

    Anchored on two measurements (M=16, ef_construction=200, 256-d clustered vectors):
    ef 64 gave recall@10 0.994 at 10^5 vectors and ef 384 gave 0.984 at 10^6; between and
    beyond, ef grows as a power of the size through those two points. At 10^6 a query then
    takes about 1.9 ms, 32x faster than exact search.
    """
    if count <= 100_000:
        return 64
    return int(math.ceil(64 * (count / 100_000) ** math.log10(384 / 64)))


# hnswlib's saveIndex writes this header before the level-0 blocks (hnswalg.h, 0.7-0.8):
# offsetLevel0, max_elements, cur_element_count, size_data_per_element, label_offset,
# offsetData (size_t each), maxlevel (int), enterpoint (uint32), maxM, maxM0, M (size_t),
# mult (double), ef_construction (size_t).
_HNSW_HEADER = struct.Struct("<6Q iI 3Q d Q")
_HNSW_LENGTH_SIZE = 4  # float32 per element: the vector's length before normalisation
_LINK_LIST_SIZE = struct.Struct("<I")  # before each element's upper-level links
_HNSW_DELETE_MARK = 0x01  # bit in byte 2 of an element's level-0 link-count word


def _read_hnsw_header(path: str) -> dict[str, int]:
    with open(path, "rb") as handle:
        raw = handle.read(_HNSW_HEADER.size)
    if len(raw) < _HNSW_HEADER.size:
        raise CaseIndexError(f"The HNSW file {path} is truncated: it is shorter than its header.")
    (offset_level0, max_elements, count, size_per_element, label_offset, offset_data,
     _max_level, _entry, _max_m, _max_m0, m, _mult, ef_construction) = _HNSW_HEADER.unpack(raw)
    return {
        "offset_level0": offset_level0, "max_elements": max_elements, "count": count,
        "size_per_element": size_per_element, "label_offset": label_offset,
        "offset_data": offset_data, "M": m, "ef_construction": ef_construction,
    }


class HnswIndex:
    """hnswlib graph in cosine space behind the VectorIndex interface.

    hnswlib's traps are handled here: ``ef`` is not saved with the file (the caller passes it
    back to ``load``), and is raised to ``ef_for_size`` as the index grows (``grow_ef=False``
    keeps it fixed, for benchmarks); ``knn_query`` raises when fewer than k items are reachable
    (k is clamped to the live count, ef is raised, and as a last resort the live vectors are
    searched exactly); adding and querying at the same time is unsafe (one lock serialises
    them, which costs little because a query takes well under a millisecond).
    """

    def __init__(
        self,
        dim: int,
        *,
        M: int = HNSW_DEFAULTS["M"],
        ef_construction: int = HNSW_DEFAULTS["ef_construction"],
        ef: int = HNSW_DEFAULTS["ef"],
        grow_ef: bool = True,
        capacity: int = 1024,
        seed: int = 100,
        num_threads: int = -1,
        _index: object | None = None,
    ) -> None:
        self.dim = int(dim)
        self.M = int(M)
        self.ef_construction = int(ef_construction)
        self.ef = int(ef)
        self.grow_ef = grow_ef
        self.num_threads = num_threads
        self._deleted: set[int] = set()
        self._lock = threading.RLock()
        if _index is None:
            _index = hnswlib.Index(space="cosine", dim=self.dim)
            _index.init_index(
                max_elements=max(int(capacity), 1), ef_construction=self.ef_construction, M=self.M,
                random_seed=seed,
            )
        self._index = _index

    def settings(self) -> dict[str, int]:
        """The build and search parameters to store next to the file (hnswlib drops ``ef``)."""
        return {"M": self.M, "ef_construction": self.ef_construction, "ef": self.ef}

    def __len__(self) -> int:
        with self._lock:
            return self._index.element_count - len(self._deleted)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = checked_batch(ids, vectors, self.dim)
        if not ids.shape[0]:
            return
        with self._lock:
            needed = self._index.element_count + ids.shape[0]
            capacity = self._index.get_max_elements()
            if needed > capacity:
                self._index.resize_index(max(needed, int(capacity * 1.5)))
            # Re-adding a deleted label makes hnswlib un-delete it and overwrite its vector.
            self._index.add_items(vectors, ids, num_threads=self.num_threads)
            self._deleted.difference_update(ids.tolist())

    def delete(self, ids: np.ndarray) -> None:
        with self._lock:
            for label in as_ids(ids).tolist():
                if label in self._deleted:
                    continue
                try:
                    self._index.mark_deleted(label)
                except RuntimeError:  # not stored: deleting it is a no-op, as documented
                    continue
                self._deleted.add(label)

    def query(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = normalise(vectors, self.dim, "query vectors")
        with self._lock:
            live = len(self)
            k = min(int(k), live)
            if k <= 0:
                return empty_result(queries.shape[0])
            threads = 1 if queries.shape[0] == 1 else self.num_threads
            ef = max(self.ef, k, ef_for_size(live) if self.grow_ef else 0)
            while True:
                self._index.set_ef(ef)
                try:
                    labels, distances = self._index.knn_query(queries, k=k, num_threads=threads)
                    return labels.astype(np.int64), (1.0 - distances).astype(np.float32)
                except RuntimeError:
                    # Deletions can cut the graph so fewer than k live items are reachable.
                    if ef >= live:
                        return self._exact_query(queries, k)
                    ef = min(live, ef * 4)
                finally:
                    self._index.set_ef(self.ef)

    def _exact_query(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        labels, stored = self.vectors()
        rows, scores = exact_search(stored, queries, k)
        return labels[rows], scores

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, unit vectors) of every live entry, as copies."""
        labels = np.asarray(self.live_ids(), dtype=np.int64)
        if not labels.shape[0]:
            return labels, np.zeros((0, self.dim), dtype=np.float32)
        # chroma-hnswlib's get_items takes a list and returns lists; re-normalised against float drift.
        return labels, normalise(np.asarray(self._index.get_items(labels.tolist()), dtype=np.float32), self.dim)

    def live_ids(self) -> list[int]:
        with self._lock:
            return [label for label in self._index.get_ids_list() if label not in self._deleted]

    def save(self, path: str | os.PathLike[str]) -> None:
        with self._lock:
            self._index.save_index(os.fspath(path))
        # hnswlib writes through an unchecked std::ofstream: a full disk leaves a short file
        # and no error, and the index would be committed with it.
        _check_hnsw_complete(os.fspath(path))

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], dim: int, *, ef: int | None = None, num_threads: int = -1
    ) -> "HnswIndex":
        path = os.fspath(path)
        if not Path(path).is_file():
            raise CaseIndexError(f"The HNSW file {path} does not exist.")
        header = _read_hnsw_header(path)
        # hnswlib trusts the caller's dim; a mismatch would read vectors at the wrong offsets.
        stored_dim = (header["label_offset"] - header["offset_data"]) // 4
        if stored_dim != dim or header["offset_level0"] != 0:
            raise CaseIndexError(
                f"The HNSW file {path} holds {stored_dim}-dimensional vectors, not {dim}-dimensional ones."
            )
        index = hnswlib.Index(space="cosine", dim=dim)
        try:
            index.load_index(path, max_elements=max(int(header["count"]), 1))
        except (RuntimeError, MemoryError, ValueError) as error:
            raise CaseIndexError(f"The HNSW file {path} is corrupt or unsupported ({error}).") from error
        loaded = cls(
            dim, M=int(header["M"]), ef_construction=int(header["ef_construction"]),
            ef=HNSW_DEFAULTS["ef"] if ef is None else ef, num_threads=num_threads, _index=index,
        )
        loaded._deleted = _deleted_labels(path, header, index.element_count)
        loaded._index.set_ef(loaded.ef)
        return loaded


def _check_hnsw_complete(path: str) -> None:
    """Raise unless the file at ``path`` is as long as the HNSW graph its header describes.

    chroma-hnswlib writes the header, the level-0 blocks, one float32 length per element, then
    per element a 4-byte size followed by that many bytes of upper-level links. Walking those
    sizes gives the exact length of a complete file, as hnswlib's own loadIndex check does.
    """
    header = _read_hnsw_header(path)
    actual = os.path.getsize(path)
    expected = _HNSW_HEADER.size + header["count"] * (header["size_per_element"] + _HNSW_LENGTH_SIZE)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        walked = 0
        while walked < header["count"] and expected + 4 <= actual:
            (links,) = _LINK_LIST_SIZE.unpack_from(data, expected)
            expected += 4 + links
            walked += 1
    if walked != header["count"] or expected != actual:
        raise CaseIndexError(
            f"The HNSW file {path} was not written completely: its {actual} bytes do not hold the "
            f"{header['count']} elements its header names (is the disk full?)."
        )


def _deleted_labels(path: str, header: dict[str, int], element_count: int) -> set[int]:
    """Labels hnswlib marked deleted in a saved file.

    hnswlib keeps the delete marks in the file but offers no call to list them, and the live
    count is needed to clamp k. The level-0 blocks are read straight from the file (memory
    mapped: no copy of the vectors) and the result is cross-checked against hnswlib's own
    element count.
    """
    count, size = header["count"], header["size_per_element"]
    if count != element_count:
        raise CaseIndexError(f"The HNSW file {path} is inconsistent: its header and hnswlib disagree on its size.")
    if count == 0:
        return set()
    blocks = np.memmap(path, dtype=np.uint8, mode="r", offset=_HNSW_HEADER.size, shape=(count, size))
    flags = blocks[:, 2] & _HNSW_DELETE_MARK
    positions = np.flatnonzero(flags)
    if not positions.size:
        return set()
    label_bytes = blocks[positions, header["label_offset"] : header["label_offset"] + 8]
    return set(np.ascontiguousarray(label_bytes).view("<u8").ravel().tolist())
