"""Example renders for the README (made with medfinder.viewer).

Examples are searched for by plan and then checked on the painted case, so a seed always gives
the same four pictures and each shows what its name says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .case import case_plan, generate_case
from .records import TISSUE_CODES, PhantomCase, PhantomError, PhantomFinding

_T = TISSUE_CODES


def _find_cases(seed: int, want: set[str], avoid: frozenset[str] = frozenset(), normal: bool = False,
                contrast: bool | None = None) -> Iterable[int]:
    """Indices whose plan fits (cheap): painting decides later whether a finding shows well."""
    for index in range(5000):
        sex, age, con, labels = case_plan(seed, index)
        if contrast is not None and con != contrast:
            continue
        if (normal and not labels) or (not normal and want <= labels and not (labels & avoid)):
            yield index


def _example(seed: int, want: set[str], ok: Callable[[PhantomCase], bool], **kw: Any) -> PhantomCase:
    for index in _find_cases(seed, want, **kw):
        case = generate_case(seed, index)
        if ok(case):
            return case
    raise PhantomError(f"No phantom case of seed {seed} shows {sorted(want)} clearly enough for an example.")


def _largest(case: PhantomCase, name: str) -> PhantomFinding | None:
    found = [f for f in case.findings if f.name == name]
    return max(found, key=lambda f: f.voxel_count) if found else None


def render_examples(out_dir: Path, seed: int = 2024) -> list[Path]:
    """Four example slices (axial/coronal, lung/mediastinal window, with and without findings)."""
    from ..viewer import WINDOW_PRESETS, render_slice

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lung_w, lung_l = WINDOW_PRESETS["lung"]
    med_w, med_l = WINDOW_PRESETS["mediastinum"]

    def save(case: PhantomCase, plane: str, index: int, window: tuple[float, float], name: str) -> Path:
        path = out_dir / name
        render_slice(case.volume, plane, int(index), window[0], window[1]).save(path)
        return path

    normal = _example(seed, set(), lambda c: True, normal=True)
    heart_z = int(np.argmax(np.isin(normal.tissue, [_T["myocardium"]]).sum(axis=(0, 1))))
    made = [save(normal, "axial", heart_z + 6, (lung_w, lung_l), "phantom_lung_normal.png")]

    def big_nodule(c: PhantomCase) -> bool:
        f = _largest(c, "Lung nodule")
        return f is not None and f.size_mm >= 12 and f.detail.get("type") == "solid"

    sick = _example(seed, {"Lung nodule", "Emphysema"}, big_nodule, avoid=frozenset({"Pleural effusion"}))
    made.append(save(sick, "axial", _largest(sick, "Lung nodule").center_vox[2], (lung_w, lung_l),
                     "phantom_lung_findings.png"))

    def heart_and_fluid(c: PhantomCase) -> bool:
        return _largest(c, "Pleural effusion") is not None and _largest(c, "Cardiomegaly") is not None

    heart = _example(seed, {"Cardiomegaly", "Pleural effusion"}, heart_and_fluid, contrast=True)
    fluid = sum(f.mask() for f in heart.findings if f.name == "Pleural effusion").sum(axis=(0, 1))
    cardio = _largest(heart, "Cardiomegaly").mask().sum(axis=(0, 1))
    made.append(save(heart, "axial", int(np.argmax(fluid * (cardio > 0.7 * cardio.max()))), (med_w, med_l),
                     "phantom_mediastinum_axial.png"))

    def posterior_mass(c: PhantomCase) -> bool:
        f = _largest(c, "Lung mass")
        return f is not None and f.center_vox[1] < 0.5 * c.volume.hu.shape[1]

    mass = _example(seed, {"Lung mass", "Pleural effusion"}, posterior_mass)
    made.append(save(mass, "coronal", _largest(mass, "Lung mass").center_vox[1], (lung_w, lung_l),
                     "phantom_coronal_findings.png"))
    return made
