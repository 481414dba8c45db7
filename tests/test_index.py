"""The case index and its vector backends: round trips, updates, integrity and crash safety."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import file_size_limit

from medfinder.errors import CaseIndexError
from medfinder.index import CaseEntry, CaseIndex
from medfinder.index.hnsw import HnswIndex, ef_for_size
from medfinder.index.vectors import ExactIndex

REPO = Path(__file__).resolve().parents[1]
DIMS = {"image": 16, "report": 16, "report_text": 24}
FINGERPRINT = "0123456789abcdef"


def clustered(n: int, dim: int, seed: int, clusters: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    points = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def entries(n: int, seed: int = 0, start: int = 0) -> list[CaseEntry]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(start, start + n):
        side = "Right" if i % 2 else "Left"
        cases.append(CaseEntry(
            case_id=f"case-{i:04d}",
            vectors={channel: rng.standard_normal(dim) for channel, dim in DIMS.items()},
            report=f"{side} pleural effusion with basal atelectasis. Case number {i}.",
            source=f"/archive/case-{i:04d}.nii.gz",
            shape=(64, 64, 40),
            spacing=(0.8, 0.8, 2.5),
            metadata={"sex": "F" if i % 3 else "M", "age": 40 + i % 50, "body_part": "CHEST"},
            thumbnail_png=b"\x89PNG-thumbnail-" + str(i).encode(),
        ))
    return cases


def make_index(folder: Path, n: int = 40, **settings: object) -> CaseIndex:
    index = CaseIndex.create(folder, "medfinder-test", FINGERPRINT, DIMS, settings or None)
    index.add(entries(n))
    index.commit()
    return index


def answers(index: CaseIndex, seed: int = 7) -> list[list[tuple[str, float]]]:
    rng = np.random.default_rng(seed)
    return [index.query(channel, rng.standard_normal(dim), 5) for channel, dim in DIMS.items() for _ in range(3)]


# ----------------------------------------------------------------------------- vector backends
def test_exact_and_hnsw_agree_on_small_data() -> None:
    data = clustered(400, 32, seed=1)
    queries = clustered(30, 32, seed=2)
    ids = np.arange(1000, 1400)
    exact, hnsw = ExactIndex(32), HnswIndex(32)
    exact.add(ids, data)
    hnsw.add(ids, data)
    exact_ids, exact_scores = exact.query(queries, 10)
    hnsw_ids, hnsw_scores = hnsw.query(queries, 10)
    assert exact_ids.dtype == hnsw_ids.dtype == np.int64
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_ids, hnsw_ids)])
    assert overlap >= 0.98
    assert (exact_ids[:, 0] == hnsw_ids[:, 0]).all()
    # Scores are cosine similarities, best first, and both backends compute the same value.
    assert np.allclose(exact_scores[:, 0], hnsw_scores[:, 0], atol=1e-5)
    assert (np.diff(hnsw_scores, axis=1) <= 1e-6).all()
    assert np.allclose(exact_scores[:, 0], np.max(queries @ data.T, axis=1), atol=1e-5)


def test_search_ef_grows_with_the_index_so_a_small_stored_ef_keeps_recall() -> None:
    # Anchors measured by benchmarks/ann_recall.py: ef 64 at 10^5 vectors, 384 at 10^6.
    assert ef_for_size(1_000) == ef_for_size(100_000) == 64
    assert ef_for_size(1_000_000) == 384
    sizes = [10**5, 2 * 10**5, 5 * 10**5, 10**6, 10**7]
    assert [ef_for_size(n) for n in sizes] == sorted(ef_for_size(n) for n in sizes)
    points = clustered(4050, 32, seed=11, clusters=40)
    data, queries = points[:4000], points[4000:]  # held-out queries from the same mixture
    truth = ExactIndex(32)
    truth.add(np.arange(4000), data)
    expected = truth.query(queries, 10)[0]
    recall = {}
    for grow in (False, True):
        index = HnswIndex(32, M=8, ef_construction=40, ef=10, grow_ef=grow)
        index.add(np.arange(4000), data)
        found = index.query(queries, 10)[0]
        recall[grow] = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found.tolist(), expected.tolist())])
    assert recall[True] >= 0.98 and recall[True] > recall[False]


@pytest.mark.parametrize("backend", [ExactIndex, HnswIndex])
def test_k_larger_than_the_live_count_returns_what_there_is(backend: type) -> None:
    index = backend(8)
    assert index.query(np.ones(8), 5)[0].shape == (1, 0)
    index.add(np.arange(5), clustered(5, 8, seed=3))
    index.delete(np.array([1, 3, 99]))  # 99 was never stored: ignored
    ids, scores = index.query(clustered(2, 8, seed=4), 10)
    assert len(index) == 3
    assert ids.shape == scores.shape == (2, 3)
    assert set(ids[0]) == {0, 2, 4}


def test_hnsw_after_heavy_deletion_still_returns_k_live_neighbours() -> None:
    # Deleting most of a graph leaves fewer than k reachable items: hnswlib's
    # "Cannot return the results in a contiguous 2D array" must not reach the caller.
    data = clustered(300, 16, seed=5)
    hnsw, exact = HnswIndex(16, M=4, ef=10, grow_ef=False), ExactIndex(16)
    for index in (hnsw, exact):
        index.add(np.arange(300), data)
        index.delete(np.arange(0, 295))
    query = clustered(1, 16, seed=6)
    hnsw_ids, hnsw_scores = hnsw.query(query, 5)
    exact_ids, exact_scores = exact.query(query, 5)
    assert hnsw_ids.tolist() == exact_ids.tolist()
    assert np.allclose(hnsw_scores, exact_scores, atol=1e-5)


def test_hnsw_falls_back_to_an_exact_search_when_the_graph_cannot_give_k() -> None:
    class Unreachable:  # a graph whose live items cannot all be reached, whatever ef
        def __init__(self, graph: object) -> None:
            self.graph = graph

        def knn_query(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("Cannot return the results in a contiguous 2D array. Probably ef or M is too small")

        def __getattr__(self, name: str) -> object:
            return getattr(self.graph, name)

    data = clustered(60, 16, seed=8)
    hnsw, exact = HnswIndex(16), ExactIndex(16)
    for index in (hnsw, exact):
        index.add(np.arange(60), data)
        index.delete(np.arange(0, 50, 2))
    hnsw._index = Unreachable(hnsw._index)
    query = clustered(2, 16, seed=9)
    hnsw_ids, hnsw_scores = hnsw.query(query, 4)
    exact_ids, exact_scores = exact.query(query, 4)
    assert hnsw_ids.tolist() == exact_ids.tolist()
    assert np.allclose(hnsw_scores, exact_scores, atol=1e-5)


@pytest.mark.parametrize("backend", [ExactIndex, HnswIndex])
def test_vector_index_round_trip_keeps_results_deletions_and_updates(backend: type, tmp_path: Path) -> None:
    data = clustered(200, 16, seed=7)
    index = backend(16)
    index.add(np.arange(200), data)
    index.delete(np.arange(0, 200, 4))
    index.add(np.array([8]), -data[8])  # a deleted id comes back with a new vector
    queries = clustered(10, 16, seed=8)
    before = index.query(queries, 7)
    path = tmp_path / "vectors.bin"
    index.save(path)
    loaded = backend.load(path, 16)
    assert len(loaded) == len(index) == 151
    after = loaded.query(queries, 7)
    assert np.array_equal(before[0], after[0])
    assert np.allclose(before[1], after[1], atol=1e-6)
    still_deleted = np.setdiff1d(np.arange(0, 200, 4), [8])
    assert not np.isin(still_deleted, after[0]).any()
    assert loaded.query(-data[8], 1)[0][0, 0] == 8


def test_hnsw_load_restores_the_search_ef_and_rejects_a_wrong_dimension(tmp_path: Path) -> None:
    index = HnswIndex(16, M=8, ef_construction=50, ef=40)
    index.add(np.arange(50), clustered(50, 16, seed=9))
    index.save(tmp_path / "v.hnsw")
    loaded = HnswIndex.load(tmp_path / "v.hnsw", 16, ef=40)
    assert loaded.settings() == {"M": 8, "ef_construction": 50, "ef": 40}
    with pytest.raises(CaseIndexError, match="16-dimensional vectors, not 32"):
        HnswIndex.load(tmp_path / "v.hnsw", 32)


def test_vectors_without_direction_are_refused() -> None:
    index = HnswIndex(4)
    with pytest.raises(CaseIndexError, match="all-zero"):
        index.add(np.array([1]), np.zeros((1, 4)))
    with pytest.raises(CaseIndexError, match="NaN"):
        index.query(np.array([np.nan, 1, 1, 1]), 1)
    with pytest.raises(CaseIndexError, match="4-dimensional"):
        index.add(np.array([1]), np.ones((1, 5)))


# ----------------------------------------------------------------------------- the case index
@pytest.mark.parametrize("backend", ["hnsw", "exact", "milvus"])
def test_round_trip_gives_the_same_results_and_records(tmp_path: Path, backend: str) -> None:
    folder = tmp_path / "index"
    with make_index(folder, backend=backend) as index:
        expected = answers(index)
    reopened = CaseIndex.open(folder, fingerprint=FINGERPRINT)
    assert len(reopened) == 40
    if backend == "milvus":  # the server computes the cosines, after a reload in another order: last bits
        got = answers(reopened)
        assert [[c for c, _ in hits] for hits in got] == [[c for c, _ in hits] for hits in expected]
        assert np.allclose([[s for _, s in hits] for hits in got], [[s for _, s in hits] for hits in expected], atol=1e-6)
    else:
        assert answers(reopened) == expected
    record = reopened.get("case-0007")
    assert record.report.startswith("Right pleural effusion")
    assert record.shape == (64, 64, 40) and record.spacing == (0.8, 0.8, 2.5)
    assert record.metadata == {"sex": "F", "age": 47, "body_part": "CHEST"}
    assert record.thumbnail_png == b"\x89PNG-thumbnail-7"
    assert record.source == "/archive/case-0007.nii.gz"
    assert set(record.channels) == set(DIMS)
    assert record.findings, "findings are parsed from the report when the caller gives none"
    assert set(record.findings[0]) == {"name", "status", "laterality", "start", "end"}
    info = reopened.info()
    assert info["counts"] == {"cases": 40, "image": 40, "report": 40, "report_text": 40}
    assert info["model"] == {"id": "medfinder-test", "fingerprint": FINGERPRINT}
    assert info["settings"]["backend"] == backend and {"M", "ef_construction", "ef"} <= set(info["settings"])
    assert CaseIndex.read_info(folder) == {key: value for key, value in info.items() if key != "uncommitted_changes"}
    manifest = json.loads((folder / "index.json").read_text())
    assert manifest["dims"] == DIMS and set(manifest["files"]) >= {"cases.sqlite", "keywords.json"}


@pytest.mark.parametrize("backend", ["hnsw", "exact"])
def test_stored_vectors_come_back_by_case_id_without_deleted_cases(tmp_path: Path, backend: str) -> None:
    cases = entries(12, seed=5)
    with CaseIndex.create(tmp_path / "i", "m", FINGERPRINT, DIMS, {"backend": backend}) as index:
        index.add(cases)
        index.delete(["case-0002"])
        index.add([CaseEntry("case-0005", {"report": cases[5].vectors["report"]}, report="Normal chest CT.")])
        index.commit()
    with CaseIndex.open(tmp_path / "i") as reopened:
        image = reopened.vectors("image")
        assert set(image) == {case.case_id for case in cases} - {"case-0002", "case-0005"}
        assert set(reopened.vectors("report")) == {case.case_id for case in cases} - {"case-0002"}
        for case in cases:
            if case.case_id in image:
                expected = case.vectors["image"] / np.linalg.norm(case.vectors["image"])
                assert np.allclose(image[case.case_id], expected, atol=1e-6)
        with pytest.raises(CaseIndexError, match="no channel 'text'"):
            reopened.vectors("text")


def test_vectors_kept_in_milvus_are_refused_with_one_sentence(tmp_path: Path) -> None:
    with make_index(tmp_path / "i", n=4, backend="milvus") as index:
        with pytest.raises(CaseIndexError, match=r"^The 'image' vectors of the case index at .* live in MilvusIndex, "
                                                 r"which does not hand them back; read them there\.$"):
            index.vectors("image")


def test_a_query_vector_finds_its_own_case_first(tmp_path: Path) -> None:
    cases = entries(30, seed=3)
    with CaseIndex.create(tmp_path / "i", "m", FINGERPRINT, DIMS) as index:
        index.add(cases)
        index.commit()
        for channel in DIMS:
            best_id, best_score = index.query(channel, cases[12].vectors[channel], 3)[0]
            assert best_id == "case-0012" and best_score == pytest.approx(1.0, abs=1e-5)


def test_keyword_search_finds_cases_by_report_words(tmp_path: Path) -> None:
    with CaseIndex.create(tmp_path / "i", "m", FINGERPRINT, DIMS) as index:
        index.add(entries(6))
        index.add([CaseEntry("pneumo", {"report": np.ones(16)}, report="Large right pneumothorax.")])
        index.commit()
    reopened = CaseIndex.open(tmp_path / "i")
    hits = reopened.keyword_search("pneumothorax", 3)
    assert hits and hits[0][0] == "pneumo"


@pytest.mark.parametrize("backend", ["hnsw", "milvus"])
def test_delete_and_update_persist(tmp_path: Path, backend: str) -> None:
    folder = tmp_path / "index"
    cases = entries(20)
    with make_index(folder, n=20, backend=backend) as index:
        assert index.delete(["case-0003", "case-0004", "not-there"]) == 2
        updated = CaseEntry("case-0005", {"report": cases[5].vectors["report"]}, report="Normal chest CT.")
        index.add([updated])  # same id: replaces the record and drops its image vector
        index.commit()
    reopened = CaseIndex.open(folder)
    assert len(reopened) == 18 and not reopened.contains("case-0003") and "case-0004" not in reopened
    assert reopened.get("case-0005").report == "Normal chest CT."
    assert reopened.get("case-0005").channels == ("report",)
    assert reopened.get("case-0005").thumbnail_png is None
    assert reopened.thumbnails(["case-0005", "case-0007", "case-0003"]) == {"case-0007": b"\x89PNG-thumbnail-7"}
    for channel, dim in DIMS.items():
        found = {case_id for case_id, _ in reopened.query(channel, cases[3].vectors[channel], 20)}
        assert not found & {"case-0003", "case-0004"}
    image_hits = [case_id for case_id, _ in reopened.query("image", cases[5].vectors["image"], 20)]
    assert "case-0005" not in image_hits
    assert reopened.query("report", cases[5].vectors["report"], 1)[0][0] == "case-0005"
    assert reopened.info()["counts"] == {"cases": 18, "image": 17, "report": 18, "report_text": 17}


def test_cases_without_image_or_without_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with CaseIndex.create(tmp_path / "i", "m", FINGERPRINT, DIMS) as index:
        index.add([
            CaseEntry("image-only", {"image": rng.standard_normal(16)}, source="a.nii.gz", shape=(8, 8, 8)),
            CaseEntry("report-only", {"report": rng.standard_normal(16), "report_text": rng.standard_normal(24)},
                      report="Small left pleural effusion."),
        ])
        index.commit()
    reopened = CaseIndex.open(tmp_path / "i")
    assert reopened.case_ids() == {"image-only", "report-only"}
    assert reopened.get("image-only").report == "" and reopened.get("image-only").findings == []
    assert reopened.get("report-only").shape is None
    assert [c for c, _ in reopened.query("image", rng.standard_normal(16), 5)] == ["image-only"]
    assert [c for c, _ in reopened.query("report_text", rng.standard_normal(24), 5)] == ["report-only"]


def test_get_many_keeps_order_skips_unknown_and_can_leave_out_thumbnails(tmp_path: Path) -> None:
    with make_index(tmp_path / "i", n=10) as index:
        records = index.get_many(["case-0009", "missing", "case-0002"], thumbnails=False)
    assert [r.case_id for r in records] == ["case-0009", "case-0002"]
    assert all(r.thumbnail_png is None for r in records)
    assert records[0].metadata["sex"] == "M"


def test_identifying_metadata_is_never_stored(tmp_path: Path) -> None:
    case = entries(1)[0]
    case.metadata = {"sex": "F", "PatientName": "Doe^Jane", "AccessionNumber": "A1", "StudyDate": "20240101",
                     "patient_id": "123", "age": np.int64(61)}
    with CaseIndex.create(tmp_path / "i", "m", FINGERPRINT, DIMS) as index:
        index.add([case])
        index.commit()
    assert CaseIndex.open(tmp_path / "i").get(case.case_id).metadata == {"sex": "F", "age": 61}
    assert b"Doe^Jane" not in (tmp_path / "i").joinpath("generations").joinpath("000002", "cases.sqlite").read_bytes()


def test_bad_entries_change_nothing(tmp_path: Path) -> None:
    with make_index(tmp_path / "i", n=5) as index:
        bad_channel = CaseEntry("new", {"pet": np.ones(16)})
        with pytest.raises(CaseIndexError, match="channel 'pet'"):
            index.add([*entries(2, start=50), bad_channel])
        with pytest.raises(CaseIndexError, match="shape"):
            index.add([CaseEntry("new", {"image": np.ones(3)})])
        with pytest.raises(CaseIndexError, match="twice"):
            index.add(entries(1) * 2)
        assert len(index) == 5


# ----------------------------------------------------------------------------- integrity
def test_a_different_model_fingerprint_is_refused(tmp_path: Path) -> None:
    make_index(tmp_path / "i", n=3).close()
    with pytest.raises(CaseIndexError) as caught:
        CaseIndex.open(tmp_path / "i", fingerprint="fedcba9876543210")
    assert FINGERPRINT in str(caught.value) and "fedcba9876543210" in str(caught.value)


@pytest.mark.parametrize("name", ["image.hnsw", "cases.sqlite", "keywords.json"])
def test_a_corrupted_file_is_named(tmp_path: Path, name: str) -> None:
    make_index(tmp_path / "i", n=10).close()
    path = tmp_path / "i" / "generations" / "000002" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CaseIndexError, match=rf"{name} does not match its checksum"):
        CaseIndex.open(tmp_path / "i")


def test_missing_files_and_folders_that_are_not_indexes(tmp_path: Path) -> None:
    make_index(tmp_path / "i", n=3).close()
    (tmp_path / "i" / "generations" / "000002" / "report.hnsw").unlink()
    with pytest.raises(CaseIndexError, match=r"report.hnsw is missing"):
        CaseIndex.open(tmp_path / "i")
    with pytest.raises(CaseIndexError, match="does not exist"):
        CaseIndex.open(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CaseIndexError, match="not a MedFinder case index"):
        CaseIndex.open(tmp_path / "plain")
    with pytest.raises(CaseIndexError, match="already exists"):
        CaseIndex.create(tmp_path / "i", "m", FINGERPRINT, DIMS)


# ----------------------------------------------------------------------------- atomic writes
def test_a_crash_half_way_through_a_commit_leaves_the_previous_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "index"
    index = make_index(folder, n=10)
    expected = answers(index)
    index.add(entries(10, start=100))
    index.delete(["case-0001"])
    saves = []

    def crash_after_first_file(self: HnswIndex, path: object) -> None:
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt("killed half-way through the save")
        original_save(self, path)

    original_save = HnswIndex.save
    monkeypatch.setattr(HnswIndex, "save", crash_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        index.commit()
    monkeypatch.undo()
    index._lock_handle.close()  # the killed process would have released its lock

    survivor = CaseIndex.open(folder, fingerprint=FINGERPRINT)
    assert len(survivor) == 10 and survivor.contains("case-0001") and not survivor.contains("case-0100")
    assert answers(survivor) == expected
    with CaseIndex.open(folder, writable=True) as writer:  # cleans the partial generation up
        assert sorted(p.name for p in (folder / "generations").iterdir()) == ["000001", "000002"]
        writer.add(entries(5, start=200))
        writer.commit()
    assert len(CaseIndex.open(folder)) == 15


def test_a_full_disk_during_commit_is_one_sentence_and_can_be_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "index"
    index = make_index(folder, n=5)
    index.add(entries(3, start=10))

    def disk_full(self: object, path: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(HnswIndex, "save", disk_full)
    with pytest.raises(CaseIndexError) as caught:
        index.commit()
    message = str(caught.value)
    assert str(folder) in message and "full disk" in message and "\n" not in message
    assert len(CaseIndex.open(folder)) == 5
    monkeypatch.undo()
    index.commit()
    index.close()
    assert len(CaseIndex.open(folder)) == 8


def test_a_short_hnsw_write_is_an_error_not_a_corrupt_index(tmp_path: Path) -> None:
    # hnswlib writes without checking: on a full disk it leaves a short file and reports nothing.
    index = HnswIndex(64)
    index.add(np.arange(3000), clustered(3000, 64, seed=3))
    with file_size_limit(100_000), pytest.raises(CaseIndexError, match="not written completely.*disk full"):
        index.save(tmp_path / "short.bin")
    index.save(tmp_path / "whole.bin")
    assert len(HnswIndex.load(tmp_path / "whole.bin", 64)) == 3000


def test_a_full_disk_during_commit_keeps_the_previous_index(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    index = CaseIndex.create(folder, "medfinder-test", FINGERPRINT, {"image": 256}, None)
    index.add([CaseEntry(case_id="first", vectors={"image": clustered(1, 256, seed=4)[0]})])
    index.commit()
    vectors = clustered(2000, 256, seed=5)  # an HNSW file of ~2.5 MB, a case database of ~0.2 MB
    index.add([CaseEntry(case_id=f"more-{i}", vectors={"image": v}) for i, v in enumerate(vectors)])
    with file_size_limit(1_000_000), pytest.raises(CaseIndexError) as caught:
        index.commit()
    assert "not written completely" in str(caught.value) and "\n" not in str(caught.value)
    assert len(CaseIndex.open(folder)) == 1
    index.commit()
    index.close()
    assert len(CaseIndex.open(folder)) == 2001


def searchable(index: CaseIndex) -> tuple[list, list]:
    """What a keyword search and an image search answer, to compare before and after a change."""
    return index.keyword_search("pleural effusion", 500), index.query("image", entries(1, seed=9)[0].vectors["image"], 5)


def disk_full_below(index: CaseIndex, fraction: float = 1.0):
    """A full disk for the next write into the working case database (which must exist)."""
    return file_size_limit(int(os.path.getsize(index._work_dir / "cases.sqlite") * fraction))


def test_a_full_disk_while_adding_leaves_the_index_as_it_was(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    index = make_index(folder, n=5)
    index.add(entries(1, start=99))  # the working copy of the case database now exists
    before = searchable(index)
    with disk_full_below(index), pytest.raises(CaseIndexError) as caught:
        index.add(entries(300, start=100))
    message = str(caught.value)
    assert str(folder) in message and "disk full" in message and "\n" not in message
    # Nothing of the refused batch is searchable, by keyword or by vector.
    assert searchable(index) == before and len(index) == 6 and not index.contains("case-0100")
    index.add(entries(300, start=100))
    index.commit()
    index.close()
    assert len(CaseIndex.open(folder)) == 306


def test_a_full_disk_while_deleting_leaves_the_cases_searchable(tmp_path: Path) -> None:
    index = make_index(tmp_path / "index", n=300)
    index.delete(["case-0299"])
    before = searchable(index)
    # A delete does not grow the database, but its rollback journal holds a copy of every page it changes.
    with disk_full_below(index, 0.25), pytest.raises(CaseIndexError, match="remove cases from.*disk full"):
        index.delete([f"case-{i:04d}" for i in range(200)])
    assert searchable(index) == before and len(index) == 299
    assert index.delete([f"case-{i:04d}" for i in range(200)]) == 200
    index.commit()
    index.close()
    assert len(CaseIndex.open(tmp_path / "index")) == 99


@pytest.mark.parametrize("backend", ["hnsw", "milvus"])
def test_uncommitted_changes_are_invisible_to_readers_and_dropped_on_close(tmp_path: Path, backend: str) -> None:
    folder = tmp_path / "index"
    make_index(folder, n=4, backend=backend).close()
    writer = CaseIndex.open(folder, writable=True)
    writer.add(entries(2, start=40))
    assert len(writer) == 6 and len(CaseIndex.open(folder)) == 4
    with pytest.raises(CaseIndexError, match="already open for writing"):
        CaseIndex.open(folder, writable=True)
    writer.close()
    assert len(CaseIndex.open(folder)) == 4
    assert [p.name for p in (folder / "generations").iterdir() if "partial" in p.name] == []
    if backend == "milvus":  # the dropped batch's rows are gone from the collection too, not just hidden
        with CaseIndex.open(folder) as reader:
            assert {len(reader.vector_index(c)) for c in DIMS} == {4}
            assert reader.vector_index("image").purge_uncommitted() == 0


def test_a_read_only_index_refuses_writes(tmp_path: Path) -> None:
    make_index(tmp_path / "i", n=2).close()
    reader = CaseIndex.open(tmp_path / "i")
    with pytest.raises(CaseIndexError, match="read-only"):
        reader.add(entries(1, start=9))


def make_read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``folder`` unwritable: by permissions, or (root ignores those) as a read-only mount would."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    if os.geteuid() != 0:
        return
    import builtins

    def refused(path: object) -> bool:
        return Path(os.fspath(path)).resolve().is_relative_to(folder.resolve())

    def read_only_open(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if refused(path) and any(flag in mode for flag in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return builtins.open(path, mode, *args, **kwargs)

    real_mkdir = os.mkdir

    def read_only_mkdir(path: object, *args: object, **kwargs: object) -> None:
        if refused(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real_mkdir(path, *args, **kwargs)

    for module in ("medfinder.index.storage", "medfinder.index.case_index"):
        monkeypatch.setattr(f"{module}.open", read_only_open, raising=False)
    monkeypatch.setattr(os, "mkdir", read_only_mkdir)


def test_a_read_only_folder_is_one_sentence_and_still_searchable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "index"
    make_index(folder, n=3).close()
    make_read_only(folder, monkeypatch)
    try:
        with pytest.raises(CaseIndexError, match=r"index for writing: the folder is read-only"):
            CaseIndex.open(folder, writable=True)
        assert [case_id for case_id, _ in CaseIndex.open(folder).query("image", np.ones(16), 5)]
        with pytest.raises(CaseIndexError, match=r"Cannot create a case index at .*sub: the folder is read-only"):
            CaseIndex.create(folder / "sub", "m", FINGERPRINT, DIMS)
    finally:
        monkeypatch.undo()
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


_KILLED_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from medfinder.index import CaseEntry, CaseIndex
    rng = np.random.default_rng(0)
    index = CaseIndex.create({folder!r}, "m", "f", {{"image": 64, "report": 64}})
    batch = 0
    while True:
        index.add([CaseEntry(f"c{{batch}}-{{i}}", {{"image": rng.standard_normal(64), "report": rng.standard_normal(64)}},
                             ) for i in range(25)])
        index.commit()
        batch += 1
        print(batch, flush=True)
""")


def test_a_writer_killed_at_random_moments_leaves_an_openable_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    for attempt in range(2):  # each child pays ~3 s of imports (spaCy for the keyword index)
        folder = tmp_path / f"index{attempt}"
        script = _KILLED_WRITER.format(repo=str(REPO), folder=str(folder))
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        committed = int(child.stdout.readline())  # at least one commit has landed
        time.sleep(float(rng.uniform(0.0, 0.05)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        reported = [int(line) for line in child.stdout.read().split()]
        committed = max([committed, *reported])
        index = CaseIndex.open(folder)
        # Killed just after a commit landed but before it was printed: one batch more.
        assert len(index) in (25 * committed, 25 * (committed + 1))
        assert index.info()["counts"]["image"] == len(index)


def test_concurrent_readers_get_the_same_answers(tmp_path: Path) -> None:
    make_index(tmp_path / "i", n=60).close()
    index = CaseIndex.open(tmp_path / "i")
    vectors = clustered(40, 16, seed=12)
    serial = [index.query("image", v, 5) for v in vectors]

    def work(i: int) -> list[tuple[str, float]]:
        index.get_many([case_id for case_id, _ in serial[i]])
        return index.query("image", vectors[i], 5)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(work, range(40))) == serial


def test_demo_index_built_by_other_weights_is_rebuilt_not_refused(tmp_path, tiny_index, tiny_model_dir):
    import shutil

    import torch

    from medfinder.demo import _drop_if_built_by_another_model, demo_index_is_current
    from medfinder.model import create_model_and_transforms

    index_dir = tmp_path / "demo_index"
    assert not demo_index_is_current(index_dir, tiny_model_dir)  # nothing there yet: the app builds it
    shutil.copytree(tiny_index, index_dir)
    assert demo_index_is_current(index_dir, tiny_model_dir)
    _drop_if_built_by_another_model(index_dir, tiny_model_dir)
    assert (index_dir / "index.json").exists()  # same weights: kept

    torch.manual_seed(1)
    other, _ = create_model_and_transforms("medfinder-tiny")
    other_dir = other.save_pretrained(tmp_path / "new_weights")
    # After new weights the app's start sees a stale index (and rebuilds it) instead of failing to open it.
    assert not demo_index_is_current(index_dir, other_dir)
    _drop_if_built_by_another_model(index_dir, other_dir)
    assert not index_dir.exists()


def test_demo_corpus_and_example_scans_come_from_seeds_training_never_used() -> None:
    # An example query that is a training case would make image search look better than it is.
    import re

    from medfinder.demo import DEMO_MODEL_DIR, DEMO_SEED, EXAMPLE_SEED

    record = (DEMO_MODEL_DIR / "training_stage1.json").read_text()
    training_seeds = {int(s) for s in re.findall(r"--seed (\d+)", record)}
    assert len(training_seeds) >= 10  # the record still names its corpora
    assert DEMO_SEED not in training_seeds
    assert EXAMPLE_SEED not in training_seeds
    assert EXAMPLE_SEED != DEMO_SEED


def test_demo_examples_from_an_earlier_seed_are_regenerated(tmp_path, monkeypatch) -> None:
    import nibabel as nib

    from medfinder import demo
    from medfinder.phantoms import generate_case

    monkeypatch.setattr(demo, "EXAMPLE_CASES", 2)
    folder = demo.examples_dir(tmp_path / "demo_index")
    folder.mkdir(parents=True)
    old = generate_case(9, 0)  # what releases before seed 2718 wrote, with no seed file
    nib.save(nib.Nifti1Image(old.volume.hu, old.volume.affine), str(folder / "phantom_example_1.nii.gz"))
    (folder / "phantom_example_1.nii.gz.txt").write_text("old")

    examples = demo.ensure_demo_examples(tmp_path / "demo_index")
    phantoms = [p for label, p in examples.items() if "synthetic" in label]
    assert len(phantoms) == 2
    for label in (label for label in examples if "synthetic" in label):
        named = label.split("synthetic: ")[1].rstrip(")").split("_")
        assert len(named) == len(set(named)), label  # a bilateral finding (example 2's effusion) is named once
    expected = generate_case(demo.EXAMPLE_SEED, 0).volume.hu
    np.testing.assert_allclose(np.asanyarray(nib.load(str(phantoms[0])).dataobj), expected, atol=1e-3)
    assert not any("old" in label for label in examples)  # the stale label went with its scan
    stamp = phantoms[0].stat().st_mtime_ns
    phantoms[1].unlink()  # same seed, one example missing: only that one is made again
    again = demo.ensure_demo_examples(tmp_path / "demo_index")
    assert phantoms[0].stat().st_mtime_ns == stamp and phantoms[1].exists() and again.keys() == examples.keys()
