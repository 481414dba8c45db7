"""A corpus on disk: NIfTI volumes, a manifest and ground-truth boxes, written in parallel.

Also the way back for a manifest whose phantoms were never written to disk (``medfinder.recipe``):
``phantom_volume`` paints the case its ``phantom:SEED:INDEX`` names again.
"""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from ..io.volume import Volume
from .addresses import PHANTOM_SCHEME, is_phantom_path, phantom_address
from .case import check_geometry, generate_case
from .records import DEMO_SHAPE, DEMO_SPACING, MANIFEST_HEAD, MANIFEST_TAIL, PHANTOM_FINDINGS, PhantomCase, PhantomError

#: The ground truth ``write_corpus`` writes beside the manifest: one JSON line per case.
FINDINGS_FILE = "findings.jsonl"


def phantom_volume(path: str | Path) -> Volume:
    """The volume a ``phantom_path`` stands for, painted again: the same case, voxel for voxel."""
    address = phantom_address(path)
    if address is None:
        raise PhantomError(f"{path} is not a phantom path ({PHANTOM_SCHEME}:SEED:INDEX).")
    return generate_case(*address).volume


def load_scan(path: str | Path) -> Volume:
    """A scan for training and evaluation: a file (``load_volume``), or a phantom that a recipe's
    manifest names as ``phantom:SEED:INDEX`` and never wrote, painted again."""
    from ..io.load import load_volume

    if ":" in Path(path).name and not Path(path).exists() and is_phantom_path(path):
        return phantom_volume(path)
    return load_volume(path)


def manifest_columns() -> list[str]:
    return [*MANIFEST_HEAD, *PHANTOM_FINDINGS, *MANIFEST_TAIL]


def findings_record(case: PhantomCase) -> dict[str, Any]:
    """A case's line of ``findings.jsonl``: per painted finding its label and the tight box of its
    visible voxels, ``[[i0, i1], [j0, j1], [k0, k1]]`` half-open indices into ``case.volume.hu``.

    That array is what ``write_corpus`` saves, and nibabel reads it back with the same axes
    (``np.asanyarray(nib.load(path).dataobj)``), so a box indexes the saved image directly. A
    finding painted more than once (bilateral effusions, several nodules) has an entry each.
    """
    findings = []
    for f in case.findings:
        box = f.mask_bbox()
        if box is not None:
            findings.append({"label": f.name, "box": [[lo, hi] for lo, hi in box]})
    return {"case_id": case.case_id, "findings": findings}


#: What a worker needs to write one case: seed, index, shape, spacing, images folder, gzip level.
_Task = tuple[int, int, tuple[int, int, int], tuple[float, float, float], str, int]


def _write_one(task: _Task) -> tuple[list[str], dict[str, Any]]:
    """Paint and save one case; its manifest row and ground-truth line go back to the parent."""
    import nibabel as nib

    seed, index, shape, spacing, images, compresslevel = task
    case = generate_case(seed, index, shape, spacing)
    name = f"{case.case_id}.nii.gz"
    img = nib.Nifti1Image(case.volume.hu, case.volume.affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"medfinder synthetic chest CT"
    path = Path(images) / name
    tmp = path.with_name(f".{name}.part")
    with open(tmp, "wb") as fh:
        import gzip

        with gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=compresslevel, mtime=0) as gz:
            gz.write(img.to_bytes())
    os.replace(tmp, path)
    return case.manifest_row(f"images/{name}"), findings_record(case)


def write_corpus(n: int, seed: int, out: Path, shape: tuple[int, int, int] = DEMO_SHAPE,
                 spacing: tuple[float, float, float] = DEMO_SPACING, workers: int = 2,
                 compresslevel: int = 1, progress: bool = True) -> Path:
    """Write ``n`` cases of corpus ``seed`` under ``out`` and return the manifest path.

    Images go to ``out/images/<case_id>.nii.gz`` (int16 HU, the Volume's RAS affine) and
    ``out/manifest.csv`` lists ``case_id,image,report``, one 0/1 column per finding label in
    ``PHANTOM_FINDINGS`` order, then ``sex,age``. ``out/findings.jsonl`` has the ground truth,
    one line per manifest row in the same order (``findings_record``). Every case depends only on
    (seed, index), so the output is the same whatever the number of workers.
    """
    from tqdm import tqdm

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PhantomError(f"The number of phantom cases must be a positive whole number, not {n!r}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PhantomError(f"The number of workers must be a positive whole number, not {workers!r}.")
    shape, spacing = check_geometry(shape, spacing)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PhantomError(f"Output folder {out} exists and is not a folder.")
    images = out / "images"
    try:
        images.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PhantomError(f"Output folder {out} cannot be created ({exc.strerror}).") from None
    tasks = [(int(seed), i, shape, spacing, str(images), int(compresslevel)) for i in range(n)]
    rows: list[list[str]] = []
    truth: list[dict[str, Any]] = []
    bar = tqdm(total=n, desc="phantoms", unit="case", disable=not progress)
    if workers == 1 or n == 1:
        for task in tasks:
            row, record = _write_one(task)
            rows.append(row)
            truth.append(record)
            bar.update()
    else:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=min(workers, n), mp_context=ctx) as pool:
            for row, record in pool.map(_write_one, tasks, chunksize=1):
                rows.append(row)
                truth.append(record)
                bar.update()
    bar.close()
    # the ground truth before the manifest: a fresh corpus that has its manifest has its boxes too
    write_findings(out / FINDINGS_FILE, truth)
    return write_manifest(out / "manifest.csv", rows)


def write_manifest(manifest: Path, rows: Sequence[Sequence[str]]) -> Path:
    """Write ``PhantomCase.manifest_row`` rows under ``manifest_columns()``, replacing ``manifest`` whole."""
    tmp = manifest.with_name(f".{manifest.name}.part")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(manifest_columns())
        writer.writerows(rows)
    os.replace(tmp, manifest)
    return manifest


def write_findings(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write ``findings_record`` lines (JSON Lines), replacing ``path`` whole."""
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path
