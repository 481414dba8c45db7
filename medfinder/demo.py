"""The demo: where its model and index live, and how the index is made from scratch.

The demo corpus is synthetic (medfinder.phantoms), so the demo index is rebuilt on a fresh
machine from a seed rather than shipped: ``python -m medfinder demo-index`` (or the first
``python app.py``) writes it to ``DEMO_INDEX_DIR``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .search import Searcher

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEMO_MODEL_DIR = ASSETS_DIR / "model"
#: Where the demo index is built; override with MEDFINDER_DEMO_INDEX.
DEMO_INDEX_DIR = Path(os.environ.get("MEDFINDER_DEMO_INDEX", Path(__file__).resolve().parent.parent / "demo_index"))
#: The demo corpus: phantom cases from a seed the demo model never saw in training.
DEMO_SEED = 7
#: How many phantoms the demo index holds; MEDFINDER_DEMO_CASES makes a smaller one (a quicker first start).
DEMO_CASES = 120
#: Example query scans: phantoms from another seed that neither the demo index nor training used
#: (tests/test_index.py checks both against the seeds recorded in assets/model/training_stage1.json).
EXAMPLE_SEED = 2718
EXAMPLE_CASES = 3
#: Names the seed its examples came from, so that examples from an earlier seed are replaced.
_SEED_FILE = ".seed"
BUNDLED_EXAMPLES_DIR = ASSETS_DIR / "examples"


def demo_cases() -> int:
    """The demo corpus's size: MEDFINDER_DEMO_CASES when set (10 to 5000), else DEMO_CASES."""
    from .errors import MedFinderError

    value = os.environ.get("MEDFINDER_DEMO_CASES", "").strip()
    if not value:
        return DEMO_CASES
    if not value.isdigit() or not 10 <= int(value) <= 5000:
        raise MedFinderError(f"MEDFINDER_DEMO_CASES must be a whole number from 10 to 5000, not {value!r}.")
    return int(value)


def ensure_demo_index(index_dir: Path = DEMO_INDEX_DIR, n: int | None = None, seed: int = DEMO_SEED,
                      workers: int = 2, model_dir: Path = DEMO_MODEL_DIR, device: str = "auto") -> Path:
    """Build the demo index unless a complete one is already there; returns its folder.

    Resumable like every index build: an interrupted first start picks up where it stopped.
    """
    from .index.build import build_index
    from .io.manifests import read_manifest
    from .phantoms import write_corpus

    index_dir = Path(index_dir)
    n = demo_cases() if n is None else n
    _drop_if_built_by_another_model(index_dir, model_dir)
    corpus = index_dir.parent / f"{index_dir.name}_corpus"
    manifest = corpus / "manifest.csv"
    if not manifest.exists():
        write_corpus(n, seed, corpus, workers=workers)
    build_index(read_manifest(manifest), index_dir, model=model_dir, workers=workers, device=device,
                settings={"corpus": f"phantoms n={n} seed={seed}"})
    return index_dir


def open_demo_searcher(index_dir: Path = DEMO_INDEX_DIR, device: str = "auto") -> "Searcher":
    """The demo index (built or rebuilt first when it is missing or older than the demo weights)
    searched with the demo model."""
    from .search import Searcher

    if not demo_index_is_current(index_dir):
        log.warning("Building the demo index from synthetic phantoms in %s (first start, or new weights).", index_dir)
        ensure_demo_index(index_dir, device=device)
    return Searcher.open(index_dir, DEMO_MODEL_DIR, device=device)


def _built_with(index_dir: Path) -> str | None:
    """The fingerprint of the model that built a committed index; None if there is none or it is unreadable."""
    from .errors import MedFinderError
    from .index import CaseIndex

    if not (Path(index_dir) / "index.json").exists():
        return None
    try:
        return CaseIndex.read_info(Path(index_dir))["model"].get("fingerprint")
    except (MedFinderError, OSError, ValueError, KeyError):
        return None


def demo_index_is_current(index_dir: Path = DEMO_INDEX_DIR, model_dir: Path = DEMO_MODEL_DIR) -> bool:
    """True when a committed demo index is there and was built by the current demo weights."""
    from .model import read_fingerprint

    built_with = _built_with(index_dir)
    return built_with is not None and built_with == read_fingerprint(model_dir)


def _drop_if_built_by_another_model(index_dir: Path, model_dir: Path) -> None:
    """After new demo weights, the old demo index cannot be searched with them; it is synthetic
    and rebuilt from its seed, so it is removed rather than refused."""
    import shutil

    from .model import read_fingerprint

    built_with = _built_with(index_dir)  # None: nothing there, or let the build report what is wrong
    current = read_fingerprint(model_dir)
    if built_with and current and built_with != current:
        log.warning(
            "The demo index in %s was built with another model (%s); rebuilding it for %s.", index_dir, built_with, current)
        shutil.rmtree(index_dir)


def examples_dir(index_dir: Path = DEMO_INDEX_DIR) -> Path:
    return Path(index_dir).parent / f"{Path(index_dir).name}_examples"


def bundled_examples() -> dict[str, Path]:
    """The example CTs that ship with MedFinder (a real abdomen CT), by file name."""
    return {p.name: p for p in sorted(BUNDLED_EXAMPLES_DIR.glob("*.nii.gz"))}


def ensure_demo_examples(index_dir: Path = DEMO_INDEX_DIR) -> dict[str, Path]:
    """Example CTs for the app: the bundled real CT plus a few phantoms generated on first use."""
    import nibabel as nib

    from .phantoms import generate_case

    folder = examples_dir(index_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fresh = _drop_examples_from_another_seed(folder)
    for i in range(EXAMPLE_CASES):
        target = folder / f"phantom_example_{i + 1}.nii.gz"
        if not target.exists():
            case = generate_case(EXAMPLE_SEED, i)
            names = list(dict.fromkeys(f.name.lower().replace(" ", "-") for f in case.findings))  # one per bilateral pair
            found = "_".join(names[:2]) or "normal"
            tmp = folder / f".{target.name}.part.nii.gz"
            nib.save(nib.Nifti1Image(case.volume.hu, case.volume.affine), str(tmp))
            tmp.replace(target)
            (folder / f"{target.name}.txt").write_text(found)
    if fresh:  # written once the examples are there, so an interrupted start regenerates them
        try:
            (folder / _SEED_FILE).write_text(str(EXAMPLE_SEED))
        except OSError:
            pass  # a read-only copy, already warned about
    examples = bundled_examples()
    for p in sorted(folder.glob("phantom_example_*.nii.gz")):
        note = (folder / f"{p.name}.txt")
        label = f"{p.name} (synthetic: {note.read_text()})" if note.exists() else p.name
        examples[label] = p
    return examples


def _drop_examples_from_another_seed(folder: Path) -> bool:
    """Examples generated by an earlier release from another seed (before 2718 they came from
    seed 9, which training used) are removed, to be regenerated, so that no example query is a
    training case. Returns False when the folder's examples already come from EXAMPLE_SEED."""
    seed_file = folder / _SEED_FILE
    if seed_file.exists() and seed_file.read_text().strip() == str(EXAMPLE_SEED):
        return False
    try:
        for stale in [*folder.glob("phantom_example_*"), *folder.glob(".phantom_example_*")]:
            stale.unlink(missing_ok=True)
    except OSError as exc:  # a read-only copy: serve what is there rather than not start
        log.warning("Could not replace the example scans in %s: %s", folder, exc)
    return True
