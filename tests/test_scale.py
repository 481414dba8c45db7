"""Scale-out: index builds on Ray (same result as the plain build, resumable, kill -9 of its workers)
and the Milvus vector backend (its commit rule across crashes, an unreachable server, a locked file)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_index import DIMS, FINGERPRINT, entries

from medfinder.cli import main
from medfinder.errors import CaseIndexError
from medfinder.index import CaseIndex
from medfinder.index.build import build_index, load_scan
from medfinder.io.manifests import ManifestCase, read_manifest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- helpers
def stored_vectors(folder: Path) -> dict[tuple[str, str], np.ndarray]:
    """{(case id, channel): unit vector} of an index built with the exact backend."""
    with CaseIndex.open(folder) as index:
        return {(case_id, channel): vector for channel in index.channels
                for case_id, vector in index.vectors(channel).items()}


def assert_same_index(built: Path, reference: dict[tuple[str, str], np.ndarray]) -> None:
    """The same cases and channels, every vector at cosine >= 0.9999 to the reference's."""
    got = stored_vectors(built)
    assert set(got) == set(reference)
    worst = min(float(got[key] @ reference[key]) for key in reference)
    assert worst >= 0.9999, worst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def local_ray() -> Any:
    """One local Ray for the module, on two CPUs (the builds use it as they find it). Its workers
    import this checkout and the tests' modules (the loader below travels to them by reference)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def plain_vectors(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_corpus: Path) -> dict:
    out = tmp_path_factory.mktemp("plain") / "index"
    summary = build_index(read_manifest(tiny_corpus), out, tiny_model_dir, progress=False, settings={"backend": "exact"})
    assert summary.added == 12
    return stored_vectors(out)


def test_a_ray_build_equals_the_plain_build_and_resumes(local_ray: Any, tmp_path: Path, tiny_model_dir: Path,
                                                        tiny_corpus: Path, plain_vectors: dict) -> None:
    from medfinder.index.ray_build import build_index_with_ray

    records = read_manifest(tiny_corpus)
    out = tmp_path / "index"
    broken = ManifestCase("broken", tmp_path / "absent.nii.gz", "Right pleural effusion.")
    first = build_index_with_ray([*records[:5], broken], out, tiny_model_dir, batch_size=2, progress=False,
                                 settings={"backend": "exact"})
    assert first.added == 5 and list(first.failed) == ["broken"] and "absent.nii.gz" in first.failed["broken"]
    assert first.first_case_s is not None and first.first_case_s <= first.seconds
    # A second run, through the command line, adds the rest and skips what is done.
    code = main(["--manifest", str(tiny_corpus), "--out", str(out), "--model", str(tiny_model_dir), "--ray",
                 "--batch-size", "3", "--quiet"], command="build", prog="python -m index_build")
    assert code == 0
    assert_same_index(out, plain_vectors)
    again = build_index_with_ray(records, out, tiny_model_dir, progress=False)
    assert again.added == 0 and again.skipped_done == 12


class DyingLoader:
    """A ScanLoader that is slow (so a build lasts seconds) and SIGKILLs its own Ray worker process
    the first time it loads ``victim``: a map task whose worker dies mid-build."""

    def __init__(self, marker: Path, victim: str) -> None:
        self.marker = marker
        self.victim = victim

    def __call__(self, case: ManifestCase) -> Any:
        time.sleep(0.3)
        if case.case_id == self.victim and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return load_scan(case)


def kill_encoder_after_first_commit(folder: Path, killed: list[tuple[int, int]], stop: threading.Event) -> None:
    """kill -9 the encoder actor (a descendant of this process) once the build has committed a batch;
    records (pid, the index's generation then)."""
    import psutil

    while not stop.is_set():
        try:
            generation = json.loads((folder / "index.json").read_text())["generation"]
        except (OSError, ValueError):
            generation = 0
        if generation >= 2:
            for child in psutil.Process().children(recursive=True):
                try:
                    if "_CaseEncoder" in " ".join(child.cmdline()):
                        os.kill(child.pid, signal.SIGKILL)
                        killed.append((child.pid, generation))
                        return
                except psutil.Error:
                    continue
        time.sleep(0.05)


def test_killing_ray_workers_mid_build_loses_and_duplicates_nothing(local_ray: Any, tmp_path: Path, tiny_model_dir: Path,
                                                                    tiny_corpus: Path, plain_vectors: dict) -> None:
    """A prepare task's worker and the encoder actor are each SIGKILLed once while the build runs
    (committing after every batch); Ray retries the task and restarts the actor, and the index ends
    with every case exactly once, with the plain build's vectors."""
    from medfinder.index.ray_build import build_index_with_ray

    records = read_manifest(tiny_corpus)
    out = tmp_path / "index"
    marker = tmp_path / "prepare-worker-killed"
    killed: list[tuple[int, int]] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_encoder_after_first_commit, args=(out, killed, stop), daemon=True)
    killer.start()
    try:
        summary = build_index_with_ray(records, out, tiny_model_dir, batch_size=2, commit_every_s=0.0, progress=False,
                                       settings={"backend": "exact"}, load=DyingLoader(marker, records[7].case_id))
    finally:
        stop.set()
        killer.join()
    assert marker.exists(), "the prepare task's worker was not killed"
    assert killed, "the encoder actor was not killed"
    commits_after_the_kill = json.loads((out / "index.json").read_text())["generation"] - killed[0][1]
    assert commits_after_the_kill >= 1, "the actor was killed after the last batch"
    assert summary.added == 12 and not summary.failed
    with CaseIndex.open(out) as index:
        assert len(index) == 12 and index.case_ids() == {r.case_id for r in records}
        assert index.info()["counts"]["image"] == 12
    assert_same_index(out, plain_vectors)


def test_ray_options_without_ray_and_vectors_with_another_backend_are_one_sentence(
        tmp_path: Path, tiny_corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for extra, sentence in [
        (["--ray-actors", "2"], "error: --ray-actors, --ray-gpus-per-actor and --ray-cpus-per-actor need --ray."),
        (["--backend", "hnsw", "--vectors", "milvus-lite"],
         "error: --vectors names where Milvus keeps the vectors; it cannot be combined with --backend hnsw."),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--manifest", str(tiny_corpus), "--out", str(tmp_path / "i"), *extra], command="build")
        assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [sentence]


# ----------------------------------------------------------------------------- Milvus
def raw_count(folder: Path, channel: str = "image") -> int:
    """Rows in a channel's collection as Milvus holds them, visible or not."""
    from pymilvus import MilvusClient

    settings = json.loads((folder / "index.json").read_text())["settings"]
    client = MilvusClient(str(folder / "vectors.milvus.db"))
    collection = f"{settings['collection_prefix']}_{channel}"
    client.load_collection(collection)
    rows = client.query(collection, filter="label >= 0", output_fields=["count(*)"], consistency_level="Strong")
    return int(rows[0]["count(*)"])


def run_until_killed(script: str) -> None:
    """Run ``script`` in a fresh interpreter that SIGKILLs itself where the script says."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


SETUP = """
    import os, signal, sys
    from medfinder.index import CaseIndex, case_index
    from medfinder.index.milvus import MilvusIndex
    from test_index import DIMS, FINGERPRINT, entries
    folder = sys.argv[1] if len(sys.argv) > 1 else {folder!r}
    with CaseIndex.create(folder, "m", FINGERPRINT, DIMS, {{"backend": "milvus"}}) as index:
        index.add(entries(10))
        index.commit()
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_crash_between_the_milvus_write_and_index_json_leaves_no_visible_trace(tmp_path: Path) -> None:
    """Rule: rows at or above the committed next_label are invisible, and the next writer deletes them."""
    folder = tmp_path / "index"
    run_until_killed(SETUP.format(folder=str(folder)) + """
    index = CaseIndex.open(folder, writable=True)
    index.add(entries(5, seed=1, start=10))  # upserted into Milvus as labels 10..14
    index.delete(["case-0002"])
    case_index.write_manifest = die  # killed at the commit point: descriptors written, index.json not
    index.commit()
    """)
    assert raw_count(folder) == 15  # the uncommitted batch's rows are in Milvus
    uncommitted = entries(5, seed=1, start=10)
    with CaseIndex.open(folder, fingerprint=FINGERPRINT) as reader:
        assert len(reader) == 10 and reader.info()["counts"]["image"] == 10
        for entry in uncommitted:
            labels, _ = reader.vector_index("image").query(entry.vectors["image"], 10)
            assert labels.shape == (1, 10) and int(labels.max()) < 10  # a full k of committed cases only
            hits = reader.query("image", entry.vectors["image"], 10)
            assert len(hits) == 10 and "case-0002" in dict(hits)  # the delete was not committed either
    with CaseIndex.open(folder, writable=True) as writer:  # the next writer purges the stale rows first
        assert raw_count(folder) == 10
        fresh = entries(3, seed=2, start=20)
        writer.add(fresh)  # labels 10..12 again, now for other cases
        writer.commit()
    with CaseIndex.open(folder, fingerprint=FINGERPRINT) as reader:
        assert len(reader) == 13 and raw_count(folder) == 13
        for entry in fresh:
            best, score = reader.query("image", entry.vectors["image"], 1)[0]
            assert best == entry.case_id and score == pytest.approx(1.0, abs=1e-5)
        for entry in uncommitted:  # the killed batch's vectors are gone for good
            assert reader.query("image", entry.vectors["image"], 1)[0][1] < 0.999


def test_a_crash_after_index_json_before_the_deletes_keeps_them_hidden(tmp_path: Path) -> None:
    """Rule: deletions reach Milvus after the commit; until then the descriptor's list hides them,
    and the next writer applies it."""
    folder = tmp_path / "index"
    run_until_killed(SETUP.format(folder=str(folder)) + """
    index = CaseIndex.open(folder, writable=True)
    index.delete(["case-0002", "case-0003"])
    MilvusIndex.apply_deletes = die  # killed after index.json named the generation, before any delete
    index.commit()
    """)
    assert raw_count(folder) == 10
    deleted = entries(10)[2:4]
    with CaseIndex.open(folder, fingerprint=FINGERPRINT) as reader:
        assert len(reader) == 8 and reader.info()["counts"] == {"cases": 8, "image": 8, "report": 8, "report_text": 8}
        for entry in deleted:
            for channel in DIMS:
                labels, _ = reader.vector_index(channel).query(entry.vectors[channel], 10)
                assert labels.shape == (1, 8) and not {2, 3} & set(labels[0].tolist())
    CaseIndex.open(folder, writable=True).close()
    assert raw_count(folder) == 8 and raw_count(folder, "report_text") == 8


def test_an_unreachable_milvus_server_is_one_sentence_not_garbage(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  tiny_model_dir: Path, tiny_corpus: Path) -> None:
    folder = tmp_path / "index"
    with CaseIndex.create(folder, "m", FINGERPRINT, DIMS, {"backend": "milvus"}) as index:
        index.add(entries(4))
        index.commit()
    # The index's vectors now live on a server that is down (nothing listens on the port).
    address = f"milvus://127.0.0.1:{free_port()}"
    manifest = json.loads((folder / "index.json").read_text())
    manifest["settings"]["vectors"] = address
    (folder / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(CaseIndexError) as error:
        CaseIndex.open(folder)
    sentence = str(error.value)
    assert sentence.startswith(f"The Milvus server {address} holding the vectors of the case index at {folder} cannot be reached")
    assert sentence.endswith(").") and "\n" not in sentence
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--index", str(folder)])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [f"error: {sentence}"]
    # A build asked to put a new index's vectors there says the same, and leaves no index behind.
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(tiny_corpus), "--out", str(tmp_path / "new"), "--model", str(tiny_model_dir),
              "--vectors", address, "--quiet"], command="build")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "cannot be reached" in err[0]
    assert not (tmp_path / "new" / "index.json").exists()


def test_a_milvus_lite_file_held_by_another_process_is_one_sentence(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    with CaseIndex.create(folder, "m", FINGERPRINT, DIMS, {"backend": "milvus"}) as index:
        index.add(entries(3))
        index.commit()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from medfinder.index import CaseIndex; "
                               f"i = CaseIndex.open({str(folder)!r}); print('open', flush=True); time.sleep(60)"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(CaseIndexError, match="is open in another process; Milvus Lite serves one process at a time "):
            CaseIndex.open(folder)
    finally:
        holder.kill()
        holder.wait()


def test_milvus_addresses_are_recorded_so_the_folder_can_move(tmp_path: Path) -> None:
    from medfinder.index.milvus import client_uri, normalise_uri

    folder = tmp_path / "index"
    assert normalise_uri("milvus-lite", folder) == "milvus-lite:vectors.milvus.db"
    assert normalise_uri(f"milvus-lite://{folder}/sub/v.db", folder) == "milvus-lite:sub/v.db"
    assert normalise_uri("milvus-lite:///srv/v.db", folder) == "milvus-lite:/srv/v.db"
    assert normalise_uri("milvus://db.example.org", folder) == "milvus://db.example.org:19530"
    assert normalise_uri("https://db.example.org:443/", folder) == "https://db.example.org:443"
    assert client_uri("milvus://db:19530", folder) == "http://db:19530"
    assert client_uri("milvus-lite:vectors.milvus.db", folder) == str(folder / "vectors.milvus.db")
    with pytest.raises(CaseIndexError, match="is not a Milvus address"):
        normalise_uri("postgres://db", folder)
