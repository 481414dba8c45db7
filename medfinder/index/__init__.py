"""The case index: an index folder of past cases (records, vectors per channel, keyword postings),
built by one writer and searched by many readers."""

from .build import BuildSummary, build_index
from .case_index import CHANNELS, CaseEntry, CaseIndex
from .cases import StoredCase
from .hnsw import HnswIndex
from .ray_build import build_index_with_ray
from .vectors import ExactIndex, VectorIndex

__all__ = [
    "CHANNELS",
    "BuildSummary",
    "CaseEntry",
    "CaseIndex",
    "ExactIndex",
    "HnswIndex",
    "StoredCase",
    "VectorIndex",
    "build_index",
    "build_index_with_ray",
]
