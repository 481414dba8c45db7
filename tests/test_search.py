"""The Searcher: fusion, channels, filters, highlights, and index_build's resumable build."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from medfinder.errors import CaseIndexError, MedFinderError
from medfinder.search import ChannelHit, Searcher, SearchFilters, fuse_rankings


# ------------------------------------------------------------------ fusion on hand-built rankings
def test_rrf_prefers_cases_several_channels_agree_on():
    rankings = {
        "keyword": [("a", 9.0), ("b", 5.0)],
        "image": [("c", 0.9), ("a", 0.8), ("b", 0.7)],
        "text": [("b", 0.6), ("a", 0.5)],
    }
    fused = fuse_rankings(rankings, {"keyword": 1.0, "image": 1.0, "text": 1.0})
    assert [c for c, _, _ in fused] == ["a", "b", "c"]
    a_hits = fused[0][2]
    assert a_hits["keyword"] == ChannelHit(9.0, 1) and a_hits["image"].rank == 2
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62 + 1 / 62)


def test_weights_change_the_order():
    rankings = {"keyword": [("a", 1.0)], "image": [("b", 0.9)]}
    assert fuse_rankings(rankings, {"keyword": 1.0, "image": 2.0})[0][0] == "b"
    assert fuse_rankings(rankings, {"keyword": 2.0, "image": 1.0})[0][0] == "a"


def test_weighted_sum_fusion_and_unknown_method():
    rankings = {"image": [("a", 0.9), ("b", 0.5), ("c", 0.1)], "text": [("c", 0.9), ("b", 0.8), ("a", 0.1)]}
    order = [c for c, _, _ in fuse_rankings(rankings, {"image": 1.0, "text": 1.0}, method="weighted")]
    assert order[0] == "b"  # 0.5 + 0.875 beats a (1.0 + 0) and c (0 + 1.0)
    with pytest.raises(ValueError, match="Unknown fusion"):
        fuse_rankings(rankings, method="magic")


def test_filters():
    from medfinder.index import StoredCase

    record = StoredCase(case_id="x", label=0, report="", source="", shape=None, spacing=None, channels=(),
                        findings=[{"name": "Pleural effusion", "status": "affirmed"},
                                  {"name": "Cardiomegaly", "status": "negated"}],
                        metadata={"sex": "F", "age": 71})
    assert SearchFilters(include_findings=("Pleural effusion",)).accepts(record)
    assert not SearchFilters(include_findings=("Cardiomegaly",)).accepts(record)  # negated is not present
    assert not SearchFilters(exclude_findings=("Pleural effusion",)).accepts(record)
    assert SearchFilters(sex="F", age_min=70, age_max=80).accepts(record)
    assert not SearchFilters(sex="M").accepts(record)
    assert not SearchFilters(age_max=60).accepts(record)


# ------------------------------------------------------------------ end to end on a tiny index
@pytest.fixture(scope="module")
def searcher(tiny_index, tiny_model_dir):
    return Searcher.open(tiny_index, tiny_model_dir)


def _labels(manifest: Path) -> dict[str, dict[str, str]]:
    with manifest.open() as fh:
        return {row["case_id"]: row for row in csv.DictReader(fh)}


def test_text_search_finds_reports_that_affirm_the_finding(searcher, tiny_corpus):
    rows = _labels(tiny_corpus)
    finding = max(("Pleural effusion", "Lung nodule", "Cardiomegaly", "Emphysema", "Atelectasis"),
                  key=lambda f: sum(r[f] == "1" for r in rows.values()))
    positives = {c for c, r in rows.items() if r[finding] == "1"}
    assert positives, "the tiny corpus should contain the finding"
    results = searcher.search(text=finding.lower(), k=len(positives), channels=["keyword"])
    assert {r.case_id for r in results} == positives
    for r in results:
        assert r.channels["keyword"].rank == r.rank
        assert any(label == "match" for _, label in r.highlights)
        assert "".join(text for text, _ in r.highlights) == r.report
        assert r.thumbnail_png and r.thumbnail_png[:4] == b"\x89PNG"


def test_fused_text_search_ranks_every_case_and_carries_channel_scores(searcher):
    results = searcher.search(text="pleural effusion", k=12)
    assert len(results) == 12 and [r.rank for r in results] == list(range(1, 13))
    assert all(results[i].score >= results[i + 1].score for i in range(11))
    assert all(set(r.channels) <= {"keyword", "text", "image"} for r in results)
    assert any("image" in r.channels for r in results)


def test_exclusion_in_query_and_filters(searcher, tiny_corpus):
    rows = _labels(tiny_corpus)
    with_effusion = {c for c, r in rows.items() if r["Pleural effusion"] == "1"}
    results = searcher.search(text="lung without pleural effusion", k=12)
    assert not {r.case_id for r in results} & with_effusion
    results = searcher.search(text="lung", k=12, filters=SearchFilters(include_findings=("Pleural effusion",)))
    assert {r.case_id for r in results} <= with_effusion



def test_filter_names_are_resolved_or_refused(searcher, tiny_index, capsys):
    from medfinder.cli import main
    from medfinder.cli.support import run_guarded

    exact = searcher.search(text="heart", k=12, filters=SearchFilters(include_findings=("Pleural effusion",)))
    assert exact  # the tiny corpus has effusions
    for typed in ("pleural effusion", "PLEURAL EFFUSION", "pleural effusions", " Effusion "):
        typed_results = searcher.search(text="heart", k=12, filters=SearchFilters(include_findings=(typed,)))
        assert [r.case_id for r in typed_results] == [r.case_id for r in exact]
    # An unknown name used to match nothing, silently: an empty list read as "no such case".
    for refused in ("banana", "reflux", "right pleural effusion", "history of pneumothorax", "no effusion"):
        # a symptom or a qualified phrase would filter on something other than what was typed
        with pytest.raises(MedFinderError, match=f"'{refused}' is not a finding name"):
            searcher.search(text="heart", filters=SearchFilters(exclude_findings=(refused,)))
    with pytest.raises(SystemExit) as exit_info:
        run_guarded(lambda: main(["search", "--index", str(tiny_index), "--text", "heart", "--include", "banana"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "'banana' is not a finding name" in err[0]


def test_filtered_pages_are_the_filtered_full_ranking(searcher):
    """Records are read a chunk at a time; every page must still be the full ranking, filtered."""
    everything = searcher.search(text="pleural effusion", k=1000)
    females = [r.case_id for r in everything if str(r.metadata.get("sex", "")).upper().startswith("F")]
    assert 2 <= len(females) < len(everything)
    only_f = SearchFilters(sex="F")
    paged = [r.case_id for offset in range(0, len(females), 2)
             for r in searcher.search(text="pleural effusion", k=2, offset=offset, filters=only_f)]
    assert paged == females
    assert searcher.search(text="pleural effusion", k=2, offset=len(females), filters=only_f) == []

def test_image_search_returns_the_query_case_first(searcher, tiny_corpus):
    first = next(iter(_labels(tiny_corpus).values()))
    image = tiny_corpus.parent / first["image"]
    results = searcher.search(image=image, k=3, channels=["image"])
    assert results[0].case_id == first["case_id"]
    assert results[0].channels["image"].score == pytest.approx(1.0, abs=1e-3)
    both = searcher.search(image=image, k=5)
    assert all(set(r.channels) <= {"image", "report"} for r in both)


def test_bad_queries(searcher, tmp_path):
    with pytest.raises(MedFinderError, match="either a text query or an image"):
        searcher.search()
    with pytest.raises(MedFinderError, match="does not apply"):
        searcher.search(text="effusion", channels=["report"])
    (tmp_path / "junk.nii.gz").write_text("not an image")
    with pytest.raises(MedFinderError, match="junk.nii.gz"):
        searcher.search(image=tmp_path / "junk.nii.gz")


def test_other_model_is_refused(tiny_index, tmp_path):
    import torch

    from medfinder.model import create_model_and_transforms

    torch.manual_seed(1)
    other, _ = create_model_and_transforms("medfinder-tiny")
    with pytest.raises(CaseIndexError, match="fingerprint"):
        Searcher.open(tiny_index, other.save_pretrained(tmp_path / "other"))


def test_a_moved_index_says_which_model_to_pass(tiny_index, tiny_model_dir, tmp_path, monkeypatch, capsys):
    import json

    from medfinder.cli import main
    from medfinder.cli.support import run_guarded

    moved = tmp_path / "moved_index"
    shutil.copytree(tiny_index, moved)
    info = json.loads((moved / "index.json").read_text())
    info["model"]["id"] = str(tmp_path / "elsewhere" / "model")  # the folder it was built with is gone
    (moved / "index.json").write_text(json.dumps(info))

    # One sentence naming the missing folder, CLI exit 2; the demo model is never taken in its place.
    monkeypatch.setattr("medfinder.demo.DEMO_MODEL_DIR", tiny_model_dir)
    with pytest.raises(MedFinderError, match=r"elsewhere/model that built the case index .* does not exist here"):
        Searcher.open(moved)
    with pytest.raises(SystemExit) as exit_info:
        run_guarded(lambda: main(["search", "--index", str(moved), "--text", "pleural effusion"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "(--model)" in err[0]

    # Given the model, the moved index is searched.
    assert Searcher.open(moved, tiny_model_dir).search(text="pleural effusion", k=3)


# ------------------------------------------------------------------ index_build
def test_build_resumes_after_failure_and_skips_done_cases(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    from medfinder.index import build as build_module
    from medfinder.index import CaseIndex
    from medfinder.io.manifests import read_manifest

    records = read_manifest(tiny_corpus)
    out = tmp_path / "index"
    calls = {"n": 0}
    real_add = CaseIndex.add

    def failing_add(self, entries):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash half-way through the build")
        return real_add(self, entries)

    monkeypatch.setattr(CaseIndex, "add", failing_add)
    with pytest.raises(RuntimeError):
        build_module.build_index(records, out, model=tiny_model_dir, batch_size=4, commit_every_s=0.0,
                                 progress=False)
    monkeypatch.setattr(CaseIndex, "add", real_add)
    with CaseIndex.open(out) as index:
        assert len(index) == 4  # the first batch was committed before the crash
    summary = build_module.build_index(records, out, model=tiny_model_dir, batch_size=4, progress=False)
    assert summary.skipped_done == 4 and summary.added == 8
    with CaseIndex.open(out) as index:
        assert index.case_ids() == {r.case_id for r in records}


def test_build_keeps_extra_columns_and_finds_scans_from_any_folder(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    from medfinder.index import CaseIndex
    from medfinder.index.build import build_index
    from medfinder.io.manifests import read_manifest

    first = next(iter(_labels(tiny_corpus).values()))
    (tmp_path / "images").mkdir()
    shutil.copy(tiny_corpus.parent / first["image"], tmp_path / "images" / "a.nii.gz")
    (tmp_path / "manifest.csv").write_text(
        "case_id,image,report,sex,age,site,scanner,patient_name,Patient ID,dob,initials,hospital_number,"
        "dicom_path,postcode,nhs_number,subject_id,notes\n"
        "a,images/a.nii.gz,Right pleural effusion.,F,64,north,CT-7,Jane Doe,H123456,1950-02-03,JD,0042,"
        "/pacs/DOE^JANE/CT1,AB1 2CD,9434765919,S-17,seen by Dr Fake\n")
    monkeypatch.chdir(tmp_path)
    build_index(read_manifest(Path("manifest.csv")), tmp_path / "idx", model=tiny_model_dir, progress=False)
    monkeypatch.chdir(tmp_path.parent)  # the app runs elsewhere
    with CaseIndex.open(tmp_path / "idx") as index:
        case = index.get("a")
    assert Path(case.source).is_absolute() and Path(case.source).exists()
    assert case.metadata == {"sex": "F", "age": 64, "site": "north", "scanner": "CT-7"}  # identifying columns are never stored


def test_build_logs_and_counts_broken_cases(tiny_model_dir, tiny_corpus, tmp_path):
    from medfinder.index.build import build_index
    from medfinder.io.manifests import ManifestCase

    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    records = [
        ManifestCase("ok", tiny_corpus.parent / next(iter(_labels(tiny_corpus).values()))["image"], "No effusion."),
        ManifestCase("broken", tmp_path / "broken.nii.gz", "Right pleural effusion."),
        ManifestCase("missing", tmp_path / "absent.nii.gz", ""),
        ManifestCase("report-only", None, "Small left pleural effusion."),
    ]
    summary = build_index(records, tmp_path / "idx", model=tiny_model_dir, progress=False)
    assert summary.added == 2 and set(summary.failed) == {"broken", "missing"}
    assert "broken.nii.gz" in summary.failed["broken"]


def test_an_index_stores_each_scan_with_its_models_test_time_views(tiny_model_dir, tiny_corpus, tmp_path):
    """index_build stores the views-averaged vector; a query scan is encoded without views."""
    import torch

    from medfinder.index.build import build_index
    from medfinder.io.load import load_volume
    from medfinder.io.manifests import read_manifest
    from medfinder.model import MedFinder

    tiny = MedFinder.from_pretrained(tiny_model_dir)
    config = dict(tiny.config.to_dict(), test_time_augmentation={"views": 3, "seed": 1})
    model = MedFinder(config)
    model.load_state_dict(tiny.state_dict())
    model_dir = model.eval().save_pretrained(tmp_path / "model")
    records = read_manifest(tiny_corpus)[:6]
    build_index(records, tmp_path / "idx", model=model_dir, progress=False)
    searcher = Searcher.open(tmp_path / "idx", model_dir)
    x = searcher.preprocessor(load_volume(records[4].image)).unsqueeze(0)
    stored = model.encode_image(x, test_time_augmentation=True)[0].numpy()
    query = searcher.encode_volume(load_volume(records[4].image))
    assert np.allclose(query, model.encode_image(x)[0].numpy(), atol=1e-5)  # queries: no views, fast
    best_id, best_score = searcher.index.query("image", stored, 1)[0]
    assert best_id == records[4].case_id and best_score == pytest.approx(1.0, abs=1e-4)
    assert float(torch.from_numpy(query) @ torch.from_numpy(stored)) < 1.0 - 1e-4  # the stored vector is the averaged one
