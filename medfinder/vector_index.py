"""Nearest-neighbour search over unit vectors: one small interface, exact and HNSW backends.

Every backend answers the same question the same way: given query vectors, the ``k`` stored
ids with the highest cosine similarity, best first, with the similarity as the score. The
exact backend is the reference (and is fast enough below ~10^5 vectors); the HNSW backend
(hnswlib) is what an archive of 10^5-10^6 studies needs. A distributed backend can slot in
behind the same protocol later.

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
from typing import Protocol, runtime_checkable

import hnswlib
import numpy as np

from .errors import CaseIndexError

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


@runtime_checkable
class VectorIndex(Protocol):
    """What the case index needs from a nearest-neighbour backend."""

    dim: int

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store ``vectors`` (n, dim) under int64 ``ids``; an id already present is replaced."""

    def delete(self, ids: np.ndarray) -> None:
        """Forget ``ids``; ids that are not stored are ignored."""

    def query(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (ids (q, k') int64, cosine similarities (q, k') float32), best first.

        ``k' = min(k, len(self))``: asking for more neighbours than are stored is not an error.
        """

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to one file at ``path``."""

    def __len__(self) -> int:
        """Number of live (not deleted) vectors."""


def normalise(vectors: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    """Return ``vectors`` as a C-contiguous float32 (n, dim) array of unit rows.

    A zero or non-finite row has no direction, so it cannot take part in cosine search:
    that is an upstream bug worth a clear error rather than silent garbage neighbours.
    """
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise CaseIndexError(
            f"The {what} have shape {tuple(np.shape(vectors))} but this index stores {dim}-dimensional vectors."
        )
    if not np.isfinite(array).all():
        raise CaseIndexError(f"The {what} contain NaN or infinite values.")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if array.shape[0] and float(norms.min()) == 0.0:
        raise CaseIndexError(f"The {what} contain an all-zero vector, which has no direction to compare.")
    return np.ascontiguousarray(array / norms, dtype=np.float32)


def _as_ids(ids: np.ndarray | list[int], what: str = "ids") -> np.ndarray:
    array = np.asarray(ids)
    if array.ndim == 0:
        array = array[None]
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise CaseIndexError(f"The {what} must be a one-dimensional array of integers.")
    array = array.astype(np.int64, copy=False)
    if array.size and int(array.min()) < 0:
        raise CaseIndexError(f"The {what} must be non-negative integers.")
    return array


def _check_batch(ids: np.ndarray, vectors: np.ndarray) -> None:
    if ids.shape[0] != vectors.shape[0]:
        raise CaseIndexError(f"{ids.shape[0]} ids were given for {vectors.shape[0]} vectors.")
    if np.unique(ids).shape[0] != ids.shape[0]:
        raise CaseIndexError("The ids of one batch must be distinct.")


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k highest scores per row, best first."""
    if k >= scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def exact_search(
    stored: np.ndarray, queries: np.ndarray, k: int, chunk_elements: int = 1 << 25
) -> tuple[np.ndarray, np.ndarray]:
    """Row positions and inner products of the k best ``stored`` rows for each query row.

    Queries are processed in chunks so that the (queries x stored) score matrix stays under
    ``chunk_elements`` floats (128 MB by default) even for 10^6 stored vectors.
    """
    n = stored.shape[0]
    k = min(k, n)
    rows = np.empty((queries.shape[0], k), dtype=np.int64)
    scores = np.empty((queries.shape[0], k), dtype=np.float32)
    step = max(1, chunk_elements // max(n, 1))
    for start in range(0, queries.shape[0], step):
        block = queries[start : start + step] @ stored.T
        best = _top_k(block, k)
        rows[start : start + step] = best
        scores[start : start + step] = np.take_along_axis(block, best, axis=1)
    return rows, scores


class ExactIndex:
    """Brute-force cosine search in numpy: the reference answer, and fine for small archives.

    Live vectors are kept in one contiguous block (a deletion moves the last row into the gap),
    so a query is a single matrix product with no masking.
    """

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        self.dim = int(dim)
        self._vectors = np.empty((max(capacity, 1), self.dim), dtype=np.float32)
        self._ids = np.empty(max(capacity, 1), dtype=np.int64)
        self._row_of: dict[int, int] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._row_of)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = _as_ids(ids)
        vectors = normalise(vectors, self.dim)
        _check_batch(ids, vectors)
        with self._lock:
            needed = len(self._row_of) + ids.shape[0]
            if needed > self._ids.shape[0]:
                self._grow(max(needed, int(self._ids.shape[0] * 1.5)))
            for label, vector in zip(ids.tolist(), vectors):
                row = self._row_of.get(label)
                if row is None:
                    row = len(self._row_of)
                    self._row_of[label] = row
                    self._ids[row] = label
                self._vectors[row] = vector

    def _grow(self, capacity: int) -> None:
        size = len(self._row_of)
        vectors = np.empty((capacity, self.dim), dtype=np.float32)
        vectors[:size] = self._vectors[:size]
        ids = np.empty(capacity, dtype=np.int64)
        ids[:size] = self._ids[:size]
        self._vectors, self._ids = vectors, ids

    def delete(self, ids: np.ndarray) -> None:
        with self._lock:
            for label in _as_ids(ids).tolist():
                row = self._row_of.pop(label, None)
                if row is None:
                    continue
                last = len(self._row_of)
                if row != last:
                    moved = int(self._ids[last])
                    self._vectors[row] = self._vectors[last]
                    self._ids[row] = moved
                    self._row_of[moved] = row

    def query(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = normalise(vectors, self.dim, "query vectors")
        with self._lock:
            size = len(self._row_of)
            k = min(int(k), size)
            if k <= 0:
                return _empty(queries.shape[0])
            rows, scores = exact_search(self._vectors[:size], queries, k)
            return self._ids[rows], scores

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, unit vectors) of every live entry, as copies."""
        with self._lock:
            size = len(self._row_of)
            return self._ids[:size].copy(), self._vectors[:size].copy()

    def save(self, path: str | os.PathLike[str]) -> None:
        ids, vectors = self.vectors()
        # A file object stops numpy from appending ".npz" to the caller's file name.
        with open(path, "wb") as handle:
            np.savez(handle, ids=ids, vectors=vectors)

    @classmethod
    def load(cls, path: str | os.PathLike[str], dim: int) -> "ExactIndex":
        try:
            with np.load(path, allow_pickle=False) as data:
                ids, vectors = data["ids"], data["vectors"]
        except (OSError, ValueError, KeyError, EOFError) as error:
            raise CaseIndexError(f"The vector file {path} cannot be read ({error}).") from error
        if vectors.ndim != 2 or vectors.shape[1] != dim or ids.shape != (vectors.shape[0],):
            raise CaseIndexError(
                f"The vector file {path} holds vectors of shape {vectors.shape}, not {dim}-dimensional ones."
            )
        if np.unique(ids).shape[0] != ids.shape[0] or not np.isfinite(vectors).all():
            raise CaseIndexError(f"The vector file {path} is corrupt: it repeats ids or holds non-finite values.")
        # Stored rows are already unit vectors: normalising again would change their last bits
        # and so the scores of a reopened index.
        index = cls(dim, capacity=max(ids.shape[0], 1))
        index._vectors[: ids.shape[0]] = vectors
        index._ids[: ids.shape[0]] = ids
        index._row_of = {label: row for row, label in enumerate(ids.tolist())}
        return index


def _empty(n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((n_queries, 0), dtype=np.int64), np.empty((n_queries, 0), dtype=np.float32)


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
        ids = _as_ids(ids)
        vectors = normalise(vectors, self.dim)
        _check_batch(ids, vectors)
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
            for label in _as_ids(ids).tolist():
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
                return _empty(queries.shape[0])
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
        labels = np.asarray(self.live_ids(), dtype=np.int64)
        stored = np.asarray(self._index.get_items(labels, return_type="numpy"), dtype=np.float32)
        rows, scores = exact_search(stored, queries, k)
        return labels[rows], scores

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
