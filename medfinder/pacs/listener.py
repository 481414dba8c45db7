"""A DICOM Storage SCP (pynetdicom) that indexes the CT series a PACS or a modality sends to it.

``python -m medfinder listen --index DIR --port 11112 --allow ORTHANC``: a PACS's "send to MedFinder".

- Only the AE titles given with ``--allow`` may associate; any other is rejected.
- Each instance is sorted as it arrives: CT slices go to a private spool folder (0700, named by keyed
  hashes, outside the index), a text SR's text is kept in memory as its study's report, anything else
  (a localizer, a dose report, another modality) is counted and dropped.
- A study is indexed once it has settled: no new instance for ``settle_s`` seconds and no association
  that sent to it still open. Each of its CT series becomes a case (by the rules ``load_volume``
  applies), named by the same keyed hash of its SeriesInstanceUID as a DICOMweb build gives it, with
  the study's report; it is committed at once and its files are deleted.
- A text SR arriving after its study was indexed is attached to that study's cases (for the last
  ``KEEP_STUDIES`` studies indexed).
- On SIGINT or SIGTERM the server stops; what arrived over associations that had ended is indexed and
  committed, files of a transfer cut off by the stop are deleted (the sender will resend them).

Nothing identifying is stored: no UID (even an index built with ``--link-to-pacs`` gets no link from
here), no name, no date; received files are deleted once indexed and the spool folder on exit.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import MedFinderError, SeriesSkipped
from ..index.build import encode_cases, open_or_create, prepare_case
from ..index.case_index import CaseEntry
from ..index.privacy import case_id_key
from ..io.deidentify import series_case_id
from ..io.dicom import TEXT_REPORT, not_a_ct_slice
from ..io.dicomweb import read_series
from ..io.manifests import ManifestCase
from ..io.structured_reports import report_text

log = logging.getLogger(__name__)

DEFAULT_AE_TITLE = "MEDFINDER"
DEFAULT_SETTLE_S = 10.0
#: Studies whose indexed cases are kept in memory, so that a report sent after them still reaches them.
KEEP_STUDIES = 64
#: DIMSE status codes (PS3.7 Annex C; PS3.4 B.2.3).
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


@dataclass
class _Study:
    last: float = 0.0
    open: set[int] = field(default_factory=set)  # associations that sent to it and have not ended
    series: dict[str, int] = field(default_factory=dict)  # case id -> files received, not yet indexed
    reports: list[str] = field(default_factory=list)
    indexed: list[CaseEntry] = field(default_factory=list)
    report_changed: bool = False


@dataclass
class ListenerSummary:
    """What a listening session did, printed as JSON when it stops: instances received, cases added,
    series left out by reason (as a build counts them), failures by case id, and series dropped
    because the stop cut their transfer off."""

    received: int = 0
    added: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    not_indexed_at_stop: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"received_instances": self.received, "added": self.added, "skipped": dict(self.skipped),
                "failed": len(self.failed), "failures": dict(self.failed),
                "series_cut_off_at_stop": self.not_indexed_at_stop}


class StudyListener:
    """A Storage SCP that adds the CT series it receives to an index.

    Args:
        index: the index folder; created (with ``model``) when absent.
        model: a model folder or built-in name; by default the one that built the index.
        port: the TCP port to listen on.
        ae_title: this node's AE title (what the PACS sends to).
        allow: the AE titles allowed to send (at least one); any other association is rejected.
        settle_s: seconds without a new instance after which a study counts as complete.
        host: the address to listen on (``0.0.0.0``: every interface).
        spool: where received files wait to be indexed (default: a private temporary folder).
        progress: one line on stderr per indexed series.
    """

    def __init__(self, index: str | Path, model: str | Path, port: int, ae_title: str = DEFAULT_AE_TITLE,
                 allow: list[str] | tuple[str, ...] = (), settle_s: float = DEFAULT_SETTLE_S, host: str = "0.0.0.0",
                 spool: str | Path | None = None, progress: bool = True) -> None:
        allowed = [a.strip() for a in allow if a and a.strip()]
        if not allowed:
            raise MedFinderError("Give at least one --allow AE_TITLE: the listener accepts studies only from the "
                                 "AE titles you name.")
        for title in [ae_title, *allowed]:
            if not 0 < len(title.strip()) <= 16 or "\\" in title or not title.isprintable():
                raise MedFinderError(f"{title!r} is not a DICOM AE title (1 to 16 printable characters, no backslash).")
        if not 0 < port < 65536:
            raise MedFinderError(f"--port must be between 1 and 65535, not {port}.")
        if settle_s < 0:
            raise MedFinderError(f"--settle must be 0 seconds or more, not {settle_s:g}.")
        self.index_dir = Path(index)
        self.model_name = model
        self.port, self.host, self.ae_title, self.allow = port, host, ae_title.strip(), allowed
        self.settle_s = settle_s
        self.progress = progress
        self.summary = ListenerSummary()
        self._lock = threading.Lock()
        self._studies: OrderedDict[str, _Study] = OrderedDict()
        self._skipped_series: dict[str, set[str]] = {}
        self._own_spool = spool is None
        self._spool = Path(tempfile.mkdtemp(prefix="medfinder-listener-")) if spool is None else Path(spool)
        self._spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._server: Any = None
        self._index: Any = None
        self._model: Any = None
        self._preprocessor: Any = None
        self._key = b""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load the model, open the index for writing (held while listening), and start accepting."""
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        from ..model import load_model

        self._model = load_model(self.model_name)
        self._preprocessor = self._model.make_preprocessor()
        self._key = case_id_key(self.index_dir)
        self._index = open_or_create(self.index_dir, self._model, self.model_name,
                                     {"source": "dicom listener", "identifiable": False})
        logging.getLogger("pynetdicom").setLevel(logging.ERROR)  # its debug output quotes datasets
        ae = AE(ae_title=self.ae_title)
        ae.require_calling_aet = list(self.allow)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            # Every transfer syntax, compressed ones included: a PACS sends what it stores (JPEG 2000...).
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_CLOSE, self._on_close)]
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            self._index.close()
            raise MedFinderError(f"Cannot listen on {self.host} port {self.port}: "
                                 f"{(exc.strerror or str(exc)).lower()}.") from None
        self._say(f"listening on port {self.port} as {self.ae_title}; accepting studies from {', '.join(self.allow)}")

    def serve(self, stop: threading.Event, poll_s: float = 0.25) -> ListenerSummary:
        """Index settled studies until ``stop`` is set; then stop the server, index what arrived whole,
        commit, and release the index."""
        try:
            while not stop.wait(poll_s):
                self._index_settled(final=False)
        finally:
            if self._server is not None:
                self._server.shutdown()
            try:
                self._index_settled(final=True)
            finally:
                self._index.close()
                if self._own_spool:
                    shutil.rmtree(self._spool, ignore_errors=True)
        return self.summary

    # ------------------------------------------------------------------ receiving (server threads)
    def _on_store(self, event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception:
            return CANNOT_UNDERSTAND
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not study_uid or not series_uid:
            return CANNOT_UNDERSTAND
        study_key = series_case_id(self._key, "study:" + study_uid)
        case_id = series_case_id(self._key, series_uid)
        reason = not_a_ct_slice(ds)
        text = report_text(ds) if reason == TEXT_REPORT else ""
        with self._lock:
            self.summary.received += 1
            study = self._studies.get(study_key) or _Study()
            self._studies[study_key] = study
            self._studies.move_to_end(study_key)
            study.last = time.monotonic()
            study.open.add(id(event.assoc))
            if reason == TEXT_REPORT:
                self._skipped_series.setdefault(TEXT_REPORT, set()).add(case_id)
                if text and text not in study.reports:
                    study.reports.append(text)
                    study.report_changed = bool(study.indexed)
                return SUCCESS
            if reason:
                self._skipped_series.setdefault(reason, set()).add(case_id)
                return SUCCESS
            n = study.series.get(case_id, 0)
            folder = self._spool / study_key / case_id
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                (folder / f"{n:06d}.dcm").write_bytes(event.encoded_dataset())
            except OSError:
                return OUT_OF_RESOURCES
            study.series[case_id] = n + 1
        return SUCCESS

    def _on_close(self, event: Any) -> None:
        with self._lock:
            for study in self._studies.values():
                study.open.discard(id(event.assoc))

    # ------------------------------------------------------------------ indexing (the main thread)
    def _index_settled(self, final: bool) -> None:
        now = time.monotonic()
        ready: list[tuple[str, _Study, dict[str, int], str, bool]] = []
        with self._lock:
            for key, study in list(self._studies.items()):
                if study.open and final:
                    # A transfer the stop cut off: the series may be incomplete; the sender will resend.
                    self.summary.not_indexed_at_stop += len(study.series)
                    shutil.rmtree(self._spool / key, ignore_errors=True)
                    study.series.clear()
                    continue
                if study.open or not (final or now - study.last >= self.settle_s):
                    continue
                if study.series or study.report_changed:
                    ready.append((key, study, dict(study.series), "\n\n".join(study.reports), study.report_changed))
                    study.series.clear()
                    study.report_changed = False
            for reason, series in self._skipped_series.items():
                self.summary.skipped[reason] = len(series)
        if not ready:
            return
        added = 0
        for key, study, series, report, report_changed in ready:
            entries = self._cases(key, series, report)
            fresh = {e.case_id for e in entries}
            earlier = [e for e in study.indexed if e.case_id not in fresh]
            if report_changed:  # a report that came after the study's cases: give it to them
                for entry in earlier:
                    entry.report, entry.parsed_report, entry.findings = report, None, []
                entries.extend(earlier)
            if entries:
                self._index.add(entries)
                added += len(fresh)
                study.indexed = earlier + [e for e in entries if e.case_id in fresh]
            shutil.rmtree(self._spool / key, ignore_errors=True)
        self._index.commit()
        self.summary.added += added
        with self._lock:
            self._forget_old_studies()

    def _cases(self, study_key: str, series: dict[str, int], report: str) -> list[CaseEntry]:
        usable = []
        for case_id, count in sorted(series.items()):
            files = sorted((self._spool / study_key / case_id).glob("*.dcm"))
            record = ManifestCase(case_id=case_id, image=Path("received") / case_id, report=report,
                                  metadata={"source_name": case_id})
            item = prepare_case(record, self._preprocessor, lambda _case, files=files: read_series(
                _read(files), case_id))
            if item["skipped"]:
                with self._lock:
                    self._skipped_series.setdefault(item["skipped"], set()).add(case_id)
                    self.summary.skipped[item["skipped"]] = len(self._skipped_series[item["skipped"]])
                log.warning("Series %s left out: %s", case_id, item["error"])
            elif item["error"]:
                self.summary.failed[case_id] = item["error"]
                log.warning("Series %s could not be indexed: %s", case_id, item["error"])
            else:
                usable.append(item)
                self._say(f"indexed {case_id} ({count} slices)")
        return encode_cases(self._model, usable) if usable else []

    def _forget_old_studies(self) -> None:
        idle = [k for k, s in self._studies.items() if not s.series and not s.open]
        for key in idle[: max(0, len(idle) - KEEP_STUDIES)]:
            del self._studies[key]

    def _say(self, line: str) -> None:
        if self.progress:
            print(line, file=sys.stderr, flush=True)


def _read(files: list[Path]) -> Iterator[Any]:
    import pydicom

    for path in files:
        try:
            yield pydicom.dcmread(path)
        except Exception as exc:  # a file cut short on a full disk
            raise SeriesSkipped("could not be read back from the spool", f"{type(exc).__name__}") from None
