"""Bad reports end to end: through index_build into an index, and back out through search.

A 10 MB report is refused for its case alone (the rest of the archive is indexed); a report with
HTML and script in it is kept and returned as plain text; a manifest that is not UTF-8 is refused
with one sentence naming the file and where the bad byte is.
"""

from __future__ import annotations

import csv
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HTML_REPORT = ('Findings: <b>Right pleural effusion</b>. <script>alert("x")</script>'
               '<img src=x onerror="alert(1)"> No pneumothorax.')
MEMORY_LIMIT = 2 * 1024**3


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_huge_and_html_reports_through_index_build_and_search(tmp_path, tiny_model_dir):
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "image", "report"])
        writer.writerow(["ok-case", "", "Findings: Small left pleural effusion. Impression: effusion."])
        writer.writerow(["huge-case", "", "Findings: normal lungs. " * 420_000])  # ~10 MB
        writer.writerow(["html-case", "", HTML_REPORT])
    assert manifest.stat().st_size > 10_000_000
    out = tmp_path / "index"
    proc = subprocess.run([sys.executable, "-m", "index_build", "--manifest", str(manifest), "--out", str(out),
                           "--model", str(tiny_model_dir), "--quiet"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, preexec_fn=_limit_memory)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["added"] == 2 and summary["failed"] == 1, summary
    reason = json.dumps(summary)
    assert "huge-case" in reason and "100,000-character limit" in reason

    found = _run("-m", "medfinder", "search", "--index", str(out), "--model", str(tiny_model_dir),
                 "--text", "pleural effusion", "-k", "5", "--json")
    assert found.returncode == 0, found.stderr
    results = {r["case_id"]: r for r in json.loads(found.stdout)}
    assert set(results) == {"ok-case", "html-case"}
    # Kept verbatim as text: the markup is data, for the app to show as characters.
    assert results["html-case"]["report"] == HTML_REPORT


def test_manifest_that_is_not_utf8_is_refused_with_one_sentence(tmp_path, tiny_model_dir):
    manifest = tmp_path / "export.csv"
    manifest.write_bytes("case_id,image,report\na,,Normal.\nb,,Opacit\xe9 in the right lung.\n".encode("cp1252"))
    proc = _run("-m", "index_build", "--manifest", str(manifest), "--out", str(tmp_path / "index"),
                "--model", str(tiny_model_dir), "--quiet")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(manifest) in lines[0] and "not UTF-8" in lines[0] and "line 3" in lines[0]
    assert not (tmp_path / "index").exists()


def test_html_report_is_shown_as_text_in_the_app(tmp_path):
    """The report pane receives (text, label) pairs; Gradio's HighlightedText renders them as text nodes."""
    import gradio as gr

    from medfinder.text.highlight import highlight_findings

    spans = highlight_findings(HTML_REPORT)
    assert any(label for _, label in spans)  # the effusion is marked
    assert "".join(text for text, _ in spans) == HTML_REPORT
    payload = gr.HighlightedText(combine_adjacent=False).postprocess(spans)
    tokens = [t.token for t in payload.root]
    assert "".join(tokens) == HTML_REPORT  # unchanged: no markup is interpreted server-side
