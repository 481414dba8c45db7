"""The app as it ships: ``python app.py`` started as a user starts it, driven through its public API
(gradio_client) and in a real browser (Debian Chromium + playwright); and its service in-process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update"]
#: A first start builds the demo index: painting and encoding DEMO_CASES phantoms takes a while.
START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running_app(tmp_path_factory):
    """``python app.py`` on a fresh machine: no index yet, so its first start builds the demo index
    (a 12-phantom corpus, MEDFINDER_DEMO_CASES) and the example scans, then serves."""
    root = tmp_path_factory.mktemp("app")
    temp = root / "tmp"  # the app's private upload folder is made under TMPDIR
    temp.mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDFINDER_")}
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", TMPDIR=str(temp),
               MEDFINDER_DEMO_INDEX=str(root / "demo_index"), MEDFINDER_DEMO_CASES="12")
    log = open(root / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"app.py exited with {proc.returncode}:\n{(root / 'app.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"app.py did not serve within {START_TIMEOUT_S} s:\n{(root / 'app.log').read_text()[-3000:]}")
        time.sleep(1.0)
    uploads = list(temp.glob("medfinder-uploads-*"))
    assert len(uploads) == 1, uploads
    yield SimpleNamespace(url=url, proc=proc, uploads=uploads[0], index=root / "demo_index", log=root / "app.log")
    proc.terminate()  # SIGTERM, as a service manager or a Space stops it
    assert proc.wait(timeout=60) == 0
    log.close()
    # Nothing a user uploaded survives the process: the private upload folder is gone.
    assert not uploads[0].exists()


@pytest.fixture(scope="module")
def client(running_app):
    from gradio_client import Client

    return Client(running_app.url, verbose=False)


def _corpus_image(running_app) -> Path:
    return sorted((running_app.index.parent / f"{running_app.index.name}_corpus" / "images").glob("*.nii.gz"))[0]


def test_first_start_builds_the_demo_index_with_the_demo_model(running_app):
    from medfinder.demo import DEMO_MODEL_DIR
    from medfinder.index import CaseIndex
    from medfinder.model import read_fingerprint

    info = CaseIndex.read_info(running_app.index)
    assert info["counts"]["cases"] == 12
    assert info["model"]["fingerprint"] == read_fingerprint(DEMO_MODEL_DIR)
    assert "Building the demo index" in running_app.log.read_text()


def test_text_search_api_returns_ranked_cases_with_highlights(client):
    results = client.predict("pleural effusion", [], [], "any", 0, 100, 5, api_name="/search_text")
    assert 1 <= len(results) <= 5
    assert [r["rank"] for r in results] == list(range(1, len(results) + 1))
    first = results[0]
    assert {"case_id", "score", "channels", "report", "highlights", "findings"} <= set(first)
    assert "".join(text for text, _ in first["highlights"]) == first["report"]
    assert any(label in ("match", "negated") for _, label in first["highlights"])
    assert "evidence" not in first  # computed only when asked for: it costs a backward pass per case


def test_the_api_gives_evidence_inside_each_cases_scan_when_asked(client):
    results = client.predict("pleural effusion", [], [], "any", 0, 100, 3, True, api_name="/search_text")
    assert len(results) == 3
    for r in results:
        assert r["evidence"], r["case_id"]
        for point in r["evidence"]:
            assert len(point["ras_mm"]) == 3 and point["source"] in ("image", "report")
            assert all(abs(c) < 1000 for c in point["ras_mm"])  # millimetres inside a chest, not voxels
    # The report places the queried finding: its point is labelled with it.
    assert any(p["source"] == "report" and p["finding"] == "Pleural effusion" for r in results for p in r["evidence"])


def test_image_search_api_finds_the_scan_itself_and_case_details(client, running_app):
    from gradio_client import handle_file

    image = _corpus_image(running_app)
    results = client.predict(handle_file(str(image)), "Similar cases", 12, api_name="/search_image")
    assert len(results) == 12
    same = next(r for r in results if r["case_id"] in image.name)
    assert same["channels"]["image"]["rank"] == 1
    details = client.predict(same["case_id"], api_name="/case_details")
    assert details["case_id"] == same["case_id"] and details["report"]


def test_corrupt_upload_is_a_clean_error_and_the_app_keeps_serving(client, running_app, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + b"not really gzip" * 20)
    with pytest.raises(Exception) as info:
        client.predict(handle_file(str(bad)), "Similar cases", 3, api_name="/search_image")
    assert "corrupt.nii.gz" in str(info.value)
    assert client.predict("cardiomegaly", [], [], "any", 0, 100, 3, api_name="/search_text")
    # The upload is deleted as soon as it has been read, even when it was refused.
    assert list(running_app.uploads.rglob("*.nii.gz")) == []


def test_empty_text_query_is_refused(client):
    with pytest.raises(Exception, match="Type findings"):
        client.predict("   ", [], [], "any", 0, 100, 3, api_name="/search_text")


def test_phi_in_an_uploaded_dicom_never_comes_back_and_the_upload_is_deleted(client, running_app, tmp_path):
    import json

    from dicom_factory import FAKE_PHI, write_series
    from gradio_client import handle_file

    write_series(tmp_path / "s", n=8, rows=48, cols=48)
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in (tmp_path / "s").iterdir():
            zf.write(f, f.name)
    results = client.predict(handle_file(str(archive)), "Similar cases", 5, api_name="/search_image")
    assert results
    text = json.dumps(results)
    for value in FAKE_PHI.values():
        assert value not in text
    assert list(running_app.uploads.rglob("upload*.zip")) == []


def _browser(pw):
    return pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)


#: How many lines each header of the per-channel table takes, counted from the text's line boxes.
HEADER_LINES_JS = """() => Array.from(document.querySelectorAll('#scores thead th')).map(th => {
    const text = th.querySelector('span.header') || th;
    const range = document.createRange(); range.selectNodeContents(text);
    const tops = new Set(Array.from(range.getClientRects()).filter(r => r.width > 1).map(r => Math.round(r.top)));
    return [th.innerText.trim(), tops.size]; }).filter(([text]) => text.length)"""


def _settle(page) -> None:
    """Wait until no event is running (no "processing" overlay), for a screenshot of the page at rest."""
    page.wait_for_function("() => !document.body.innerText.includes('processing')", timeout=60_000)
    time.sleep(0.5)


def _slices(text: str) -> dict[str, tuple[int, int]]:
    """'axial 34/128, coronal 80/160, ...' from the case-focus line, as {plane: (slice, of)}."""
    import re

    return {plane: (int(a), int(b)) for plane, a, b in re.findall(r"(axial|coronal|sagittal) (\d+)/(\d+)", text)}


def _at_centre(slices: dict[str, tuple[int, int]]) -> bool:
    return all(abs(k - (n + 1) / 2) <= 1 for k, n in slices.values())


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed")
def test_browser_text_search_evidence_example_ct_and_viewer(running_app, tmp_path):
    from playwright.sync_api import sync_playwright

    image = _corpus_image(running_app)
    with sync_playwright() as pw:
        browser = _browser(pw)
        page = browser.new_page(viewport={"width": 1280, "height": 1300})
        page.goto(running_app.url, wait_until="load", timeout=60_000)
        page.locator("#text-query textarea").wait_for(timeout=60_000)
        assert "synthetic phantoms" in page.content()
        page.locator("#text-query textarea").fill("pleural effusion")
        page.locator("#text-search").click()
        page.locator("#results img").first.wait_for(timeout=60_000)
        page.locator("#report .token.highlighted").first.wait_for(timeout=30_000)
        assert "effusion" in page.locator("#report .token.highlighted").first.inner_text()
        # A text search has no query CT: its viewer is hidden and the selected case has the room.
        assert not page.locator("#query-view").is_visible()
        # The best match opens at its evidence, in three planes, away from the scan's centre.
        page.wait_for_function("() => document.querySelector('#case-focus').innerText.includes('Evidence')",
                               timeout=60_000)
        first = page.locator("#case-focus").inner_text()
        assert len(_slices(first)) == 3 and not _at_centre(_slices(first)), first
        page.locator("#result-view img").wait_for(timeout=30_000)
        # Selecting another result moves the viewer to that case's evidence.
        page.locator("#results img").nth(1).click()
        page.wait_for_function("(before) => document.querySelector('#case-focus').innerText !== before",
                               arg=first, timeout=60_000)
        second = page.locator("#case-focus").inner_text()
        assert not _at_centre(_slices(second)), second
        # Every header of the per-channel table on at most two lines, at 1280 and at 1600 px.
        for width in (1280, 1600):
            page.set_viewport_size({"width": width, "height": 1300})
            time.sleep(0.5)
            lines = page.evaluate(HEADER_LINES_JS)
            assert lines and all(n <= 2 for _, n in lines), (width, lines)
        page.set_viewport_size({"width": 1400, "height": 1300})
        _settle(page)
        page.screenshot(path=str(tmp_path / "text_search.png"), full_page=True)

        page.get_by_role("tab", name="Search by CT").click()
        # An example from the dropdown: the app painted these on its first start.
        page.locator("#ct-example input").click()
        page.get_by_role("option").filter(has_text="synthetic").first.click()
        page.locator("#image-search").click()
        query_img = page.locator("#query-view img")
        query_img.wait_for(timeout=60_000)
        # The query scan's slices are inlined, never written to the server's file cache.
        assert query_img.get_attribute("src").startswith("data:image/png;base64,")

        page.locator("#ct-upload input[type=file]").set_input_files(str(image))
        time.sleep(1.0)
        before = query_img.get_attribute("src")
        page.locator("#image-search").click()
        page.wait_for_function(
            "(before) => { const i = document.querySelector('#query-view img'); return i && i.src !== before; }",
            arg=before, timeout=60_000)
        before = query_img.get_attribute("src")
        slider = page.locator("#slice input[type=range]")
        slider.fill("0.2")
        slider.dispatch_event("input")
        page.wait_for_function(
            "(before) => { const i = document.querySelector('#query-view img'); return i && i.src !== before; }",
            arg=before, timeout=30_000)
        # Clicking a finding in the report moves the viewer to that finding's evidence.
        page.wait_for_function("() => document.querySelector('#case-focus').innerText.includes('open at')",
                               timeout=60_000)
        before = page.locator("#case-focus").inner_text()
        tokens = page.locator("#report .token.highlighted")
        tokens.first.wait_for(timeout=30_000)
        moved = False
        for i in range(min(tokens.count(), 6)):
            tokens.nth(i).click()
            try:
                page.wait_for_function("(before) => document.querySelector('#case-focus').innerText !== before",
                                       arg=before, timeout=20_000)
                moved = True
                break
            except Exception:
                continue
        assert moved, "clicking a finding in the report did not move the viewer"
        _settle(page)
        page.screenshot(path=str(tmp_path / "ct_compare.png"), full_page=True)
        browser.close()
    assert (tmp_path / "text_search.png").stat().st_size > 10_000
    if os.environ.get("MEDFINDER_SCREENSHOTS"):
        for name in ("text_search.png", "ct_compare.png"):
            shutil.copy(tmp_path / name, Path(os.environ["MEDFINDER_SCREENSHOTS"]) / name)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed")
def test_browser_upload_of_a_dicom_series_shows_no_identifier_anywhere(running_app, tmp_path):
    """A DICOM series carrying a fake name, ID, birth date and accession number, uploaded file by file
    through the browser: none of them appears in the page, the volume-info pane included."""
    from dicom_factory import FAKE_PHI, write_series
    from playwright.sync_api import sync_playwright

    files = write_series(tmp_path / "series", n=8, rows=48, cols=48)
    with sync_playwright() as pw:
        browser = _browser(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(running_app.url, wait_until="load", timeout=60_000)
        page.get_by_role("tab", name="Search by CT").click()
        page.locator("#ct-upload input[type=file]").set_input_files([str(f) for f in files])
        time.sleep(1.0)
        page.locator("#image-search").click()
        page.locator("#query-view img").wait_for(timeout=60_000)
        info = page.locator("#volume-info")
        page.wait_for_function("() => document.querySelector('#volume-info').innerText.includes('voxels')",
                               timeout=30_000)
        pane = info.inner_text()
        assert "study_year: 2019" in pane  # the pane shows the header's safe fields...
        page.locator("#results img").first.wait_for(timeout=60_000)
        html = page.content()
        browser.close()
    for value in [*FAKE_PHI.values(), "Fakeperson", "FAKE-ID", "ACC-FAKE", "1947"]:
        assert value not in pane, f"{value!r} is shown in the volume-info pane"  # ...and no identifier
        assert value not in html, f"{value!r} is in the page"
    assert list(running_app.uploads.rglob("IM*")) == []


# ------------------------------------------------------------------ the service, in-process
@pytest.fixture
def service(tiny_index, tiny_model_dir):
    from medfinder.app.service import AppSettings, Service, install
    from medfinder.app.uploads import UploadFolder

    uploads = UploadFolder()
    yield install(Service(AppSettings(index=tiny_index, model=str(tiny_model_dir)), uploads))
    uploads.remove()


def test_an_uploaded_ct_can_be_searched_again_and_paged(service, tiny_corpus):
    from medfinder.app import handlers

    upload = service.uploads.path / "a1b2" / "scan.nii.gz"  # where gradio puts an upload
    upload.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(next(tiny_corpus.parent.glob("images/*.nii.gz")), upload)
    view = ("axial", 1500, -600, True)

    first = handlers.on_image([str(upload)], None, "Similar cases", None, "axial", 0.5, 1500, -600, True,
                              progress=lambda *a, **k: None)
    volume, upload_box, (results, _, _, k, last) = first[0], first[2], first[4:9]
    assert not upload.exists() and upload_box is None  # read, deleted, and the file box cleared
    assert len(results) == k == 10 and last == ("image", "Similar cases")
    assert first[11] is not None and first[13] is not None  # the best match opens in the viewer

    # The file is gone; the loaded CT is not: asking for matching reports reuses it.
    second = handlers.on_image(None, None, "Matching reports", volume, "axial", 0.5, 1500, -600, True,
                               progress=lambda *a, **k: None)
    assert second[0] is volume and second[4] and second[4] != results

    # "More results" after a CT search pages that search (its mode, not one selected since),
    # even with the text box empty.
    more = handlers.on_more(last, volume, "", [], [], "any", 0, 100, *view, k)
    assert [r.case_id for r in more[0][:10]] == [r.case_id for r in results]
    assert len(more[0]) == 12 and more[3] == 20 and more[4] == last  # all 12 cases of the tiny index
    assert more[7] is not None  # the best match opens in the viewer, as the details say


def test_selecting_a_case_opens_it_at_its_evidence(service, tiny_corpus):
    """The viewer opens a result at its best evidence point (not the scan's centre), says where, and
    the evidence thumbnails redraw the cards."""
    import numpy as np

    from medfinder.app import handlers, views
    from medfinder.viewer import world_to_voxel

    results = handlers._text_results("pleural effusion", [], [], "any", 0, 100, 5)
    opened = handlers.open_case(results, 0, "axial", 1500, -600, True)
    _, volume, focus, picture, where = opened[:5]
    assert results[0].evidence, "no evidence was located for the first result"
    best = world_to_voxel(volume, results[0].evidence[0].ras_mm)
    assert np.allclose(focus, np.clip(best, 0, np.array(volume.shape) - 1))
    assert picture is not None and "Evidence, best first" in where
    assert len(handlers.evidence_thumbnails(results)) == len(results)
    assert views.table(results)[0][2:4] != ["", ""]


def test_a_refused_upload_is_deleted_too_and_one_sentence(service, tmp_path):
    import gradio as gr

    from medfinder.app import handlers

    upload = service.uploads.path / "c3d4" / "scan.nii.gz"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"not a scan")
    with pytest.raises(gr.Error) as info:
        handlers.on_image([str(upload)], None, "Similar cases", None, "axial", 0.5, 1500, -600, True,
                          progress=lambda *a, **k: None)
    assert "scan.nii.gz" in str(info.value) and "\n" not in str(info.value)
    assert not upload.exists()


def test_a_bad_setting_is_one_sentence_and_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDFINDER_")}
    env.update(MEDFINDER_INDEX=str(tmp_path / "no_such_index"), TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "app.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert len(lines) == 1 and "no_such_index" in lines[0], proc.stderr
    assert not list(tmp_path.glob("medfinder-uploads-*"))  # removed on the way out
