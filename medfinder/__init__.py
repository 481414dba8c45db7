"""MedFinder: similar-case search for 3D CT, by text, by image and by keyword.

The user's front door::

    import medfinder

    volume = medfinder.load_volume("scan.nii.gz")               # Volume: HU int16, RAS+, spacing
    model, preprocess = medfinder.create_model_and_transforms("medfinder-demo")
    searcher = medfinder.Searcher.open("demo_index")            # the index and the model that built it
    results = searcher.search(text="right pleural effusion", k=5)

Names are loaded on first use, so that ``import medfinder.io`` (or a command that fails on its
arguments) does not pay for PyTorch and the language model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {
    "Volume": "medfinder.io",
    "load_volume": "medfinder.io",
    "read_manifest": "medfinder.io",
    "ModelConfig": "medfinder.model",
    "MedFinder": "medfinder.model",
    "create_model_and_transforms": "medfinder.model",
    "load_model": "medfinder.model",
    "CaseIndex": "medfinder.index",
    "CaseEntry": "medfinder.index",
    "build_index": "medfinder.index",
    "Searcher": "medfinder.search",
    "SearchFilters": "medfinder.search",
    "SearchResult": "medfinder.search",
    "MedFinderError": "medfinder.errors",
}
__all__ = [  # a literal, so linters and IDEs see the re-exports
    "CaseEntry",
    "CaseIndex",
    "MedFinder",
    "MedFinderError",
    "ModelConfig",
    "SearchFilters",
    "SearchResult",
    "Searcher",
    "Volume",
    "build_index",
    "create_model_and_transforms",
    "load_model",
    "load_volume",
    "read_manifest",
    "__version__",
]

if TYPE_CHECKING:
    from .errors import MedFinderError
    from .index import CaseEntry, CaseIndex, build_index
    from .io import Volume, load_volume, read_manifest
    from .model import MedFinder, ModelConfig, create_model_and_transforms, load_model
    from .search import Searcher, SearchFilters, SearchResult


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medfinder' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
