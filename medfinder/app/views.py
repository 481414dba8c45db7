"""What the app shows of a volume and of results: slices, cards, the score table, the details line.

The query CT's slices are inlined as PNG data URLs: a ``gr.Image`` would write every slice of an
uploaded scan into the server's file cache, where it stays for up to an hour after the session.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from ..errors import MedFinderError
from ..io import Volume, load_volume
from ..search import SearchResult
from ..viewer import WINDOW_PRESETS, plane_size, render_slice

HIGHLIGHT_COLORS = {"match": "#2e7d32", "negated": "#9e9e9e", "uncertain": "#f9a825", "present": "#1565c0"}
TABLE_HEADERS = ["rank", "case", "fused score", "keyword", "report text", "image", "image→report", "findings in report"]


def render(volume: Volume | None, plane: str, position: float, window: float, level: float) -> Image.Image | None:
    """One slice at a relative position (0..1) along the plane's normal, windowed."""
    if volume is None:
        return None
    n = plane_size(volume, plane)
    return render_slice(volume, plane, round(position * (n - 1)), window, level)


def inline(image: Image.Image | None, empty: str = "Query CT") -> str:
    """A slice as an <img> with a PNG data URL (never a file on the server)."""
    if image is None:
        return f'<div class="empty-view">{html.escape(empty)}</div>'
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f'<img alt="Query CT slice" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def preset(name: str) -> tuple[float, float]:
    return WINDOW_PRESETS.get(name, WINDOW_PRESETS["lung"])


def volume_text(volume: Volume | None) -> str:
    """Size, spacing, orientation and the safe header fields of a loaded CT."""
    if volume is None:
        return ""
    sx, sy, sz = volume.spacing
    meta = ", ".join(f"{k}: {v}" for k, v in sorted(volume.metadata.items()) if k != "modality")
    return (f"{volume.shape[0]}×{volume.shape[1]}×{volume.shape[2]} voxels, {sx:.2f}×{sy:.2f}×{sz:.2f} mm, "
            f"{volume.orientation}" + (f" — {html.escape(meta)}" if meta else ""))


def card_caption(r: SearchResult) -> str:
    per = " · ".join(f"{c} #{h.rank}" for c, h in r.channels.items())
    return f"#{r.rank} {r.case_id} — fused {r.score:.4f} ({per})"


def gallery(results: list[SearchResult]) -> list[tuple[Image.Image, str]]:
    items = []
    for r in results:
        image = Image.open(io.BytesIO(r.thumbnail_png)).convert("RGB") if r.thumbnail_png else Image.new("RGB", (160, 160))
        items.append((image, card_caption(r)))
    return items


def table(results: list[SearchResult]) -> list[list[Any]]:
    rows = []
    for r in results:
        ch = {c: f"{h.score:.3f} (#{h.rank})" for c, h in r.channels.items()}
        rows.append([r.rank, r.case_id, round(r.score, 4), ch.get("keyword", ""), ch.get("text", ""),
                     ch.get("image", ""), ch.get("report", ""), ", ".join(r.present_findings())])
    return rows


def details(results: list[SearchResult], i: int,
            viewer: Callable[[SearchResult], str | None] | None = None) -> tuple[str, list[tuple[str, str | None]]]:
    """The selected case's header line and its report cut into highlighted segments; with ``viewer``
    (the service's ``viewer_link``), an "Open in PACS viewer" link where the index keeps one."""
    if not results or i >= len(results):
        return "", []
    r = results[i]
    meta = ", ".join(f"{k}: {html.escape(str(v))}" for k, v in sorted(r.metadata.items()))
    head = f"**{html.escape(r.case_id)}** — rank {r.rank}, fused score {r.score:.4f}" + (f" — {meta}" if meta else "")
    link = viewer(r) if viewer is not None else None
    if link:
        head += f" — [Open in PACS viewer](<{link.replace('>', '%3E').replace('<', '%3C')}>)"
    return head, (r.highlights or [(r.report or "(no report)", None)])


def case_volume(r: SearchResult) -> Volume | None:
    """The indexed case's scan, when its file is reachable from here."""
    if not r.source or not Path(r.source).exists():
        return None
    try:
        return load_volume(r.source)
    except MedFinderError:
        return None
