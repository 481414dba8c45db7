"""The app's service: one searcher shared by every session, uploads, and the JSON API.

Settings come from the environment, so that ``python app.py`` and a Hugging Face Space need no
arguments: ``MEDFINDER_INDEX`` (an index folder; default: the demo index, built on first start),
``MEDFINDER_MODEL`` (the model, when the index's recorded one has moved), ``MEDFINDER_DEVICE``
(``auto``, ``cpu`` or ``cuda``), ``MEDFINDER_DICOMWEB`` (a PACS's DICOMweb root: the "Search by CT"
tab then also takes a study from it; credentials as for ``index_build --dicomweb``) and
``MEDFINDER_VIEWER_URL`` (a PACS viewer URL with ``{study}`` and ``{series}``: each case of an index built
with ``--link-to-pacs`` then gets "Open in PACS viewer"). The model and index load once per process and
are shared read-only by every session.

On a ZeroGPU Space, the functions that run the encoders are wrapped in ``spaces.GPU`` and the model
is moved to the GPU inside them; elsewhere the wrapper does nothing and the model stays where
``MEDFINDER_DEVICE`` put it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..demo import DEMO_INDEX_DIR, bundled_examples, ensure_demo_examples, open_demo_searcher
from ..errors import MedFinderError
from ..io import Volume
from ..search import SearchFilters, SearchResult, Searcher
from .uploads import UploadFolder, upload_paths

DEFAULT_K = 10
#: Modes of a CT search: its own channels, and what each returns.
IMAGE_MODES = {"Similar cases": None, "Matching reports": ["report"]}

try:  # a Hugging Face ZeroGPU Space: the GPU is attached only inside functions wrapped in spaces.GPU
    import spaces  # type: ignore[import-not-found]

    gpu: Callable[[Callable[..., Any]], Callable[..., Any]] = spaces.GPU
    ON_ZEROGPU = True
except ImportError:
    def gpu(fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn

    ON_ZEROGPU = False


@dataclass(frozen=True)
class AppSettings:
    """What the app serves, read from the environment."""

    index: Path | None = None
    model: str | None = None
    device: str = "auto"
    demo_index: Path = field(default_factory=lambda: DEMO_INDEX_DIR)
    #: A PACS's DICOMweb root ("From PACS" in the CT tab), and a viewer URL template for linked indexes.
    dicomweb: str | None = None
    viewer_url: str | None = None

    @classmethod
    def from_env(cls) -> "AppSettings":
        index = os.environ.get("MEDFINDER_INDEX")
        return cls(index=Path(index) if index else None, model=os.environ.get("MEDFINDER_MODEL") or None,
                   device=os.environ.get("MEDFINDER_DEVICE", "auto"),
                   demo_index=Path(os.environ.get("MEDFINDER_DEMO_INDEX", DEMO_INDEX_DIR)),
                   dicomweb=os.environ.get("MEDFINDER_DICOMWEB") or None,
                   viewer_url=os.environ.get("MEDFINDER_VIEWER_URL") or None)

    @property
    def is_demo(self) -> bool:
        return self.index is None or self.index.resolve() == self.demo_index.resolve()


class Service:
    """The searcher, the uploads and the examples of one app process."""

    def __init__(self, settings: AppSettings, uploads: UploadFolder) -> None:
        self.settings = settings
        self.uploads = uploads
        self._searcher: Searcher | None = None
        self._examples: dict[str, Path] | None = None
        self._lock = threading.Lock()
        self._pacs: Any = None

    def searcher(self) -> Searcher:
        """The model and index, loaded (and for the demo, built) on first use."""
        with self._lock:
            if self._searcher is None:
                s = self.settings
                # On ZeroGPU there is no GPU outside the wrapped functions: load on the CPU, and
                # move to the GPU inside them (``_attached``).
                device = "cpu" if ON_ZEROGPU else s.device
                if s.is_demo and s.model is None:
                    self._searcher = open_demo_searcher(s.demo_index, device=device)
                else:
                    self._searcher = Searcher.open(s.index or s.demo_index, s.model, device=device)
            return self._searcher

    def attached(self) -> Searcher:
        """The searcher, its model on the GPU when one is attached to this call (ZeroGPU)."""
        searcher = self.searcher()
        if ON_ZEROGPU and self.settings.device != "cpu":
            import torch

            if torch.cuda.is_available() and searcher.model.device.type != "cuda":
                searcher.model.to("cuda")
        return searcher

    def describe(self) -> str:
        """One line for the page: what is searched, with which model, through which channels."""
        searcher = self.searcher()
        info = searcher.index.info()
        names = {"keyword": "keyword", "text": "report text", "image": "image", "report": "image → report"}
        text = ", ".join(names[c] for c in info["serves"]["text"])
        image = ", ".join(names[c] for c in info["serves"]["image"])
        aligned = "" if searcher.model.aligned else " This model is not aligned with text: no text-to-image score."
        return (f"Index of {info['counts']['cases']:,} cases, model `{searcher.model.config.name}`. "
                f"Text queries use: {text}. CT queries use: {image}.{aligned}")

    def examples(self) -> dict[str, Path]:
        """Example CTs offered in the app: the bundled real CT, and for the demo a few phantoms
        from a seed neither the index nor training used."""
        if self._examples is None:
            self._examples = ensure_demo_examples(self.settings.demo_index) if self.settings.is_demo else bundled_examples()
        return self._examples

    def allowed_paths(self) -> list[str]:
        """The folders Gradio may serve files from: the examples' alone."""
        return sorted({str(p.parent) for p in self.examples().values()})

    def load_query(self, files: Any, example: str | None) -> Volume:
        """An uploaded CT (deleted once read) or a bundled example, as a Volume; one sentence on failure."""
        paths = upload_paths(files)
        if not paths and example:
            chosen = self.examples().get(example)
            if chosen is None:
                raise MedFinderError(f"{example!r} is not one of the example CTs.")
            paths = [str(chosen)]
        if not paths:
            raise MedFinderError("Upload a CT (.nii/.nii.gz, DICOM .zip or files, .nrrd) or pick an example first.")
        return self.uploads.read(paths)

    def load_from_pacs(self, study: str) -> Volume:
        """The main CT series of a study in the PACS (``MEDFINDER_DICOMWEB``), as an upload is treated:
        in memory for this session only, named "the PACS study", never by its identifiers."""
        from ..pacs import study_volume

        if not self.settings.dicomweb:
            raise MedFinderError("No PACS is configured: set MEDFINDER_DICOMWEB to its DICOMweb root.")
        with self._lock:
            if self._pacs is None:
                from ..io.dicomweb import PacsClient

                self._pacs = PacsClient(self.settings.dicomweb)
        return study_volume(self._pacs, study or "")

    def viewer_link(self, result: SearchResult) -> str | None:
        """"Open in PACS viewer" for a case of an index built with ``--link-to-pacs``, when
        ``MEDFINDER_VIEWER_URL`` is set; None otherwise."""
        from ..pacs import viewer_link

        if not self.settings.viewer_url:
            return None
        if not self.searcher().index.info()["settings"].get("identifiable"):
            return None
        return viewer_link(self.settings.viewer_url, result.source)

    def text_filters(self, include: list[str] | None, exclude: list[str] | None, sex: str | None,
                     age_min: float | None, age_max: float | None) -> SearchFilters:
        return SearchFilters(
            include_findings=tuple(include or ()), exclude_findings=tuple(exclude or ()),
            sex=None if sex in (None, "", "any") else sex,
            age_min=int(age_min) if age_min and age_min > 0 else None,
            age_max=int(age_max) if age_max is not None and age_max < 100 else None,
        )

    def case_json(self, case_id: str) -> dict[str, Any]:
        record = self.searcher().case(case_id)
        return {"case_id": record.case_id, "report": record.report, "metadata": record.metadata,
                "findings": list(record.findings)}


_service: Service | None = None


def install(service: Service) -> Service:
    """Make ``service`` the one the module-level (GPU-wrapped) functions use."""
    global _service
    _service = service
    return service


def current() -> Service:
    if _service is None:
        raise MedFinderError("The app's service has not been started.")
    return _service


@gpu
def text_search(query: str, filters: SearchFilters, k: int, offset: int = 0) -> list[SearchResult]:
    """Ranked cases for findings or symptoms typed by a user."""
    if not query or not query.strip():
        raise MedFinderError("Type findings or symptoms to search for, e.g. 'right pleural effusion'.")
    return current().attached().search(text=query, k=k, filters=filters, offset=offset)


@gpu
def image_search(volume: Volume, mode: str, k: int) -> list[SearchResult]:
    """Ranked cases for a query CT: similar scans, or matching reports."""
    if mode not in IMAGE_MODES:
        raise MedFinderError(f"The CT search mode {mode!r} is not one of {', '.join(IMAGE_MODES)}.")
    return current().attached().search(image=volume, k=k, channels=IMAGE_MODES[mode])
