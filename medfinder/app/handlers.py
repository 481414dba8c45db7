"""The app's event handlers and its JSON API, as plain functions ``app.py`` wires to components.

A handler returns the new values of its outputs, in the order ``app.py`` lists them. A problem a
user can act on becomes a ``gr.Error`` with one sentence; the app keeps serving.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from ..errors import MedFinderError
from ..search import SearchResult
from . import views
from .service import DEFAULT_K, current, image_search, text_search

#: What "More results" pages: ("text", None) or ("image", mode).
LastQuery = tuple[str, str | None]


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


# ------------------------------------------------------------------ viewer
def redraw(query_volume: Any, case_volume: Any, plane: str, position: float, window: float, level: float) -> tuple:
    """Both viewers at the linked plane, slice position and window."""
    return (views.inline(views.render(query_volume, plane, position, window, level)),
            views.render(case_volume, plane, position, window, level))


def set_preset(name: str, query_volume: Any, case_volume: Any, plane: str, position: float) -> tuple:
    window, level = views.preset(name)
    return (window, level, *redraw(query_volume, case_volume, plane, position, window, level))


# ------------------------------------------------------------------ searches
def _show(results: list[SearchResult], k: int, last: LastQuery, plane: str, position: float, window: float,
          level: float) -> tuple:
    head, marks = views.details(results, 0, current().viewer_link)
    # The best match opens in the case viewer straight away, so the details and the viewer agree.
    volume = views.case_volume(results[0]) if results else None
    return (results, views.gallery(results), views.table(results), head, marks, int(k), volume,
            views.render(volume, plane, position, window, level), last)


def on_text(query: str, include: Any, exclude: Any, sex: Any, age_min: Any, age_max: Any, case_volume: Any,
            plane: str, position: float, window: float, level: float, k: int = DEFAULT_K) -> tuple:
    results = _text_results(query, include, exclude, sex, age_min, age_max, int(k))
    if not results:
        gr.Warning("No case matches this query and these filters.")
    return _show(results, k, ("text", None), plane, position, window, level)


def on_image(files: Any, example: str | None, mode: str, query_volume: Any, plane: str, position: float,
             window: float, level: float, progress: gr.Progress = gr.Progress()) -> tuple:
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
    return (*_search_loaded(volume, mode, plane, position, window, level, progress), None, None if files else example)


def on_pacs(study: str, mode: str, plane: str, position: float, window: float, level: float,
            progress: gr.Progress = gr.Progress()) -> tuple:
    """Fetch a study's main CT series from the PACS and search with it, as an upload: the volume stays in
    the session only, and the study box is cleared."""
    progress(0.1, desc="Fetching the study from the PACS")
    try:
        volume = current().load_from_pacs(study)
    except MedFinderError as exc:
        raise _error(exc) from None
    return (*_search_loaded(volume, mode, plane, position, window, level, progress), "")


def _search_loaded(volume: Any, mode: str, plane: str, position: float, window: float, level: float,
                   progress: Any) -> tuple:
    progress(0.5, desc="Encoding and searching")
    results = _image_results(volume, mode, DEFAULT_K)
    head, marks = views.details(results, 0, current().viewer_link)
    return (volume, views.volume_text(volume), views.inline(views.render(volume, plane, position, window, level)),
            results, views.gallery(results), views.table(results), head, marks, DEFAULT_K, ("image", mode))


def on_select(results: list[SearchResult], plane: str, position: float, window: float, level: float,
              evt: gr.SelectData) -> tuple:
    i = evt.index if isinstance(evt.index, int) else evt.index[0]
    head, marks = views.details(results, i, current().viewer_link)
    volume = views.case_volume(results[i]) if results else None
    return volume, head, marks, views.render(volume, plane, position, window, level)


def on_more(last: LastQuery | None, query_volume: Any, query: str, include: Any, exclude: Any, sex: Any,
            age_min: Any, age_max: Any, case_volume: Any, plane: str, position: float, window: float, level: float,
            k: int) -> tuple:
    kind, searched_mode = last or ("text", None)
    if kind != "image" or query_volume is None:
        return on_text(query, include, exclude, sex, age_min, age_max, case_volume, plane, position, window, level,
                       int(k) + DEFAULT_K)
    # The mode searched, not the one selected since: the first page must stay what is shown.
    k = int(k) + DEFAULT_K
    return _show(_image_results(query_volume, searched_mode or "Similar cases", k), k, last, plane, position,
                 window, level)


# ------------------------------------------------------------------ the JSON API (gradio_client)
def search_text(query: str, include: list[str] | None, exclude: list[str] | None, sex: str,
                age_min: float, age_max: float, k: float = DEFAULT_K) -> list[dict[str, Any]]:
    """Text search (API: /search_text): ranked cases as JSON, best first."""
    return [r.to_json() for r in _text_results(query, include, exclude, sex, age_min, age_max, int(k))]


def search_image(file: Any, mode: str = "Similar cases", k: float = DEFAULT_K) -> list[dict[str, Any]]:
    """Image search (API: /search_image): upload a CT, get ranked cases as JSON, best first."""
    try:
        volume = current().load_query([file] if file else [], None)
    except MedFinderError as exc:
        raise _error(exc) from None
    return [r.to_json() for r in _image_results(volume, mode, int(k))]


def case_details(case_id: str) -> dict[str, Any]:
    """One case's report, findings and metadata (API: /case_details)."""
    try:
        return current().case_json(case_id)
    except MedFinderError as exc:
        raise _error(exc) from None
