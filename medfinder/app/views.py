"""What the app shows of a volume and of results: slices, the case at its evidence, cards, scores.

The query CT's slices are inlined as PNG data URLs: a ``gr.Image`` would write every slice of an
uploaded scan into the server's file cache, where it stays for up to an hour after the session.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..evidence import Evidence
from ..io import Volume
from ..search import SearchResult
from ..viewer import PLANES, WINDOW_PRESETS, plane_size, render_slice, thumbnail_png, world_to_voxel

HIGHLIGHT_COLORS = {"match": "#2e7d32", "negated": "#9e9e9e", "uncertain": "#f9a825", "present": "#1565c0"}
#: Short headers, so that none wraps past two lines at the app's usual widths (a browser test checks).
TABLE_HEADERS = ["Rank", "Case", "Keyword match", "Report similarity", "Image similarity", "Image → report",
                 "Findings in report"]
ORDER_NOTE = (
    "**How the list is ordered.** Each channel ranks the cases on its own; a case gains 1 / (60 + its rank) "
    "from each channel (reciprocal rank fusion), so cases ranked well by several channels come first. "
    "*Similarity* columns are cosines in that channel's space (−1 to 1; higher is closer); *keyword match* "
    "counts the query's findings the report affirms. None of them is a probability of disease."
)
#: The three planes of the selected case, each this many pixels tall.
PLANE_HEIGHT = 300


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


# ------------------------------------------------------------------ the selected case
def centre(volume: Volume) -> tuple[float, float, float]:
    return tuple((n - 1) / 2 for n in volume.shape)  # type: ignore[return-value]


def focus_at(volume: Volume, evidence: Sequence[Evidence] | None) -> tuple[float, float, float]:
    """Where the viewer opens a case: its best evidence point, else its centre."""
    if evidence:
        voxel = world_to_voxel(volume, evidence[0].ras_mm)
        return tuple(float(np.clip(v, 0, n - 1)) for v, n in zip(voxel, volume.shape))  # type: ignore[return-value]
    return centre(volume)


def case_planes(volume: Volume | None, focus: Sequence[float] | None, window: float, level: float,
                evidence: Sequence[Evidence] | None, show_evidence: bool) -> Image.Image | None:
    """The case in its three planes through ``focus``, side by side; the evidence marked when shown."""
    if volume is None:
        return None
    focus = focus if focus is not None else centre(volume)
    marks = [world_to_voxel(volume, e.ras_mm) for e in (evidence or [])] if show_evidence else []
    pictures = []
    for plane, axis in zip(PLANES, (2, 1, 0)):
        picture = render_slice(volume, plane, round(focus[axis]), window, level, max_size=512,
                               focus=focus if show_evidence else None, marks=marks)
        scale = PLANE_HEIGHT / picture.height
        pictures.append(picture.resize((max(1, round(picture.width * scale)), PLANE_HEIGHT)))
    gap = 6
    canvas = Image.new("RGB", (sum(p.width for p in pictures) + gap * 2, PLANE_HEIGHT + 22), (17, 17, 17))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for plane, picture in zip(PLANES, pictures):
        canvas.paste(picture, (x, 22))
        draw.text((x + 4, 4), plane, fill=(220, 220, 220))
        x += picture.width + gap
    return canvas


def focus_text(result: SearchResult | None, volume: Volume | None, focus: Sequence[float] | None,
               evidence: Sequence[Evidence] | None) -> str:
    """A line under the case view: where it is open, and the evidence found."""
    if result is None:
        return ""
    if volume is None:
        return f"**{html.escape(result.case_id)}**: its scan is not reachable from this machine."
    point = volume.affine @ np.array([*(focus or centre(volume)), 1.0])
    slices = ", ".join(f"{plane} {round((focus or centre(volume))[axis]) + 1}/{volume.shape[axis]}"
                       for plane, axis in zip(PLANES, (2, 1, 0)))
    where = f"open at ({point[0]:.0f}, {point[1]:.0f}, {point[2]:.0f}) mm RAS — {slices}"
    if not evidence:
        return f"**{html.escape(result.case_id)}** {where}; no evidence located."
    items = "; ".join(
        (f"{html.escape(e.finding)} (report)" if e.source == "report" and e.finding else "image match")
        + f" {e.score:.2f} at ({e.ras_mm[0]:.0f}, {e.ras_mm[1]:.0f}, {e.ras_mm[2]:.0f})" for e in evidence[:4])
    return f"**{html.escape(result.case_id)}** {where}. Evidence, best first: {items}."


# ------------------------------------------------------------------ results
def channel_cells(r: SearchResult) -> dict[str, str]:
    """Each channel's own score, said as what it is: a count of findings matched, or a cosine."""
    cells = {}
    for channel, hit in r.channels.items():
        if channel == "keyword":
            matched = int(hit.score)
            cells[channel] = f"{matched} finding{'s' if matched != 1 else ''} (#{hit.rank})" if matched else f"words (#{hit.rank})"
        else:
            cells[channel] = f"{hit.score:.2f} (#{hit.rank})"
    return cells


def card_caption(r: SearchResult) -> str:
    cells = channel_cells(r)
    names = {"keyword": "keyword", "text": "report", "image": "image", "report": "report"}
    per = " · ".join(f"{names[c]} {v.split(' (')[0]}" for c, v in cells.items())
    return f"#{r.rank} {r.case_id} — {per}"


def gallery(results: list[SearchResult], thumbnails: dict[str, bytes] | None = None) -> list[tuple[Image.Image, str]]:
    """Result cards: the evidence slice where it is known (``thumbnails``), else the stored key slice."""
    items = []
    for r in results:
        png = (thumbnails or {}).get(r.case_id) or r.thumbnail_png
        image = Image.open(io.BytesIO(png)).convert("RGB") if png else Image.new("RGB", (160, 160))
        items.append((image, card_caption(r)))
    return items


def evidence_thumbnail(volume: Volume, evidence: Sequence[Evidence]) -> bytes | None:
    """The axial slice through a case's best evidence, the evidence ringed."""
    if not evidence:
        return None
    focus = focus_at(volume, evidence)
    marks = [world_to_voxel(volume, e.ras_mm) for e in evidence]
    return thumbnail_png(volume, index=round(focus[2]), marks=marks)


def table(results: list[SearchResult]) -> list[list[Any]]:
    rows = []
    for r in results:
        cells = channel_cells(r)
        rows.append([r.rank, r.case_id, cells.get("keyword", ""), cells.get("text", ""), cells.get("image", ""),
                     cells.get("report", ""), ", ".join(r.present_findings())])
    return rows


def details(results: list[SearchResult], i: int,
            viewer: Callable[[SearchResult], str | None] | None = None) -> tuple[str, list[tuple[str, str | None]]]:
    """The selected case's header line and its report cut into highlighted segments; with ``viewer``
    (the service's ``viewer_link``), an "Open in PACS viewer" link where the index keeps one."""
    if not results or i >= len(results):
        return "", []
    r = results[i]
    meta = ", ".join(f"{k}: {html.escape(str(v))}" for k, v in sorted(r.metadata.items()))
    head = f"**{html.escape(r.case_id)}** — rank {r.rank}" + (f" — {meta}" if meta else "")
    link = viewer(r) if viewer is not None else None
    if link:
        head += f" — [Open in PACS viewer](<{link.replace('>', '%3E').replace('<', '%3C')}>)"
    return head, (r.highlights or [(r.report or "(no report)", None)])
