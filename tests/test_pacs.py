"""The PACS paths against a real Orthanc (Debian orthanc + orthanc-dicomweb, started by the test):
indexing over DICOMweb, faults, query by study, the app's "From PACS", and the DICOM listener.

The archive uploaded to Orthanc: the real abdomen series (tests/data), two phantom studies with fake
identifiers (a CT series each; one with a Basic Text SR, a localizer and a secondary capture; the other
with an MR series and a broken CT series, its report in a CSV by accession number).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from cli_errors import one_sentence
from dicom_factory import FAKE_PHI, write_series, write_text_report
from orthanc import AVAILABLE, SKIP_REASON, FaultyProxy, Orthanc, free_port
from pydicom.uid import generate_uid

from medfinder.errors import CaseIndexError
from medfinder.index import CaseIndex
from medfinder.io.deidentify import series_case_id
from medfinder.io.dicom import LOCALIZER, SECONDARY_CAPTURE, TEXT_REPORT
from medfinder.io.dicomweb import (
    FETCH_FAILED,
    NOT_A_VOLUME,
    PacsClient,
    parse_pacs_source,
)

pytestmark = pytest.mark.skipif(not AVAILABLE, reason=SKIP_REASON)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
P2_PHI = {"PatientName": "Roe^Richard^Fakeperson", "PatientID": "FAKE-ID-77", "AccessionNumber": "ACC-FAKE-88001"}
P2_REPORT = "Findings: Cardiomegaly. No pleural effusion."
P1_REPORT = "Right pleural effusion with basal atelectasis."
SR_ONLY_WORDS = "Fakedoc"  # the SR's observer name (a PNAME item) must never reach a report
MR = "modality MR, not CT"


def _uids(paths: list[Path]) -> set[str]:
    found = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    return found


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """A running Orthanc holding the test archive, and what a test needs to know of it."""
    root = tmp_path_factory.mktemp("pacs")
    listener_port = free_port()
    server = Orthanc(root / "orthanc", modalities={"medfinder": ("MEDFINDER", listener_port)}).start()
    files = root / "files"
    abdomen = sorted(DATA.glob("abdomen_ct_dicom/*"))
    first = pydicom.dcmread(abdomen[0], stop_before_pixels=True)
    p1, p2 = generate_uid(), generate_uid()
    p1_ct = write_series(files / "p1_ct", n=8, rows=48, cols=48, study_uid=p1)
    p1_sr = [write_text_report(files / "p1_sr" / "sr.dcm", p1, {"Findings": P1_REPORT, "Impressions": "Effusion."})]
    p1_loc = write_series(files / "p1_loc", n=1, rows=48, cols=48, study_uid=p1,
                          image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    p1_sc = write_series(files / "p1_sc", n=1, rows=48, cols=48, study_uid=p1, sop_class="1.2.840.10008.5.1.4.1.1.7")
    p2_ct = write_series(files / "p2_ct", n=10, rows=40, cols=44, step=3.0, study_uid=p2, phi_values=P2_PHI)
    p2_mr = write_series(files / "p2_mr", n=4, modality="MR", study_uid=p2, phi_values=P2_PHI)
    # Two more CT series in P2, neither its main one: fewer slices (axial), and more slices but coronal.
    p2_thin = write_series(files / "p2_thin", n=6, rows=40, cols=44, step=1.5, study_uid=p2, phi_values=P2_PHI)
    p2_coronal = write_series(files / "p2_coronal", n=12, rows=40, cols=44, study_uid=p2, phi_values=P2_PHI,
                              orientation=[1, 0, 0, 0, 0, -1],
                              positions=[[-10.0, -12.0 + 2.0 * k, 100.0] for k in range(12)])
    gap = [[-10.0, -12.0, 100.0 + z] for z in (0, 2, 4, 10, 12, 14)]  # slices missing in the middle
    p2_broken = write_series(files / "p2_broken", n=6, rows=40, cols=44, positions=gap, study_uid=p2, phi_values=P2_PHI)
    uploaded = [*abdomen, *p1_ct, *p1_sr, *p1_loc, *p1_sc, *p2_ct, *p2_thin, *p2_coronal, *p2_mr, *p2_broken]
    server.upload(uploaded)
    identifiers = set(FAKE_PHI.values()) | set(P2_PHI.values()) | {"19470312", "Fakeperson", "FAKE-ID", "ACC-FAKE"}
    state = SimpleNamespace(
        server=server, root=root, files=files, listener_port=listener_port,
        abdomen=(str(first.StudyInstanceUID), str(first.SeriesInstanceUID)),
        p1=(p1, str(pydicom.dcmread(p1_ct[0]).SeriesInstanceUID)),
        p2=(p2, str(pydicom.dcmread(p2_ct[0]).SeriesInstanceUID)),
        p2_others=[str(pydicom.dcmread(s[0]).SeriesInstanceUID) for s in (p2_thin, p2_coronal)],
        uids=_uids(uploaded), identifiers=identifiers, cases=5,
    )
    yield state
    server.stop()


def _clean(blob: bytes | str, pacs: SimpleNamespace, where: str, uids: bool = True) -> None:
    data = blob.encode() if isinstance(blob, str) else blob
    for value in pacs.identifiers | (pacs.uids if uids else set()):
        assert value.encode() not in data, f"an identifier ({value[:12]}...) leaked into {where}"


def _clean_folder(folder: Path, pacs: SimpleNamespace, uids: bool = True) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            _clean(path.read_bytes(), pacs, f"the index file {path.name}", uids)


def _env(pacs: SimpleNamespace, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDFINDER_")}
    return {**env, **pacs.server.env(), **extra}


def _cli(pacs: SimpleNamespace, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env or _env(pacs), capture_output=True,
                          text=True, timeout=timeout)



def index_records(index: Path, case_ids: set[str]) -> list:
    with CaseIndex.open(index) as opened:
        return opened.get_many(sorted(case_ids))


def _key(index: Path) -> bytes:
    return (index / "case_id.key").read_bytes()


@pytest.fixture(scope="module")
def pacs_index(pacs, tiny_model_dir, tmp_path_factory):
    """The archive indexed by the command line, reports from SRs and from a CSV by accession number."""
    out = tmp_path_factory.mktemp("pacs_index") / "index"
    reports = pacs.root / "reports.csv"
    reports.write_text(f"AccessionNumber,report\n{P2_PHI['AccessionNumber']},{P2_REPORT}\n")
    proc = _cli(pacs, "index_build", "--dicomweb", pacs.server.dicomweb, "--out", str(out), "--model",
                str(tiny_model_dir), "--reports", str(reports), "--commit-every", "0")
    assert proc.returncode == 0, proc.stderr
    return SimpleNamespace(out=out, proc=proc, summary=json.loads(proc.stdout))


def test_build_counts_cases_and_skip_reasons_and_attaches_reports(pacs, pacs_index):
    summary = pacs_index.summary
    assert summary["added"] == 5 and summary["failed"] == 0, summary
    assert summary["skipped"] == {MR: 1, LOCALIZER: 1, SECONDARY_CAPTURE: 1, TEXT_REPORT: 1, NOT_A_VOLUME: 1}
    key = _key(pacs_index.out)
    ids = {name: series_case_id(key, getattr(pacs, name)[1]) for name in ("abdomen", "p1", "p2")}
    others = {series_case_id(key, uid) for uid in pacs.p2_others}
    with CaseIndex.open(pacs_index.out) as index:
        assert index.case_ids() == set(ids.values()) | others
        cases = {c.case_id: c for c in index.get_many(list(ids.values()))}
        info = index.info()
    assert P1_REPORT in cases[ids["p1"]].report and "Findings:" in cases[ids["p1"]].report  # the SR, by section
    assert SR_ONLY_WORDS not in cases[ids["p1"]].report
    assert cases[ids["p2"]].report == P2_REPORT  # the CSV, by accession number, for each CT series of the study
    assert all(c.report == P2_REPORT for c in index_records(pacs_index.out, others))
    assert cases[ids["abdomen"]].report == "" and cases[ids["abdomen"]].shape == (512, 512, 20)
    assert any(f["name"] == "Pleural effusion" and f["status"] == "affirmed" for f in cases[ids["p1"]].findings)
    assert info["settings"]["identifiable"] is False and info["settings"]["source"] == "dicomweb"
    assert oct((pacs_index.out / "case_id.key").stat().st_mode & 0o777) == "0o600"
    # The broken series was named by its keyed id in the log, with its reason.
    assert "unevenly spaced" in pacs_index.proc.stderr and "left out" in pacs_index.proc.stderr


def test_no_identifier_or_uid_in_the_index_folder_or_any_output(pacs, pacs_index):
    _clean(pacs_index.proc.stdout + pacs_index.proc.stderr, pacs, "index_build's output")
    _clean_folder(pacs_index.out, pacs)


def test_rerun_adds_nothing_then_only_a_series_uploaded_in_between(pacs, pacs_index, tiny_model_dir, capsys, caplog):
    from medfinder.cli import main

    args = ["--dicomweb", pacs.server.dicomweb, "--out", str(pacs_index.out), "--model", str(tiny_model_dir), "--quiet"]
    os.environ.update(pacs.server.env())
    try:
        assert main(args, command="build") == 0
        again = json.loads(capsys.readouterr().out)
        assert again["added"] == 0 and again["skipped_already_indexed"] == 5, again
        study = generate_uid()
        new = write_series(pacs.files / "p3_ct", n=9, rows=36, cols=36, study_uid=study,
                           phi_values={"AccessionNumber": "ACC-FAKE-99003"})
        pacs.server.upload(new)
        pacs.uids |= _uids(new)
        pacs.cases += 1
        assert main(args + ["--since", "20190101"], command="build") == 0
        out = capsys.readouterr()
        third = json.loads(out.out)
    finally:
        for name in pacs.server.env():
            os.environ.pop(name, None)
    assert third["added"] == 1 and third["skipped_already_indexed"] == 5, third
    with CaseIndex.open(pacs_index.out) as index:
        assert len(index) == 6 and series_case_id(_key(pacs_index.out), pydicom.dcmread(new[0]).SeriesInstanceUID) in index
    _clean(out.out + out.err + caplog.text, pacs, "a re-run's output")
    _clean_folder(pacs_index.out, pacs)


def test_search_by_study_uid_finds_the_real_series_itself_at_rank_1(pacs, pacs_index, tiny_model_dir):
    key = _key(pacs_index.out)
    proc = _cli(pacs, "medfinder", "search", "--index", str(pacs_index.out), "--model", str(tiny_model_dir),
                "--dicomweb", pacs.server.dicomweb, "--study", pacs.abdomen[0], "-k", "3", "--json",
                "--channel", "image")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    # Image to image: the fused ranking would also weigh image-to-report, where a case without a
    # report (as this one) has no rank at all.
    assert results[0]["case_id"] == series_case_id(key, pacs.abdomen[1]) and results[0]["rank"] == 1
    assert results[0]["channels"]["image"]["score"] > 0.999
    _clean(proc.stdout + proc.stderr, pacs, "search output")


def test_search_by_accession_takes_the_main_series_and_unknown_study(pacs, pacs_index, tiny_model_dir):
    from medfinder.pacs import search_by_study, study_volume
    from medfinder.search import Searcher

    client = PacsClient(pacs.server.dicomweb, env=pacs.server.env())
    # P2 holds three valid CT volumes: 10 axial slices, 6 thinner axial ones, 12 coronal ones.
    main = study_volume(client, P2_PHI["AccessionNumber"])
    assert main.shape == (44, 40, 10) and main.metadata["slice_step_mm"] == 3.0
    assert main.source.endswith("of the PACS study")  # never named by its UIDs
    searcher = Searcher.open(pacs_index.out, tiny_model_dir)
    results = search_by_study(searcher, client, P2_PHI["AccessionNumber"], k=2, channels=["image"])
    assert results[0].case_id == series_case_id(_key(pacs_index.out), pacs.p2[1])
    with pytest.raises(Exception) as info:
        search_by_study(searcher, client, "ACC-NOT-THERE", k=2)
    assert "No study" in str(info.value) and "ACC-NOT-THERE" not in str(info.value)
    proc = _cli(pacs, "medfinder", "search", "--index", str(pacs_index.out), "--study", pacs.abdomen[0])
    one_sentence(proc, "--study and --dicomweb go together")


def test_link_to_pacs_keeps_uids_says_so_and_the_app_opens_the_viewer(pacs, tiny_model_dir, tmp_path, monkeypatch):
    from medfinder.app import handlers
    from medfinder.app.service import AppSettings, Service, install
    from medfinder.app.uploads import UploadFolder
    from medfinder.pacs import build_from_dicomweb

    monkeypatch.setenv("MEDFINDER_DICOMWEB_USER", pacs.server.user)
    monkeypatch.setenv("MEDFINDER_DICOMWEB_PASSWORD", pacs.server.password)
    out = tmp_path / "linked"
    summary = build_from_dicomweb(pacs.server.dicomweb, out, model=tiny_model_dir, link_to_pacs=True, progress=False)
    assert summary.added == pacs.cases
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["settings"]["identifiable"] is True and "UIDs" in manifest["settings"]["identifiers"]
    with CaseIndex.open(out) as index:
        sources = {parse_pacs_source(c.source) for c in index.get_many(sorted(index.case_ids()))}
    assert pacs.abdomen in sources and pacs.p1 in sources
    refused = _cli(pacs, "index_build", "--dicomweb", pacs.server.dicomweb, "--out", str(out), "--model",
                   str(tiny_model_dir))
    one_sentence(refused, "--link-to-pacs")

    uploads = UploadFolder()
    settings = AppSettings(index=out, model=str(tiny_model_dir), dicomweb=pacs.server.dicomweb,
                           viewer_url="http://viewer.example/ohif/viewer?StudyInstanceUIDs={study}&series={series}")
    install(Service(settings, uploads))
    try:
        shown = handlers.on_pacs(pacs.p1[0], "Similar cases", "axial", 0.5, 1500, -600, True,
                                 progress=lambda *a, **k: None)
    finally:
        uploads.remove()
    # on_pacs gives the query (volume, its text, the study box), the SEARCH outputs, then the CASE outputs.
    volume, volume_text, study_box, results, head = shown[0], shown[1], shown[2], shown[3], shown[14]
    by_image = {r.channels["image"].rank: r.case_id for r in results if "image" in r.channels}
    assert volume.shape == (48, 48, 8) and by_image[1] == series_case_id(_key(out), pacs.p1[1])
    first = parse_pacs_source(results[0].source)  # the details line is the first result's
    assert f"StudyInstanceUIDs={first[0]}&series={first[1]}" in head and "Open in PACS viewer" in head
    assert study_box == ""  # the typed UID is cleared
    _clean(volume_text + volume.source + json.dumps(volume.metadata), pacs, "the query's description")


def test_app_from_pacs_on_a_plain_index_shows_no_link(pacs, pacs_index, tiny_model_dir, monkeypatch):
    import gradio as gr

    from medfinder.app import handlers
    from medfinder.app.service import AppSettings, Service, install
    from medfinder.app.uploads import UploadFolder

    monkeypatch.setenv("MEDFINDER_DICOMWEB_USER", pacs.server.user)
    monkeypatch.setenv("MEDFINDER_DICOMWEB_PASSWORD", pacs.server.password)
    uploads = UploadFolder()
    install(Service(AppSettings(index=pacs_index.out, model=str(tiny_model_dir), dicomweb=pacs.server.dicomweb,
                                viewer_url="http://viewer.example/{study}/{series}"), uploads))
    try:
        shown = handlers.on_pacs(P2_PHI["AccessionNumber"], "Similar cases", "axial", 0.5, 1500, -600, True,
                                 progress=lambda *a, **k: None)
        with pytest.raises(gr.Error) as info:
            handlers.on_pacs("1.2.3.4.5.6.7", "Similar cases", "axial", 0.5, 1500, -600, True,
                             progress=lambda *a, **k: None)
    finally:
        uploads.remove()
    # By image, the study's main series finds itself first (its sibling series share its report, so the
    # fused order among them is a tie broken by the report channel).
    by_image = {r.channels["image"].rank: r.case_id for r in shown[3] if "image" in r.channels}
    assert by_image[1] == series_case_id(_key(pacs_index.out), pacs.p2[1])
    sys.path.insert(0, str(REPO))
    try:
        import app  # the layout offers "From PACS" when MEDFINDER_DICOMWEB is set
    finally:
        sys.path.remove(str(REPO))
    blocks = app.build_app(install(Service(AppSettings(index=pacs_index.out, model=str(tiny_model_dir),
                                                       dicomweb=pacs.server.dicomweb), uploads)))
    assert any(getattr(b, "elem_id", None) == "pacs-study" for b in blocks.blocks.values())
    assert "Open in PACS viewer" not in shown[14] and "viewer.example" not in shown[14]
    assert "No study" in str(info.value) and "1.2.3.4.5.6.7" not in str(info.value)
    _clean(shown[1] + shown[13] + shown[14] + json.dumps([r.to_json() for r in shown[3]]), pacs, "the app's answer")


def test_wrong_credentials_bad_urls_and_options_are_one_sentence(pacs, tmp_path, tiny_model_dir):
    out = str(tmp_path / "index")
    wrong = _env(pacs, MEDFINDER_DICOMWEB_PASSWORD="not-the-password-4711")
    proc = _cli(pacs, "index_build", "--dicomweb", pacs.server.dicomweb, "--out", out, env=wrong)
    assert "not-the-password-4711" not in proc.stdout + proc.stderr
    one_sentence(proc, "authentication", "401")
    assert not Path(out).exists()  # nothing written before the server said yes
    token = _env(pacs, MEDFINDER_DICOMWEB_TOKEN="tok-secret-0815")
    proc = _cli(pacs, "index_build", "--dicomweb", pacs.server.dicomweb, "--out", out, env=token)
    assert "tok-secret-0815" not in proc.stderr
    one_sentence(proc, "authentication")
    one_sentence(_cli(pacs, "index_build", "--dicomweb", pacs.server.url, "--out", out), "does not answer as a DICOMweb")
    one_sentence(_cli(pacs, "index_build", "--dicomweb", f"http://127.0.0.1:{free_port()}/dicom-web", "--out", out),
                  "Cannot reach")
    proc = _cli(pacs, "index_build", "--dicomweb", f"http://someone:pw-9911@127.0.0.1:{pacs.server.http_port}/dicom-web",
                "--out", out)
    assert "pw-9911" not in proc.stderr
    one_sentence(proc, "must not hold credentials")
    one_sentence(_cli(pacs, "index_build", "--dicomweb", pacs.server.dicomweb, "--out", out, "--since", "2024-01-01"),
                  "--since", "YYYYMMDD")
    one_sentence(_cli(pacs, "index_build", "--manifest", "x.csv", "--out", out, "--link-to-pacs"), "--dicomweb")
    one_sentence(_cli(pacs, "index_build", "--dicomweb", pacs.server.dicomweb, "--out", out, "--workers", "2"),
                  "--workers")


def test_timeouts_and_5xx_are_retried_and_a_failing_series_is_skipped(pacs, tiny_model_dir, tmp_path, caplog):
    """Through a proxy that answers 503 twice to every series retrieval, never answers the abdomen's in
    time on the first try, and always answers 500 for one phantom series."""
    from medfinder.pacs import build_from_dicomweb

    abdomen, failing = pacs.abdomen[1], pacs.p1[1]

    def rule(method: str, path: str, attempt: int):
        if "/series/" not in path or "?" in path:
            return None  # searches pass
        if failing in path:
            return ("status", 500)
        if abdomen in path and attempt == 1:
            return ("delay", 2.5)
        if attempt <= 2:
            return ("status", 503)
        return None

    proxy = FaultyProxy(pacs.server.url, rule)
    try:
        client = PacsClient(proxy.url + "/dicom-web", timeout_s=1.0, retries=3, backoff_s=0.05, env=pacs.server.env())
        summary = build_from_dicomweb(proxy.url + "/dicom-web", tmp_path / "index", model=tiny_model_dir,
                                      client=client, progress=False)
    finally:
        proxy.close()
    assert summary.added == pacs.cases - 1 and summary.skipped[FETCH_FAILED] == 1, summary.to_json()
    # The first try and 3 retries (a retry whose connection the busy proxy did not accept in time is not seen).
    assert 2 <= max(n for p, n in proxy.seen.items() if failing in p) <= 4, proxy.seen
    assert all(n >= 3 for p, n in proxy.seen.items() if "/series/" in p and "?" not in p)
    _clean(caplog.text + json.dumps(summary.to_json()), pacs, "the build's log")


def _committed(out: Path) -> int:
    try:
        return CaseIndex.read_info(out)["counts"]["cases"]
    except CaseIndexError:
        return 0


def test_kill_mid_build_and_a_server_that_dies_lose_nothing_committed(tiny_model_dir, tmp_path):
    """SIGKILL a build mid-way; then stop the PACS mid-way through the next; restart it and finish."""
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        for i in range(7):
            server.upload(write_series(tmp_path / f"s{i}", n=8 + i, rows=40, cols=40))
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MEDFINDER_")}, **server.env()}
        out = tmp_path / "index"
        proxy = FaultyProxy(server.url, lambda m, path, a: ("delay", 0.4) if "/series/" in path and "?" not in path
                            else None)

        def build(url: str) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "index_build", "--dicomweb", url, "--out", str(out),
                                     "--model", str(tiny_model_dir), "--batch-size", "1", "--commit-every", "0",
                                     "--quiet"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)

        def wait_for_more_than(proc: subprocess.Popen, count: int) -> None:
            deadline = time.monotonic() + 120
            while _committed(out) <= count and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)

        first = build(proxy.url + "/dicom-web")
        wait_for_more_than(first, 0)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        proxy.close()
        killed_at = _committed(out)
        assert first.returncode == -signal.SIGKILL and 0 < killed_at < 7
        with CaseIndex.open(out) as index:
            assert len(index) == killed_at

        second = build(server.dicomweb)
        wait_for_more_than(second, killed_at)
        server.stop(kill=True)
        _, err = second.communicate(timeout=120)
        stopped_at = _committed(out)
        assert second.returncode == 2 and killed_at < stopped_at < 7, err
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING")]
        assert len(lines) == 1 and "Cannot reach the DICOMweb server" in lines[0] and "Traceback" not in err, err
        with CaseIndex.open(out) as index:  # intact, checksums and all
            assert len(index) == stopped_at

        server.start()
        third = build(server.dicomweb)
        stdout, err = third.communicate(timeout=300)
        assert third.returncode == 0, err
        summary = json.loads(stdout)
        assert summary["added"] == 7 - stopped_at and summary["skipped_already_indexed"] == stopped_at
        with CaseIndex.open(out) as index:
            assert len(index) == len(index.case_ids()) == 7
            assert index.info()["counts"]["image"] == 7  # one image vector each (no reports here)
    finally:
        server.stop()


def test_listener_takes_studies_from_orthanc_and_from_a_storescu(pacs, tiny_model_dir, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    out, spool = tmp_path / "listened", tmp_path / "tmp"
    spool.mkdir()
    env = _env(pacs, TMPDIR=str(spool))
    proc = subprocess.Popen([sys.executable, "-m", "medfinder", "listen", "--index", str(out), "--port",
                             str(pacs.listener_port), "--host", "127.0.0.1", "--allow", "ORTHANC", "--allow", "STORESCU",
                             "--settle", "1", "--model", str(tiny_model_dir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("listening" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        # 1. Orthanc sends study P1 (CT series, text SR, localizer, secondary capture) to "medfinder".
        pacs.server.send("medfinder", [pacs.p1[0]])
        key = _key(out)
        p1_case = series_case_id(key, pacs.p1[1])
        deadline = time.monotonic() + 60
        while _committed(out) < 1:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        with CaseIndex.open(out) as index:
            assert index.case_ids() == {p1_case}
            assert P1_REPORT in index.get(p1_case).report
        assert not list(spool.rglob("*.dcm"))  # received files are deleted once indexed

        # 2. A storescu (pynetdicom's own SCU) sends a series; an AE title not allowed is rejected.
        series = write_series(tmp_path / "scu", n=7, rows=40, cols=40)
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", pacs.listener_port, ae_title="MEDFINDER")
        assert assoc.is_established
        statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in series]
        assoc.release()
        assert statuses == [0] * 7
        intruder = AE(ae_title="INTRUDER")
        intruder.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        rejected = intruder.associate("127.0.0.1", pacs.listener_port, ae_title="MEDFINDER")
        assert rejected.is_rejected
        deadline = time.monotonic() + 60
        while _committed(out) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        assert series_case_id(key, pydicom.dcmread(series[0]).SeriesInstanceUID) in CaseIndex.open(out).case_ids()
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
        reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)
    summary = json.loads(stdout)
    assert summary["added"] == 2 and summary["skipped"][LOCALIZER] == 1 and summary["skipped"][TEXT_REPORT] == 1
    assert not list(spool.glob("medfinder-listener-*"))  # the spool folder is removed on exit
    pacs.uids |= _uids(series)
    _clean(stdout + "".join(lines), pacs, "the listener's output")
    _clean_folder(out, pacs)
