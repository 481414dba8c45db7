"""Evidence against the phantoms' own ground truth (``findings.jsonl``), with the demo model: a text query's
evidence lands on the finding it names, and a CT query's evidence starts at the finding the query scan
resembles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.evidence import baselines, boxes_of, inside  # the hit the benchmark counts: 10 mm around the box
from medfinder.index.build import build_index
from medfinder.io.manifests import read_manifest
from medfinder.phantoms import generate_case, write_corpus
from medfinder.search import Searcher

DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "model"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """24 demo-size phantoms of a seed no model saw, indexed with the demo model: (manifest, index)."""
    out = tmp_path_factory.mktemp("evidence")
    manifest = write_corpus(24, 4243, out / "corpus", workers=2, progress=False)
    summary = build_index(read_manifest(manifest), out / "index", model=DEMO_MODEL, progress=False)
    assert summary.added == 24
    return manifest, out / "index"


def truth(manifest: Path) -> dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]]:
    """case id -> finding label -> [(box, the saved image's affine)], read as benchmarks/evidence.py reads them."""
    out: dict[str, dict[str, list]] = {}
    for case_id, findings in boxes_of(manifest.parent).items():
        for label, box, affine in findings:
            out.setdefault(case_id, {}).setdefault(label, []).append((box, affine))
    return out


def test_text_evidence_lands_on_the_named_finding_far_more_often_than_a_random_point_in_the_body(corpus) -> None:
    manifest, index = corpus
    boxes = truth(manifest)
    searcher = Searcher.open(index)
    rng = np.random.default_rng(0)
    hits, random_hits = [], []
    # Findings the phantoms give a box; nodules are left out: there are three in 24 cases, all faint
    # (docs/evaluation.md).
    for finding in ("Pleural effusion", "Pneumothorax", "Emphysema", "Pericardial effusion", "Atelectasis",
                    "Hiatal hernia", "Cardiomegaly", "Coronary artery wall calcification",
                    "Arterial wall calcification", "Medical material"):
        for result in searcher.search(text=finding.lower(), k=10, evidence=True):
            where = boxes.get(result.case_id, {}).get(finding)
            if not where:
                continue
            assert result.evidence, f"{result.case_id} has {finding} but no evidence"
            hits.append(any(inside(result.evidence[0].ras_mm, box, affine) for box, affine in where))
            point = baselines(searcher.case_volume(result), rng)["random_in_body"]
            random_hits.append(any(inside(point, box, affine) for box, affine in where))
    assert len(hits) >= 10, "too few results with the finding to judge"
    assert np.mean(hits) >= 0.6 and np.mean(hits) > np.mean(random_hits) + 0.3, (np.mean(hits), np.mean(random_hits))


def test_the_scans_own_look_points_at_its_calcium_its_metal_and_its_heart(corpus) -> None:
    """A calcified coronary or aortic wall, a device and the heart are found from the scan's Hounsfield units
    alone (no report side, no model) inside their true boxes, far more often than a random point in the body;
    a coronary spot is told from an aortic one by where it lies."""
    from medfinder import evidence as ev
    from medfinder.appearance import APPEARANCES, appearance_map
    from medfinder.io import load_volume

    manifest, _ = corpus
    boxes = truth(manifest)
    rng = np.random.default_rng(0)
    hits, random_hits = [], []
    for case in read_manifest(manifest):
        have = sorted(name for name in boxes.get(case.case_id, {})
                      if case.labels.get(name) and APPEARANCES.get(name) not in (None, "nodule", "mass"))
        if not have:
            continue
        volume = load_volume(case.image)
        chest = ev.Chest.of(volume)
        for name in have:
            looks = appearance_map(name, volume, chest)
            point = ev.voxel_world(volume, np.unravel_index(int(looks.argmax()), looks.shape))
            hits.append(any(inside(point, box, affine) for box, affine in boxes[case.case_id][name]))
            random_point = baselines(volume, rng)["random_in_body"]
            random_hits.append(any(inside(random_point, box, affine) for box, affine in boxes[case.case_id][name]))
    assert len(hits) >= 10, "too few findings with a box to judge"
    assert np.mean(hits) >= 0.7 and np.mean(hits) > np.mean(random_hits) + 0.5, (np.mean(hits), np.mean(random_hits))


def test_the_side_or_the_mediastinum_a_report_names_holds_the_finding(corpus) -> None:
    """Where a report puts a finding on one side ("small right pleural effusion") or in the mediastinum
    ("aortic wall calcification"), the region report evidence searches holds the finding's true box, and the
    other side does not: a flipped side would send the viewer to the wrong lung. (The lungs' thirds stand in
    for lobes only roughly, a lingular nodule is "left upper lobe" at mid height, so levels are not held to.)"""
    from medfinder import evidence as ev
    from medfinder.io import load_volume

    manifest, index = corpus
    boxes = truth(manifest)
    stored = Searcher.open(index).index
    checked = {"side": 0, "mediastinum": 0}
    for case in read_manifest(manifest):
        with_boxes = boxes.get(case.case_id, {})
        record = stored.get(case.case_id)
        located = ev.located_findings(record.report, [f for f in record.findings if f["name"] in with_boxes])
        if not located:
            continue
        chest = ev.Chest.of(load_volume(case.image))
        for name, side, level in located:
            if side:
                region = ev.region_mask(chest, side, None)
                other = ev.region_mask(chest, {"right": "left", "left": "right"}[side], None)
            elif level == "mediastinum":
                region, other = ev.region_mask(chest, None, level), np.zeros_like(chest.body)
            else:
                continue
            # A finding may have several boxes (nodes on both sides); the report's words name one of them.
            shares = [(region[cut].mean(), other[cut].mean())
                      for cut in (tuple(slice(lo, hi) for lo, hi in box.astype(int)) for box, _ in with_boxes[name])]
            share, wrong = max(shares)
            assert share >= 0.3 and share > wrong, (case.case_id, name, side, level, shares)
            checked["side" if side else "mediastinum"] += 1
    assert min(checked.values()) >= 5, f"too few placed findings with a box: {checked}"


def test_a_ct_query_resembles_the_findings_it_has_more_than_those_it_lacks(corpus) -> None:
    """The calibrated likeness that orders a CT query's report evidence: scans of an unseen seed score the
    findings they have above the findings they do not."""
    _, index = corpus
    searcher = Searcher.open(index)
    names = ("Pleural effusion", "Cardiomegaly", "Emphysema", "Pericardial effusion", "Hiatal hernia", "Atelectasis")
    present, absent = [], []
    for i in range(8):
        case = generate_case(4244, i)
        vector = searcher.encode_volume(case.volume)
        has = {f.name for f in case.findings}
        for name in names:
            (present if name in has else absent).append(searcher.finding_likeness(vector, name))
    assert present and absent
    assert np.mean(present) > np.mean(absent) + 0.5, (np.mean(present), np.mean(absent))


def test_a_ct_querys_evidence_starts_where_the_report_places_the_finding_the_query_resembles(corpus) -> None:
    _, index = corpus
    searcher = Searcher.open(index)
    query = generate_case(4244, 3).volume
    checked = 0
    for result in searcher.search(image=query, k=8, channels=["image"], evidence=True):
        placed = [e.finding for e in result.evidence if e.source == "report"]
        if not placed:
            continue
        likeness = {name: searcher.finding_likeness(result.query.vector, name) for name in placed}
        assert result.evidence[0].source == "report"
        assert result.evidence[0].finding == max(likeness, key=likeness.__getitem__)
        checked += 1
    assert checked, "no result's report placed a finding"
