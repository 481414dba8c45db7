"""One case: demographics, plan, anatomy, findings, render and report from (seed, index) alone.

Each part draws from its own random stream, so the corpus stays reproducible as parts evolve:
rewording a report never moves a nodule, and a finding painted differently never changes who
the patient is.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..io.volume import Volume
from .addresses import phantom_case_id
from .anatomy import Anatomy
from .body import build_anatomy
from .findings import build_findings
from .grid import Grid
from .plan import draw_plan
from .records import DEMO_SHAPE, DEMO_SPACING, PHANTOM_FINDINGS, TISSUE_CODES, PhantomCase, PhantomError, PhantomFinding
from .render import render
from .report_writer import write_report
from .scene import Scene, Spec
from .trees import Branch

_T = TISSUE_CODES


def _streams(seed: int, index: int) -> list[np.random.Generator]:
    """Independent random streams (demographics, plan, anatomy, findings, report), so that changing
    how a report is worded never moves a nodule."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)])
    return [np.random.default_rng(c) for c in ss.spawn(5)]


def _demographics(rng: np.random.Generator) -> tuple[str, int, bool]:
    sex = "M" if rng.random() < 0.52 else "F"
    age = int(np.clip(round(rng.normal(58, 15)), 20, 92))
    contrast = bool(rng.random() < 0.35)
    return sex, age, contrast


def case_plan(seed: int, index: int) -> tuple[str, int, bool, set[str]]:
    """Sex, age, contrast and the finding labels of a case, without painting it (cheap)."""
    r_demo, r_plan, *_ = _streams(seed, index)
    sex, age, contrast = _demographics(r_demo)
    return sex, age, contrast, set(draw_plan(r_plan, age, sex).findings)


def check_geometry(shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape and spacing as ints and floats, or a one-sentence ``PhantomError``."""
    try:
        shp = tuple(int(v) for v in shape)
        spc = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise PhantomError(f"Phantom shape {shape!r} and spacing {spacing!r} must be three numbers each.") from None
    if len(shp) != 3 or any(v < 16 or v > 2048 for v in shp):
        raise PhantomError(f"Phantom shape {shp} must be three voxel counts between 16 and 2048.")
    if len(spc) != 3 or any(not math.isfinite(v) or v < 0.2 or v > 10 for v in spc):
        raise PhantomError(f"Phantom spacing {spc} must be three voxel sizes between 0.2 and 10 mm.")
    return shp, spc  # type: ignore[return-value]


#: A finding smaller than this once painted (mm^3; hidden behind another, or cut by the field of
#: view) is not labelled: the labels promise what a reader can see.
_MIN_VISIBLE_MM3 = {"Lung nodule": 90.0, "Arterial wall calcification": 15.0, "Coronary artery wall calcification": 10.0,
                    "Medical material": 20.0, "Lymphadenopathy": 400.0, "Lung opacity": 1500.0, "Consolidation": 3000.0,
                    "Atelectasis": 1200.0, "Pleural effusion": 5000.0, "Pneumothorax": 5000.0, "Pericardial effusion": 5000.0,
                    "Emphysema": 2000.0, "Bronchiectasis": 600.0, "Interlobular septal thickening": 5000.0,
                    "Lung mass": 8000.0, "Cardiomegaly": 1e5, "Hiatal hernia": 8000.0}


def generate_case(seed: int, index: int, shape: tuple[int, int, int] = DEMO_SHAPE,
                  spacing: tuple[float, float, float] = DEMO_SPACING) -> PhantomCase:
    """Build case ``index`` of corpus ``seed``: the same arguments always give the same case."""
    shape, spacing = check_geometry(shape, spacing)
    r_demo, r_plan, r_anat, r_find, r_text = _streams(seed, index)
    sex, age, contrast = _demographics(r_demo)
    plan = draw_plan(r_plan, age, sex)
    cardiomegaly = "Cardiomegaly" in plan.findings
    heart_scale = r_plan.uniform(1.3, 1.5) if cardiomegaly else r_plan.uniform(0.9, 1.04)
    gap = r_plan.uniform(7, 18) if "Pericardial effusion" in plan.findings else 2.4
    noise_hu = r_plan.uniform(8, 20)
    A = Anatomy(r_anat, sex, age, contrast, heart_scale)
    fov_z = shape[2] * spacing[2]
    centre_z = max(A.L + r_anat.uniform(8, 35) - fov_z / 2, 0.42 * A.L - 10)
    grid = Grid(shape, spacing, shift=(r_anat.uniform(-8, 8), 16 + r_anat.uniform(-6, 8), -centre_z),
                theta=float(np.clip(r_anat.normal(0, 0.035), -0.09, 0.09)))

    # Cardiothoracic ratio: heart width over the inner thoracic width at the heart's level.
    ctr = A.heart_ext[0] / float(A.profile(np.array([A.heart_c[2]]))[0][0])
    scene = Scene()
    heart_spec = None
    if cardiomegaly:
        sev = "mild" if ctr < 0.57 else "moderate" if ctr < 0.61 else "marked"
        heart_spec = scene.spec(Spec("Cardiomegaly", A.heart_c.copy(), round(2 * A.heart_ext[0]), None, None, sev,
                                     {}, (_T["myocardium"], _T["blood"])))
    peri_spec = None
    if "Pericardial effusion" in plan.findings:
        sev = "small" if gap < 10 else "moderate" if gap < 15 else "large"
        peri_spec = scene.spec(Spec("Pericardial effusion", A.heart_c.copy(), round(gap), None, None, sev,
                                    {"thickness_mm": round(gap)}, (_T["fluid"],)))
    bronchi: dict[str, list[Branch]] = {}
    build_anatomy(scene, A, grid, r_anat, gap, heart_spec, peri_spec, bronchi)
    build_findings(scene, A, plan, r_find, grid, bronchi)
    hu, tissue = render(scene, grid, seed, index, noise_hu)

    findings: list[PhantomFinding] = []
    voxel_mm3 = float(np.prod(spacing))
    for spec in scene.specs:
        rec = spec.record
        if rec is None:
            continue
        (x0, x1), (y0, y1), (z0, z1) = rec.bbox
        crop = rec.crop & np.isin(tissue[x0:x1, y0:y1, z0:z1], rec.keep)
        if crop.sum() * voxel_mm3 < _MIN_VISIBLE_MM3.get(spec.name, 100.0):
            continue  # outside the field of view or hidden by another finding: not visible, so not labelled
        if spec.lobe == "left upper lobe" and spec.center[2] < A.horizontal_z():
            spec.detail["lingula"] = True
        if spec.name == "Cardiomegaly":
            spec.detail["ctr"] = round(ctr, 2)
        cv = grid.patient_to_voxel(spec.center)[0]
        cw = grid.patient_to_world(spec.center)[0]
        findings.append(PhantomFinding(
            name=spec.name, center_vox=tuple(int(round(v)) for v in cv), center_mm=tuple(round(float(v), 1) for v in cw),
            size_mm=float(spec.size_mm), side=spec.side, lobe=spec.lobe, severity=spec.severity, detail=spec.detail,
            bbox=rec.bbox, mask_crop=crop, volume_shape=shape))
    labels = {name: 0 for name in PHANTOM_FINDINGS}
    for f in findings:
        labels[f.name] = 1
    case_id = phantom_case_id(seed, index)
    report = write_report(findings, sex=sex, age=age, contrast=contrast, slice_mm=spacing[2],
                          conditions=plan.conditions, rng=r_text, ctr=ctr)
    volume = Volume(hu=hu, spacing=tuple(float(v) for v in spacing), affine=grid.affine.copy(),
                    metadata={"modality": "CT", "synthetic": True, "generator": "medfinder.phantoms",
                              "contrast": contrast, "sex": sex, "age": age},
                    source=case_id)
    return PhantomCase(case_id=case_id, volume=volume, report=report, labels=labels, findings=findings,
                       sex=sex, age=age, contrast=contrast, tissue=tissue)
