"""The app's event handlers and its JSON API, as plain functions ``app.py`` wires to components.

A handler returns the new values of its outputs, in the order ``app.py`` lists them (``SEARCH``,
``CASE``). A problem a user can act on becomes a ``gr.Error`` with one sentence; the app keeps serving.
"""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from ..errors import MedFinderError
from ..search import QueryTarget, SearchResult
from . import views
from .service import DEFAULT_K, current, image_search, text_search

#: What "More results" pages: ("text", None) or ("image", mode).
LastQuery = tuple[str, str | None]
#: Seconds the result cards may spend, after a search is shown, redrawing at each case's evidence.
THUMBNAIL_BUDGET_S = 6.0
_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}


def _error(exc: MedFinderError) -> gr.Error:
    return gr.Error(str(exc), print_exception=False)


def _text_results(query: str, include: Any, exclude: Any, sex: Any, age_min: Any, age_max: Any,
                  k: int) -> list[SearchResult]:
    try:
        filters = current().text_filters(include, exclude, sex, age_min, age_max)
        return text_search(query, filters, int(k))
    except MedFinderError as exc:
        raise _error(exc) from None


def _image_results(volume: Any, mode: str, k: int) -> list[SearchResult]:
    try:
        return image_search(volume, mode, int(k))
    except MedFinderError as exc:
        raise _error(exc) from None


def _evidence(result: SearchResult, query: QueryTarget | None = None) -> list:
    """The case's evidence, or none when it cannot be located (its scan is out of reach, say)."""
    try:
        found = current().searcher().evidence(result, query)
    except MedFinderError:
        found = []
    if query is None:
        result.evidence = found
    return found


# ------------------------------------------------------------------ the selected case
def open_case(results: list[SearchResult], i: int, plane: str, window: float, level: float, show: bool) -> tuple:
    """The CASE outputs for result ``i``: its scan opened at its best evidence, in the three planes."""
    if not results or i >= len(results):
        return (0, None, None, None, "", "", [], 0.5)
    result = results[i]
    volume = current().searcher().case_volume(result)
    evidence = _evidence(result) if volume is not None else []
    focus = views.focus_at(volume, evidence) if volume is not None else None
    head, marks = views.details(results, i, current().viewer_link)
    return (i, volume, focus, views.case_planes(volume, focus, window, level, evidence, show),
            views.focus_text(result, volume, focus, evidence), head, marks, _position(volume, focus, plane))


def _position(volume: Any, focus: Any, plane: str) -> float:
    if volume is None or focus is None:
        return 0.5
    axis = _AXIS[plane]
    return round(float(focus[axis]) / max(volume.shape[axis] - 1, 1), 3)


def redraw(query_volume: Any, case_volume: Any, focus: Any, results: list[SearchResult], selected: int, plane: str,
           position: float, window: float, level: float, show: bool) -> tuple:
    """The slice slider moves the query CT and the case along the plane's axis, linked; W/L and the
    evidence toggle redraw both."""
    if case_volume is not None and focus is not None:
        axis = _AXIS[plane]
        focus = tuple(position * (case_volume.shape[axis] - 1) if a == axis else v for a, v in enumerate(focus))
    result = results[selected] if results and selected < len(results) else None
    evidence = result.evidence if result is not None else None
    return (views.inline(views.render(query_volume, plane, position, window, level)), focus,
            views.case_planes(case_volume, focus, window, level, evidence, show),
            views.focus_text(result, case_volume, focus, evidence))


def on_plane(query_volume: Any, case_volume: Any, focus: Any, plane: str, position: float, window: float,
             level: float) -> tuple:
    """A new plane: the slider takes the case's position along it; the query CT shows that plane."""
    if case_volume is not None and focus is not None:
        position = _position(case_volume, focus, plane)
    return position, views.inline(views.render(query_volume, plane, position, window, level))


def set_preset(name: str) -> tuple[float, float]:
    return views.preset(name)


def on_select(results: list[SearchResult], plane: str, window: float, level: float, show: bool,
              evt: gr.SelectData) -> tuple:
    i = evt.index if isinstance(evt.index, int) else evt.index[0]
    return open_case(results, i, plane, window, level, show)


def on_report_select(results: list[SearchResult], selected: int, case_volume: Any, focus: Any, plane: str,
                     window: float, level: float, show: bool, evt: gr.SelectData) -> tuple:
    """A finding clicked in the report: the viewer moves to that finding's evidence."""
    if not results or selected >= len(results) or case_volume is None:
        return focus, gr.skip(), gr.skip(), gr.skip()
    result = results[selected]
    start = sum(len(text) for text, _ in (result.highlights or [])[: evt.index if isinstance(evt.index, int) else 0])
    text = evt.value[0] if isinstance(evt.value, (list, tuple)) else str(evt.value or "")
    finding = next((f for f in result.findings if f.get("start") is not None
                    and f["start"] < start + len(text) and start < f["end"]), None)
    if finding is None:
        return focus, gr.skip(), gr.skip(), gr.skip()
    name = finding["name"]
    own = [e for e in (result.evidence or []) if e.finding == name]
    evidence = own or _evidence(result, QueryTarget("text", text=name, findings=(name,)))
    if not evidence:
        gr.Info(f"No location was found for {name} in this scan.")
        return focus, gr.skip(), gr.skip(), gr.skip()
    focus = views.focus_at(case_volume, evidence)
    return (focus, views.case_planes(case_volume, focus, window, level, evidence, show),
            views.focus_text(result, case_volume, focus, evidence), _position(case_volume, focus, plane))


def evidence_thumbnails(results: list[SearchResult]) -> list:
    """The result cards redrawn at each case's evidence slice, as long as the time budget allows."""
    searcher = current().searcher()
    pictures: dict[str, bytes] = {}
    started = time.perf_counter()
    for r in results:
        if time.perf_counter() - started > THUMBNAIL_BUDGET_S:
            break
        volume = searcher.case_volume(r)
        if volume is None:
            continue
        png = views.evidence_thumbnail(volume, _evidence(r))
        if png:
            pictures[r.case_id] = png
    return views.gallery(results, pictures)


# ------------------------------------------------------------------ searches
def _show(results: list[SearchResult], k: int, last: LastQuery, query_view: Any, plane: str, window: float,
          level: float, show: bool) -> tuple:
    """The SEARCH outputs, then the CASE outputs of the best match (the details and the viewer agree)."""
    return (results, views.gallery(results), views.table(results), int(k), last, query_view,
            *open_case(results, 0, plane, window, level, show))


def on_text(query: str, include: Any, exclude: Any, sex: Any, age_min: Any, age_max: Any, plane: str,
            window: float, level: float, show: bool, k: int = DEFAULT_K) -> tuple:
    results = _text_results(query, include, exclude, sex, age_min, age_max, int(k))
    if not results:
        gr.Warning("No case matches this query and these filters.")
    # A text search has no query CT: its viewer gives its room to the selected case.
    return _show(results, k, ("text", None), gr.update(visible=False), plane, window, level, show)


def on_image(files: Any, example: str | None, mode: str, query_volume: Any, plane: str, position: float,
             window: float, level: float, show: bool, progress: gr.Progress = gr.Progress()) -> tuple:
    """Load (an upload is deleted once read) and search a CT. The loaded CT stays in the session and
    the file box is cleared: searching it again (say, for matching reports) reuses the volume."""
    if files or example or query_volume is None:
        progress(0.1, desc="Loading the CT")
        try:
            volume = current().load_query(files, example)
        except MedFinderError as exc:
            raise _error(exc) from None
    else:
        volume = query_volume
    progress(0.4, desc="Encoding the CT and searching (a real-CT tower takes seconds on a CPU)")
    results = _image_results(volume, mode, DEFAULT_K)
    query_view = gr.update(value=views.inline(views.render(volume, plane, position, window, level)), visible=True)
    return (volume, views.volume_text(volume), None, None if files else example,
            *_show(results, DEFAULT_K, ("image", mode), query_view, plane, window, level, show))


def on_pacs(study: str, mode: str, plane: str, position: float, window: float, level: float, show: bool,
            progress: gr.Progress = gr.Progress()) -> tuple:
    """Fetch a study's main CT series from the PACS and search with it, as an upload: the volume stays in
    the session only, and the study box is cleared."""
    progress(0.1, desc="Fetching the study from the PACS")
    try:
        volume = current().load_from_pacs(study)
    except MedFinderError as exc:
        raise _error(exc) from None
    progress(0.4, desc="Encoding the CT and searching")
    results = _image_results(volume, mode, DEFAULT_K)
    query_view = gr.update(value=views.inline(views.render(volume, plane, position, window, level)), visible=True)
    return (volume, views.volume_text(volume), "",
            *_show(results, DEFAULT_K, ("image", mode), query_view, plane, window, level, show))


def on_more(last: LastQuery | None, query_volume: Any, query: str, include: Any, exclude: Any, sex: Any,
            age_min: Any, age_max: Any, plane: str, window: float, level: float, show: bool, k: int) -> tuple:
    kind, searched_mode = last or ("text", None)
    if kind != "image" or query_volume is None:
        return on_text(query, include, exclude, sex, age_min, age_max, plane, window, level, show, int(k) + DEFAULT_K)
    # The mode searched, not the one selected since: the first page must stay what is shown.
    k = int(k) + DEFAULT_K
    return _show(_image_results(query_volume, searched_mode or "Similar cases", k), k, last, gr.skip(), plane,
                 window, level, show)


# ------------------------------------------------------------------ the JSON API (gradio_client)
def search_text(query: str, include: list[str] | None, exclude: list[str] | None, sex: str,
                age_min: float, age_max: float, k: float = DEFAULT_K, evidence: bool = False) -> list[dict[str, Any]]:
    """Text search (API: /search_text): ranked cases as JSON, best first (with evidence when asked)."""
    results = _text_results(query, include, exclude, sex, age_min, age_max, int(k))
    if evidence:
        for r in results:
            _evidence(r)
    return [r.to_json() for r in results]


def search_image(file: Any, mode: str = "Similar cases", k: float = DEFAULT_K, evidence: bool = False
                 ) -> list[dict[str, Any]]:
    """Image search (API: /search_image): upload a CT, get ranked cases as JSON, best first."""
    try:
        volume = current().load_query([file] if file else [], None)
    except MedFinderError as exc:
        raise _error(exc) from None
    results = _image_results(volume, mode, int(k))
    if evidence:
        for r in results:
            _evidence(r)
    return [r.to_json() for r in results]


def case_details(case_id: str) -> dict[str, Any]:
    """One case's report, findings and metadata (API: /case_details)."""
    try:
        return current().case_json(case_id)
    except MedFinderError as exc:
        raise _error(exc) from None
