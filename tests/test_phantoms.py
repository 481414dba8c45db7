"""The synthetic chest CT generator: anatomy HU, findings where the geometry says, reports, corpus, CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import medfinder.phantoms.render as phantom_render
from medfinder import phantoms as P
from medfinder.cli import main as cli_main

SMALL = (96, 96, 64)
SMALL_SPACING = (4.0, 4.0, 5.0)      # same 384 x 384 x 320 mm field of view as the demo, coarser
REPO = Path(__file__).resolve().parents[1]
T = P.TISSUE_CODES


@lru_cache(maxsize=None)
def small_case(seed: int, index: int) -> P.PhantomCase:
    return P.generate_case(seed, index, SMALL, SMALL_SPACING)


@lru_cache(maxsize=None)
def cases_covering_every_finding(seed: int = 3) -> tuple[P.PhantomCase, ...]:
    """A few cases that, together, show every finding label (chosen from the cheap plans)."""
    missing = set(P.PHANTOM_FINDINGS)
    chosen: list[int] = []
    for index in range(3000):
        labels = P.case_plan(seed, index)[3]
        if labels & missing:
            chosen.append(index)
            missing -= labels
        if not missing:
            break
    assert not missing
    return tuple(small_case(seed, i) for i in chosen)


def test_label_space_is_ct_rate_names() -> None:
    assert len(P.PHANTOM_FINDINGS) == 17 == len(set(P.PHANTOM_FINDINGS))
    for name in ("Medical material", "Arterial wall calcification", "Coronary artery wall calcification",
                 "Interlobular septal thickening", "Lung nodule", "Pleural effusion", "Lung mass", "Pneumothorax"):
        assert name in P.PHANTOM_FINDINGS
    case = small_case(1, 0)
    assert set(case.labels) == set(P.PHANTOM_FINDINGS)
    assert {f.name for f in case.findings} == {k for k, v in case.labels.items() if v}


def test_same_seed_same_case_and_different_index_differs() -> None:
    a = P.generate_case(21, 4, SMALL, SMALL_SPACING)
    b = P.generate_case(21, 4, SMALL, SMALL_SPACING)
    assert np.array_equal(a.volume.hu, b.volume.hu)
    assert a.report == b.report and a.labels == b.labels and (a.sex, a.age) == (b.sex, b.age)
    c = P.generate_case(21, 5, SMALL, SMALL_SPACING)
    assert c.case_id == "phantom-21-00005" and not np.array_equal(a.volume.hu, c.volume.hu)


def test_volume_is_ras_hu_with_true_geometry() -> None:
    case = small_case(1, 0)
    v = case.volume
    assert v.hu.dtype == np.int16 and v.hu.shape == SMALL
    assert v.spacing == SMALL_SPACING
    assert np.allclose(np.diag(v.affine)[:3], SMALL_SPACING)
    assert v.metadata["modality"] == "CT" and v.metadata["synthetic"] is True
    # RAS: the liver (right upper abdomen) lies at higher x than the stomach; the sternum is anterior (high y)
    # of the spine; the lung apices are superior (high z) of the liver.
    organ = np.argwhere(case.tissue == T["organ"])
    liver_x = np.median(organ[organ[:, 2] < SMALL[2] * 0.3][:, 0])
    gut_air = np.argwhere(case.tissue == T["gut_air"])
    assert liver_x > SMALL[0] / 2 > np.median(gut_air[:, 0])
    lung = np.argwhere(case.tissue == T["lung"])
    liver = organ[(organ[:, 2] < SMALL[2] // 2) & (organ[:, 0] > SMALL[0] // 2)]
    assert lung[:, 2].max() > liver[:, 2].max() + 10
    bone = np.argwhere(case.tissue == T["cortical_bone"])
    spine = bone[np.abs(bone[:, 0] - SMALL[0] / 2) < 3]
    assert np.percentile(spine[:, 1], 10) < np.median(lung[:, 1])   # the spine is posterior (low y)


def test_tissue_hu_ranges() -> None:
    case = small_case(11, 1)
    hu, tissue = case.volume.hu, case.tissue

    def core(name: str) -> np.ndarray:
        mask = ndimage.binary_erosion(tissue == T[name])
        return hu[mask]

    assert np.median(core("air")) < -950
    assert -125 < np.median(core("fat")) < -70
    assert 25 < np.median(core("muscle")) < 65
    assert -900 < np.median(core("lung")) < -780
    assert np.median(core("gut_air")) < -900
    blood = np.median(core("blood"))
    assert (150 < blood < 320) if case.contrast else (20 < blood < 65)
    # Bone needs finer voxels to be seen without partial volume.
    fine = P.generate_case(11, 1, (192, 192, 24), (1.2, 1.2, 1.5))
    cortex = fine.volume.hu[fine.tissue == T["cortical_bone"]]
    marrow = fine.volume.hu[fine.tissue == T["marrow"]]
    assert np.median(cortex) > 500 and np.percentile(cortex, 95) > 700
    assert 150 < np.median(marrow) < 450


def test_scanner_noise_and_blur_are_present() -> None:
    case = small_case(11, 1)
    air = case.volume.hu[ndimage.binary_erosion(case.tissue == T["air"], iterations=3)]
    air = air[air > -1020]  # away from the -1024 clip
    assert 3 < air.std() < 40
    # Partial volume: edges between fat and lung take intermediate values, not just two levels.
    lung_edge = ndimage.binary_dilation(case.tissue == T["lung"]) & (case.tissue != T["lung"])
    assert np.mean((case.volume.hu[lung_edge] > -700) & (case.volume.hu[lung_edge] < -200)) > 0.15


HIGHER = {"Lung nodule", "Lung mass", "Consolidation", "Atelectasis", "Lung opacity", "Interlobular septal thickening",
          "Pleural effusion", "Lymphadenopathy", "Arterial wall calcification", "Coronary artery wall calcification",
          "Medical material", "Cardiomegaly", "Pericardial effusion"}
LOWER = {"Emphysema", "Pneumothorax"}


LUNG_TISSUE = [T["lung"], T["lung_vessel"], T["ground_glass"], T["low_attenuation"]]
IN_LUNG = HIGHER - {"Lymphadenopathy", "Arterial wall calcification", "Coronary artery wall calcification",
                    "Medical material", "Cardiomegaly", "Pericardial effusion"} | LOWER


def _contrast(case: P.PhantomCase, f: P.PhantomFinding) -> float:
    """Mean HU inside the finding minus the mean of a 2-voxel shell around it (the lung, for lung findings)."""
    mask = f.mask()
    shell = ndimage.binary_dilation(mask, iterations=2) & ~mask & (case.tissue != T["air"])
    if f.name in IN_LUNG and (shell & np.isin(case.tissue, LUNG_TISSUE)).sum() > 5:
        shell &= np.isin(case.tissue, LUNG_TISSUE)
    return float(case.volume.hu[mask].mean() - case.volume.hu[shell].mean())


def test_every_finding_is_visible_where_its_geometry_says() -> None:
    seen = set()
    for case in cases_covering_every_finding():
        hu = case.volume.hu
        lung = np.argwhere(case.tissue == T["lung"])
        lung_centre = lung.mean(axis=0)
        for f in case.findings:
            seen.add(f.name)
            mask = f.mask()
            assert mask.any(), f.name
            (x0, x1), (y0, y1), (z0, z1) = f.bbox
            assert mask[x0:x1, y0:y1, z0:z1].sum() == mask.sum()
            centroid = np.argwhere(mask).mean(axis=0)
            if f.name in HIGHER:
                assert _contrast(case, f) > 60, (case.case_id, f.name, _contrast(case, f))
            elif f.name in LOWER:
                assert _contrast(case, f) < -40, (case.case_id, f.name, _contrast(case, f))
            elif f.name == "Bronchiectasis":   # air-filled lumen inside a soft-tissue wall
                assert (hu[mask] < -700).any() and (hu[mask] > -300).any()
                assert f.size_mm >= 6.8
            elif f.name == "Hiatal hernia":    # stomach with gas above the diaphragm
                assert (hu[mask] < -400).any() and (hu[mask] > -100).any()
            if f.side in ("right", "left"):
                right_of_midline = centroid[0] > SMALL[0] / 2
                assert right_of_midline == (f.side == "right"), (case.case_id, f.name, f.side)
            if f.name == "Pleural effusion":       # dependent: behind the lung's centre (RAS y grows anterior)
                assert centroid[1] < lung_centre[1]
                core = ndimage.binary_erosion(mask)
                fluid = hu[core] if core.sum() >= 20 else hu[mask]
                assert -40 < np.median(fluid) < 40, np.median(fluid)   # water, not lung or soft tissue
            if f.name == "Pneumothorax":           # non-dependent
                assert centroid[1] > lung_centre[1]
            if f.name in ("Lung nodule", "Lung mass"):
                assert mask[tuple(f.center_vox)], (case.case_id, f.name)
                assert f.size_mm >= 6 and f.lobe in P.LOBES
            if f.name == "Medical material":
                assert hu[mask].max() > 800   # wires a millimetre thick, averaged into 4 mm voxels
    assert seen == set(P.PHANTOM_FINDINGS)


def _heart_to_chest_ratio(case: P.PhantomCase) -> float:
    heart = np.isin(case.tissue, [T["myocardium"], T["blood"]]) & ndimage.binary_erosion(
        np.isin(case.tissue, [T["myocardium"], T["blood"]]), iterations=1)
    z = int(np.argmax((case.tissue == T["myocardium"]).sum(axis=(0, 1))))
    lab, n = ndimage.label(heart[:, :, z])
    biggest = lab == (1 + int(np.argmax(ndimage.sum(np.ones_like(lab), lab, range(1, n + 1)))))
    xs = np.nonzero(biggest.any(axis=1))[0]
    chest = np.nonzero(np.isin(case.tissue[:, :, z], [T["lung"], T["lung_vessel"], T["fluid"]]).any(axis=1))[0]
    return (xs.max() - xs.min() + 1) / (chest.max() - chest.min() + 1)


def test_cardiomegaly_means_a_larger_heart() -> None:
    big = [i for i in range(400) if "Cardiomegaly" in P.case_plan(5, i)[3]][:2]
    normal = [i for i in range(400) if not P.case_plan(5, i)[3]][:2]
    big_ratio = [_heart_to_chest_ratio(small_case(5, i)) for i in big]
    normal_ratio = [_heart_to_chest_ratio(small_case(5, i)) for i in normal]
    assert min(big_ratio) > max(normal_ratio) + 0.05, (big_ratio, normal_ratio)


KEYWORDS = {
    "Medical material": ("pacemaker", "port catheter", "sternotomy"),
    "Arterial wall calcification": ("aort",),
    "Cardiomegaly": ("cardiomegaly", "heart is enlarged", "enlarged cardiac", "cardiac size is increased"),
    "Pericardial effusion": ("pericardial effusion",),
    "Coronary artery wall calcification": ("coronary",),
    "Hiatal hernia": ("hernia",),
    "Lymphadenopathy": ("lymph",),
    "Emphysema": ("emphysema",),
    "Atelectasis": ("atelecta", "volume loss"),
    "Lung nodule": ("nodul",),
    "Lung opacity": ("ground-glass",),
    "Pleural effusion": ("pleural effusion",),
    "Consolidation": ("consolidation",),
    "Bronchiectasis": ("bronchiecta",),
    "Interlobular septal thickening": ("interlobular septa",),
    "Pneumothorax": ("pneumothorax",),
    "Lung mass": (" mass",),
}


def _findings_sentences(report: str) -> list[str]:
    body = report.split("FINDINGS:")[1].split("IMPRESSION:")[0]
    return [s.strip() for s in re.split(r"(?<=\.)\s+", body) if s.strip()]


def test_reports_state_present_findings_and_negate_absent_ones() -> None:
    negations_seen = 0
    for case in cases_covering_every_finding() + tuple(small_case(8, i) for i in range(4)):
        report = case.report
        assert "TECHNIQUE:" in report and "FINDINGS:" in report and "IMPRESSION:" in report
        assert f"{case.age}-year-old" in report
        sentences = _findings_sentences(report)
        for name, present in case.labels.items():
            negs = [s for s in sentences if any(s.endswith(n) for n in P.NEGATIONS[name])]
            if present:
                assert not negs, (case.case_id, name, negs)
                stated = [s for s in sentences if any(k in s.lower() for k in KEYWORDS[name])
                          and not s.lower().startswith("no ")]
                assert stated, (case.case_id, name, report)
            negations_seen += len(negs)
        for f in case.findings:
            if f.name in ("Lung nodule", "Lung mass", "Pleural effusion", "Pneumothorax"):
                assert f"{int(f.size_mm)}" in report, (case.case_id, f.name, f.size_mm)
            if f.side in ("right", "left") and f.name != "Medical material":
                assert f.side in report.lower()
            if f.name in ("Lung nodule", "Lung mass", "Consolidation", "Bronchiectasis") and not f.detail.get("lingula"):
                side, level = f.lobe.split()[:2]
                assert re.search(f"{side}.*{level} lobe|{level} lobe of the {side}", report), (case.case_id, f.lobe)
        if not any(case.labels.values()):
            assert re.search("normal|no acute", report.split("IMPRESSION:")[1], re.I)
    assert negations_seen > 20


def test_reports_vary_their_wording() -> None:
    negs = {s for i in range(8) for s in _findings_sentences(small_case(8, i).report)
            if any(s.endswith(n) for n in P.NEGATIONS["Pleural effusion"])}
    assert len(negs) >= 2


def test_co_occurrence_is_realistic() -> None:
    plans = [P.case_plan(99, i) for i in range(1500)]
    normal = np.mean([not p[3] for p in plans])
    assert 0.22 < normal < 0.45
    old = [bool(p[3]) and "Arterial wall calcification" in p[3] for p in plans if p[1] >= 70]
    young = [bool(p[3]) and "Arterial wall calcification" in p[3] for p in plans if p[1] < 45]
    assert np.mean(old) > 3 * np.mean(young)
    for name in P.PHANTOM_FINDINGS:
        assert np.mean([name in p[3] for p in plans]) > 0.02, name
    eff = [p for p in plans if "Pleural effusion" in p[3]]
    assert np.mean(["Atelectasis" in p[3] for p in eff]) > np.mean(["Atelectasis" in p[3] for p in plans])


def test_slabs_paint_the_same_volume_as_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = P.generate_case(4, 2, (64, 64, 40), (6.0, 6.0, 8.0))
    monkeypatch.setattr(phantom_render, "_SLAB_VOXELS", 64 * 64 * 9)
    slabbed = P.generate_case(4, 2, (64, 64, 40), (6.0, 6.0, 8.0))
    assert np.array_equal(whole.volume.hu, slabbed.volume.hu)
    assert np.array_equal(whole.tissue, slabbed.tissue)


def test_write_corpus_manifest_and_images_do_not_depend_on_workers(tmp_path: Path) -> None:
    one = P.write_corpus(3, 6, tmp_path / "one", SMALL, SMALL_SPACING, workers=1, progress=False)
    two = P.write_corpus(3, 6, tmp_path / "two", SMALL, SMALL_SPACING, workers=2, progress=False)
    assert one.read_text() == two.read_text()
    with open(one, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["case_id", "image", "report", *P.PHANTOM_FINDINGS, "sex", "age"]
    assert len(rows) == 4
    for row in rows[1:]:
        case = small_case(6, int(row[0].rsplit("-", 1)[1]))
        assert row[0] == case.case_id and row[2] == case.report
        assert [int(v) for v in row[3:20]] == [case.labels[n] for n in P.PHANTOM_FINDINGS]
        assert row[20] in ("F", "M") and row[21] == str(case.age)
        for folder in ("one", "two"):
            img = nib.load(tmp_path / folder / row[1])
            data = np.asanyarray(img.dataobj)
            assert data.dtype == np.int16 and np.array_equal(data, case.volume.hu)
            assert np.allclose(img.affine, case.volume.affine)


def test_cli_rejects_bad_arguments_with_one_sentence(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv in (["--n", "0", "--out", str(tmp_path / "a")], ["--n", "2", "--out", str(tmp_path / "b"), "--shape", "8", "8", "8"],
                 ["--n", "2", "--out", str(tmp_path / "c"), "--spacing", "0", "1", "1"], ["--n", "2"],
                 ["--n", "two", "--out", str(tmp_path / "d")], ["--n", "1", "--out", str(tmp_path / "e"), "--workers", "0"]):
        with pytest.raises(SystemExit) as exc:
            raise SystemExit(cli_main(argv, command="phantoms"))
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (argv, err)
    file = tmp_path / "file"
    file.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "medfinder.phantoms", "--n", "1", "--out", str(file)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(file) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: ")


def test_a_phantom_path_paints_the_same_case_again() -> None:
    path = P.phantom_path(7, 3)
    assert str(path) == "phantom:7:3" and P.is_phantom_path(path)
    expected = P.generate_case(7, 3).volume.hu
    np.testing.assert_array_equal(P.phantom_volume(path).hu, expected)
    # as read_manifest gives it back, behind the manifest's folder
    np.testing.assert_array_equal(P.phantom_volume(Path("/corpus") / str(path)).hu, expected)
    for bad in ("scan:7:3", "phantom:7", "phantom:seven:3", "phantom:7:-3", "phantom:-7:3", "phantom:7:3:1"):
        assert not P.is_phantom_path(bad)
        with pytest.raises(P.PhantomError, match="not a phantom path"):
            P.phantom_volume(Path(bad))


# ---- ground truth: findings.jsonl ------------------------------------------------------------
#: Seed 52's first four small cases: bilateral pleural effusions (case 0) and a pneumothorax (case 3).
TRUTH_SEED = 52


def _box_slices(box: list[list[int]]) -> tuple[slice, slice, slice]:
    return tuple(slice(lo, hi) for lo, hi in box)  # type: ignore[return-value]


def _assert_tight(box: list[list[int]], mask: np.ndarray) -> None:
    """Every voxel of ``mask`` lies in the half-open ``box``, and each of the box's six faces touches it."""
    assert all(0 <= lo < hi <= n for (lo, hi), n in zip(box, mask.shape)), box
    inside = mask[_box_slices(box)]
    assert inside.sum() == mask.sum() > 0
    for axis in range(3):
        assert np.take(inside, 0, axis=axis).any() and np.take(inside, -1, axis=axis).any(), (box, axis)


def test_a_findings_box_is_the_tight_box_of_its_visible_mask() -> None:
    for case in cases_covering_every_finding():
        record = P.findings_record(case)
        assert record["case_id"] == case.case_id
        assert [e["label"] for e in record["findings"]] == [f.name for f in case.findings]   # one entry each
        for entry, f in zip(record["findings"], case.findings):
            _assert_tight(entry["box"], f.mask())
            # within the box the finding was painted in, which has a voxel of margin
            assert all(p0 <= lo < hi <= p1 for (lo, hi), (p0, p1) in zip(entry["box"], f.bbox))
            assert [list(r) for r in f.mask_bbox()] == entry["box"]


def test_a_finding_with_nothing_visible_gets_no_box() -> None:
    def nodule() -> P.PhantomFinding:
        return P.PhantomFinding("Lung nodule", (5, 5, 5), (0.0, 0.0, 0.0), 8.0, bbox=((2, 6), (3, 7), (4, 8)),
                                mask_crop=np.zeros((4, 4, 4), bool), volume_shape=(10, 10, 10))

    hidden, shown = nodule(), nodule()
    shown.mask_crop[1:3, 2, 3] = True
    assert hidden.mask_bbox() is None and shown.mask_bbox() == ((3, 5), (5, 6), (7, 8))
    case = P.PhantomCase("c", None, "", {}, [hidden, shown], "F", 50, False,  # type: ignore[arg-type]
                         np.zeros((10, 10, 10), np.uint8))
    assert P.findings_record(case) == {"case_id": "c",
                                       "findings": [{"label": "Lung nodule", "box": [[3, 5], [5, 6], [7, 8]]}]}


@pytest.fixture(scope="module")
def truth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seed 52's first four small cases, written by two workers; returns the manifest."""
    return P.write_corpus(4, TRUTH_SEED, tmp_path_factory.mktemp("truth"), SMALL, SMALL_SPACING, workers=2,
                          progress=False)


def test_findings_jsonl_follows_the_manifest_and_indexes_the_saved_images(truth_corpus: Path) -> None:
    lines = (truth_corpus.parent / P.FINDINGS_FILE).read_text(encoding="utf-8").splitlines()
    with open(truth_corpus, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(lines) == len(rows) == 4
    effusions = []
    for line, row in zip(lines, rows):
        record = json.loads(line)
        assert set(record) == {"case_id", "findings"} and record["case_id"] == row["case_id"]   # manifest order
        labels = [e["label"] for e in record["findings"]]
        assert set(labels) <= set(P.PHANTOM_FINDINGS)                  # the manifest's label columns
        assert set(labels) == {n for n in P.PHANTOM_FINDINGS if row[n] == "1"}
        case = small_case(TRUTH_SEED, int(row["case_id"].rsplit("-", 1)[1]))
        assert record == P.findings_record(case)
        image = np.asanyarray(nib.load(truth_corpus.parent / row["image"]).dataobj)
        assert image.shape == case.volume.hu.shape
        lung_hu = np.median(image[case.tissue == T["lung"]])
        for entry, f in zip(record["findings"], case.findings):
            assert entry["label"] == f.name
            mask = f.mask()
            _assert_tight(entry["box"], mask)
            box = _box_slices(entry["box"])
            shown = image[box][mask[box]]               # the finding's voxels, read from the saved image
            if f.name == "Pleural effusion":            # water
                assert -40 < np.median(shown) < 40, np.median(shown)
                assert np.mean((shown >= -50) & (shown <= 80)) > 0.45
                fluid = image[box][case.tissue[box] == T["fluid"]]
                effusions.append((row["case_id"], fluid.size, np.mean((fluid >= -50) & (fluid <= 80))))
            if f.name == "Pneumothorax":                # air in the pleural space, darker than the lung
                assert np.median(shown) < min(-900, lung_hu), (np.median(shown), lung_hu)
    assert [e[0] for e in effusions] == ["phantom-52-00000"] * 2   # bilateral: two boxes with one label
    assert max(effusions, key=lambda e: e[1])[2] > 0.75
    assert "Pneumothorax" in lines[3]


def test_findings_jsonl_does_not_depend_on_workers_and_is_written_whole(truth_corpus: Path, tmp_path: Path) -> None:
    P.write_corpus(4, TRUTH_SEED, tmp_path / "one", SMALL, SMALL_SPACING, workers=1, progress=False)
    two = (truth_corpus.parent / P.FINDINGS_FILE).read_bytes()
    assert two == (tmp_path / "one" / P.FINDINGS_FILE).read_bytes()
    assert two.endswith(b"\n") and two.count(b"\n") == 4
    for folder in (tmp_path / "one", truth_corpus.parent):   # no temporary file left behind
        assert sorted(p.name for p in folder.iterdir()) == ["findings.jsonl", "images", "manifest.csv"]


def test_cli_writes_findings_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "medfinder.phantoms", "--n", "2", "--seed", "3", "--out", str(out),
                           "--shape", *map(str, SMALL), "--spacing", *map(str, SMALL_SPACING), "--workers", "2"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out / "manifest.csv")
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr
    lines = (out / P.FINDINGS_FILE).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [P.findings_record(small_case(3, i)) for i in range(2)]


# ---- golden values: the package split (and any refactor) must paint the same cases --------------
#: sha256 of ``hu.tobytes()`` and of the report of two demo-size cases with many findings, computed with
#: the single-file generator before it became a package. A change here is a change of the corpus.
#: Case 51's volume has two recorded digests: the machines it was recorded on, and an AMD EPYC without
#: AVX-512 (stop 37), with the same code and the same numpy and scipy (2.4.5-2.4.6 and 2.3.5; 1.16.3-1.17.1
#: all give the second). Some float64 kernel rounds differently on the two CPUs and moves a voxel's rounded HU;
#: a change of the painter gives neither.
GOLDEN = {
    (0, 38): ({"fd4d1d4b1a120fc59d006ce69595589bed081e8550cc32d03a8e8c0a875c0902"},
              "7f4ebd0156f52233ab3db4554a9cf17132fa677acfff714c278c4312446c1042",
              "CLINICAL INFORMATION: 69-year-old female, fever and productive cough."),
    (0, 51): ({"419509f5359640c238e0e42fa47ab96e02cc8a920f141a7d172b1638ab8c9f00",
               "17b35bacadcf86649dd4a7ba13d00e0c3f9d46f0df8c0eebcbd7a8b3d06900e7"},
              "b2adaab128aeb1262ad5f6c57d9d7edda181cfa34387582c10b5011354b5d81d",
              "History: 73-year-old male, orthopnoea."),
}


@pytest.mark.parametrize("seed,index", sorted(GOLDEN))
def test_golden_cases_are_painted_and_reported_exactly_as_before(seed: int, index: int) -> None:
    hu_shas, report_sha, first_line = GOLDEN[(seed, index)]
    case = P.generate_case(seed, index)
    assert case.volume.hu.shape == P.DEMO_SHAPE
    assert case.report.splitlines()[0] == first_line
    assert hashlib.sha256(case.report.encode("utf-8")).hexdigest() == report_sha
    assert hashlib.sha256(case.volume.hu.tobytes()).hexdigest() in hu_shas
