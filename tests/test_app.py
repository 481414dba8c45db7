"""The app through its public API (gradio_client) and in a real browser (Debian Chromium + playwright)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_app(tiny_index, tiny_model_dir):
    os.environ["MEDFINDER_INDEX"] = str(tiny_index)
    os.environ["MEDFINDER_MODEL"] = str(tiny_model_dir)
    import app as app_module

    app_module._searcher = None  # load this test's index, not the demo's
    app_module._example_paths = {}  # and do not generate the demo's example scans
    app_module.searcher()
    blocks = app_module.build_app()
    blocks.queue(default_concurrency_limit=4)
    port = _free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                  max_file_size=app_module.MAX_UPLOAD, run_history=False)
    yield app_module, f"http://127.0.0.1:{port}/"
    blocks.close()
    app_module._searcher = None
    os.environ.pop("MEDFINDER_INDEX")
    os.environ.pop("MEDFINDER_MODEL")


@pytest.fixture(scope="module")
def client(served_app):
    from gradio_client import Client

    return Client(served_app[1], verbose=False)


def test_text_search_api_returns_ranked_cases_with_highlights(client):
    results = client.predict("pleural effusion", [], [], "any", 0, 100, 5, api_name="/search_text")
    assert 1 <= len(results) <= 5
    assert [r["rank"] for r in results] == list(range(1, len(results) + 1))
    first = results[0]
    assert {"case_id", "score", "channels", "report", "highlights", "findings"} <= set(first)
    assert "".join(text for text, _ in first["highlights"]) == first["report"]
    assert any(label in ("match", "negated") for _, label in first["highlights"])


def test_image_search_api_and_case_details(client, tiny_corpus):
    from gradio_client import handle_file

    image = next(tiny_corpus.parent.glob("images/*.nii.gz"))
    results = client.predict(handle_file(str(image)), "Similar cases", 12, api_name="/search_image")
    assert len(results) == 12
    same = next(r for r in results if r["case_id"] in image.name)
    assert same["channels"]["image"]["rank"] == 1 and same["channels"]["image"]["score"] > 0.999
    details = client.predict(same["case_id"], api_name="/case_details")
    assert details["case_id"] == same["case_id"] and "report" in details


def test_corrupt_upload_is_a_clean_error_and_the_app_keeps_serving(client, tmp_path, served_app):
    from gradio_client import handle_file

    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + b"not really gzip" * 20)
    with pytest.raises(Exception) as info:
        client.predict(handle_file(str(bad)), "Similar cases", 3, api_name="/search_image")
    assert "corrupt.nii.gz" in str(info.value)
    assert client.predict("cardiomegaly", [], [], "any", 0, 100, 3, api_name="/search_text")
    # The upload is deleted as soon as it has been read, even when it was refused.
    app_module = served_app[0]
    leftovers = [p for p in app_module._UPLOAD_DIR.rglob("*.nii.gz")]
    assert leftovers == []


def _handler(blocks, name: str):
    return next(f.fn for f in blocks.fns.values() if getattr(f.fn, "__name__", "") == name)


def test_an_uploaded_ct_can_be_searched_again_and_paged(served_app, tiny_corpus):
    import shutil

    app_module = served_app[0]
    blocks = app_module.build_app()
    on_image, on_more = _handler(blocks, "on_image"), _handler(blocks, "on_more")
    upload = app_module._UPLOAD_DIR / "a1b2" / "scan.nii.gz"  # where gradio puts an upload
    upload.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(next(tiny_corpus.parent.glob("images/*.nii.gz")), upload)
    view = ("axial", 0.5, 1500, -600)

    first = on_image([str(upload)], None, "Similar cases", None, *view, progress=lambda *a, **k: None)
    volume, results, k, last, upload_box = first[0], first[3], first[8], first[9], first[10]
    assert not upload.exists() and upload_box is None  # read, deleted, and the file box cleared
    assert len(results) == k == 10 and last == ("image", "Similar cases")

    # The file is gone; the loaded CT is not: asking for matching reports reuses it.
    second = on_image(None, None, "Matching reports", volume, *view, progress=lambda *a, **k: None)
    assert second[0] is volume and second[3] and second[3] != results

    # "More results" after a CT search pages that search (its mode, not one selected since),
    # even with the text box empty.
    more = on_more(last, volume, "", [], [], "any", 0, 100, None, *view, k)
    assert [r.case_id for r in more[0][:10]] == [r.case_id for r in results]
    assert len(more[0]) == 12 and more[5] == 20 and more[8] == last  # all 12 cases of the tiny index
    assert more[6] is not None  # the best match opens in the viewer, as the details say


def test_empty_text_query_is_refused(client):
    with pytest.raises(Exception, match="Type findings"):
        client.predict("   ", [], [], "any", 0, 100, 3, api_name="/search_text")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed")
def test_browser_text_search_and_ct_viewer(served_app, tiny_corpus, tmp_path):
    from playwright.sync_api import sync_playwright

    url = served_app[1]
    image = next(tiny_corpus.parent.glob("images/*.nii.gz"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(url, wait_until="load", timeout=60_000)
        page.locator("#text-query textarea").wait_for(timeout=60_000)
        assert "synthetic phantoms" in page.content()
        page.locator("#text-query textarea").fill("pleural effusion")
        page.locator("#text-search").click()
        page.locator("#results img").first.wait_for(timeout=60_000)
        page.locator("#report .token.highlighted").first.wait_for(timeout=30_000)
        assert "effusion" in page.locator("#report .token.highlighted").first.inner_text()
        assert page.locator("#results img").count() >= 1
        page.screenshot(path=str(tmp_path / "text_search.png"), full_page=True)

        page.get_by_role("tab", name="Search by CT").click()
        page.locator("#ct-upload input[type=file]").set_input_files(str(image))
        time.sleep(1.0)
        page.locator("#image-search").click()
        query_img = page.locator("#query-view img")
        query_img.wait_for(timeout=60_000)
        before = query_img.get_attribute("src")
        # The uploaded scan's slices are inlined, never written to the server's file cache.
        assert before.startswith("data:image/png;base64,")
        slider = page.locator("#slice input[type=range]")
        slider.fill("0.2")
        slider.dispatch_event("input")
        page.wait_for_function(
            "(before) => { const i = document.querySelector('#query-view img'); return i && i.src !== before; }",
            arg=before, timeout=30_000)
        page.locator("#results img").first.click()
        page.locator("#result-view img").wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "ct_compare.png"), full_page=True)
        browser.close()
    assert (tmp_path / "text_search.png").stat().st_size > 10_000
    if os.environ.get("MEDFINDER_SCREENSHOTS"):
        import shutil

        for name in ("text_search.png", "ct_compare.png"):
            shutil.copy(tmp_path / name, Path(os.environ["MEDFINDER_SCREENSHOTS"]) / name)


def test_phi_in_uploaded_dicom_never_comes_back_and_upload_is_deleted(client, served_app, tmp_path):
    import json as _json
    import zipfile

    from gradio_client import handle_file

    from dicom_factory import FAKE_PHI, write_series

    write_series(tmp_path / "s", n=8, rows=48, cols=48)
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in (tmp_path / "s").iterdir():
            zf.write(f, f.name)
    results = client.predict(handle_file(str(archive)), "Similar cases", 5, api_name="/search_image")
    text = _json.dumps(results)
    for value in FAKE_PHI.values():
        assert value not in text
    assert list(served_app[0]._UPLOAD_DIR.rglob("upload*.zip")) == []
