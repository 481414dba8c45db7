"""Nearest-neighbour search over unit vectors: one small interface, and the exact backend.

Every backend answers the same question the same way: given query vectors, the ``k`` stored
ids with the highest cosine similarity, best first, with the similarity as the score. The
exact backend here is the reference (and is fast enough below ~10^5 vectors); the HNSW backend
(``medfinder.index.hnsw``) is what an archive of 10^5-10^6 studies needs, and the Milvus one
(``medfinder.index.milvus``) what outgrows one machine.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import CaseIndexError


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


def as_ids(ids: np.ndarray | list[int], what: str = "ids") -> np.ndarray:
    array = np.asarray(ids)
    if array.ndim == 0:
        array = array[None]
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise CaseIndexError(f"The {what} must be a one-dimensional array of integers.")
    array = array.astype(np.int64, copy=False)
    if array.size and int(array.min()) < 0:
        raise CaseIndexError(f"The {what} must be non-negative integers.")
    return array


def checked_batch(ids: np.ndarray | list[int], vectors: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch to add, as every backend takes it: int64 ids, distinct, one per unit float32 row of ``dim``."""
    ids = as_ids(ids)
    vectors = normalise(vectors, dim)
    if ids.shape[0] != vectors.shape[0]:
        raise CaseIndexError(f"{ids.shape[0]} ids were given for {vectors.shape[0]} vectors.")
    if np.unique(ids).shape[0] != ids.shape[0]:
        raise CaseIndexError("The ids of one batch must be distinct.")
    return ids, vectors


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
        ids, vectors = checked_batch(ids, vectors, self.dim)
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
            for label in as_ids(ids).tolist():
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
                return empty_result(queries.shape[0])
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


def empty_result(n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((n_queries, 0), dtype=np.int64), np.empty((n_queries, 0), dtype=np.float32)
