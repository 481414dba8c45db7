"""DICOMweb: a PACS's CT series as cases, listed with QIDO-RS and fetched with WADO-RS, one at a time.

``PacsClient`` talks to the server through dicomweb-client, on a requests Session whose urllib3
``Retry`` retries dropped connections, timeouts and 408/429/5xx answers with exponential backoff.
Credentials come from the environment only (``MEDFINDER_DICOMWEB_USER`` and
``MEDFINDER_DICOMWEB_PASSWORD``, or ``MEDFINDER_DICOMWEB_TOKEN``); ``~/.netrc`` is not read. Every failure
becomes one sentence that names the server and never a UID or a credential:

- ``PacsAuthError`` (401/403) and ``PacsError`` (unreachable, not DICOMweb, stopped answering) stop a
  build: nothing more can be fetched;
- ``SeriesSkipped`` concerns one series (still failing after the retries, or not a valid volume):
  the build counts it and goes on.

``DicomwebSource`` is the case stream ``medfinder.index.build.build_index`` takes: study by study, the
CT series not yet in the index become ``ManifestCase`` records, named by a keyed hash of their
SeriesInstanceUID, with their study's report (from a CSV, or the study's text SRs); the series is
fetched only when the build loads it, so memory holds one series at a time whatever the archive's size.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Container, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

from ..errors import ManifestError, PacsAuthError, PacsError, SeriesSkipped, VolumeError
from .deidentify import series_case_id
from .dicom import DOSE_REPORT, OTHER_SR, TEXT_REPORT, assemble_datasets, not_a_ct_slice
from .manifests import ManifestCase, _open_csv
from .structured_reports import is_dose_report, is_text_report, report_text
from .volume import DEFAULT_MAX_VOXELS, Volume

log = logging.getLogger(__name__)

ENV_USER = "MEDFINDER_DICOMWEB_USER"
ENV_PASSWORD = "MEDFINDER_DICOMWEB_PASSWORD"
ENV_TOKEN = "MEDFINDER_DICOMWEB_TOKEN"
#: Seconds to wait for a connection or for the next bytes of an answer.
DEFAULT_TIMEOUT_S = 30.0
#: Retries of one request (connection errors, timeouts, 408/429/5xx); waits 0, 2x, 4x... backoff seconds.
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.5
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
#: Studies asked for per QIDO-RS page.
STUDY_PAGE = 200
#: Series-level fields asked of QIDO-RS. Orthanc answers instance-level ones (SOP class, ImageType)
#: from one instance of the series, which spares fetching a localizer or a dose report to skip it;
#: servers that do not are fine too: the fetched instances are classified again.
SERIES_FIELDS = ["00080016", "00080008", "0008103E", "00201209"]
#: Reasons a series is skipped after the listing, beside those of ``medfinder.io.dicom``.
FETCH_FAILED = "could not be fetched (still failing after retries)"
NOT_A_VOLUME = "not a valid CT volume"
#: ``ManifestCase`` sources of linked cases (``--link-to-pacs``): "dicomweb:<study uid>/<series uid>".
PACS_SOURCE_PREFIX = "dicomweb:"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
#: Accept the transfer syntax the PACS stores (JPEG 2000, JPEG-LS...): asking for Explicit VR Little
#: Endian makes the server decompress, which Orthanc cannot do for JPEG 2000 without a plugin.
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)


def display_url(url: str) -> str:
    """The URL as sentences show it: scheme, host, port and path; never credentials or a query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def pacs_source(study_uid: str, series_uid: str) -> str:
    """The source of a linked case: where a PACS viewer finds it."""
    return f"{PACS_SOURCE_PREFIX}{study_uid}/{series_uid}"


def parse_pacs_source(source: str | None) -> tuple[str, str] | None:
    """(Study UID, Series UID) of a linked case's source, or None for any other source."""
    if not source or not source.startswith(PACS_SOURCE_PREFIX):
        return None
    study, _, series = source[len(PACS_SOURCE_PREFIX):].partition("/")
    return (study, series) if _UID.match(study) and _UID.match(series) else None


def is_uid(text: str) -> bool:
    """True when ``text`` has the form of a DICOM UID (digits and dots, at most 64 characters)."""
    return bool(_UID.match(text.strip())) and len(text.strip()) <= 64


def check_study_date(value: str) -> str:
    """``--since``: a real date as YYYYMMDD, or a ValueError with one sentence."""
    try:
        datetime.strptime(value, "%Y%m%d")
    except (TypeError, ValueError):
        raise ValueError(f"--since must be a date as YYYYMMDD (e.g. 20240131), not {value!r}.") from None
    return value


def _quiet_library_loggers() -> None:
    # urllib3 logs each retry with the request's path, and dicomweb-client logs its URLs: both hold
    # Study and Series UIDs. MedFinder logs its own sentences instead.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    logging.getLogger("dicomweb_client").setLevel(logging.CRITICAL)


def make_session(url: str, env: Mapping[str, str], retries: int, backoff_s: float) -> Any:
    """A requests Session for ``url``: urllib3 retries with backoff, and the credentials of ``env``."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    # No ~/.netrc or other credentials from outside MedFinder's variables; proxies still apply.
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(url))
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, other=0,
                  backoff_factor=backoff_s, status_forcelist=RETRY_STATUSES,
                  allowed_methods=frozenset({"GET", "HEAD"}), raise_on_status=False,
                  respect_retry_after_header=False)
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    token = (env.get(ENV_TOKEN) or "").strip()
    user, password = env.get(ENV_USER) or "", env.get(ENV_PASSWORD) or ""
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user or password:
        if not (user and password):
            missing = ENV_PASSWORD if user else ENV_USER
            raise PacsAuthError(f"{ENV_USER} and {ENV_PASSWORD} go together for authentication, but {missing} is not set.")
        session.auth = (user, password)
    return session


def _why(exc: BaseException) -> str:
    """What went wrong with a connection, from the exception chain, never its text (it holds URLs)."""
    seen: list[BaseException] = []
    stack = [exc]
    while stack and len(seen) < 20:
        e = stack.pop()
        seen.append(e)
        stack.extend(x for x in (e.__cause__, e.__context__, *getattr(e, "args", ())) if isinstance(x, BaseException))
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
    names = {type(e).__name__ for e in seen}
    if "ConnectionRefusedError" in names or any("refused" in type(e).__name__.lower() for e in seen):
        return "connection refused"
    if names & {"NameResolutionError", "gaierror"}:
        return "the host name does not resolve"
    if names & {"SSLError", "SSLCertVerificationError"}:
        return "its TLS certificate was refused"
    if names & {"ReadTimeoutError", "ReadTimeout", "ConnectTimeoutError", "ConnectTimeout", "TimeoutError", "timeout"}:
        return "no answer in time"
    if names & {"ProtocolError", "ChunkedEncodingError", "IncompleteRead", "RemoteDisconnected"}:
        return "the connection broke off"
    return "the connection failed"


@dataclass(frozen=True)
class SeriesInfo:
    """A series as QIDO-RS lists it: its UIDs and the header fields the server gave (a pydicom Dataset)."""

    study_uid: str
    series_uid: str
    header: Any

    @property
    def modality(self) -> str:
        return str(self.header.get("Modality", "") or "").upper()


class PacsClient:
    """A DICOMweb server, read with QIDO-RS and WADO-RS.

    Args:
        url: the DICOMweb root (Orthanc: ``http://host:8042/dicom-web``); credentials never go in it.
        timeout_s: seconds to wait for a connection or for the next bytes of an answer.
        retries: retries of a request that times out, breaks off, or answers 408, 429 or 5xx.
        backoff_s: the backoff factor between retries (urllib3: 0, 2x, 4x... seconds).
        env: where credentials are read (default ``os.environ``).
    """

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 backoff_s: float = DEFAULT_BACKOFF_S, env: Mapping[str, str] | None = None) -> None:
        from dicomweb_client.api import DICOMwebClient

        parts = urlsplit(url.strip())
        if parts.username or parts.password:
            raise PacsError(f"The DICOMweb URL must not hold credentials; set {ENV_USER} and {ENV_PASSWORD}, "
                            f"or {ENV_TOKEN}, instead.")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError("The DICOMweb URL must start with http:// or https:// and name a server, "
                            "e.g. http://pacs:8042/dicom-web.")
        self.url = display_url(url.strip())
        self.retries = retries
        _quiet_library_loggers()
        session = make_session(self.url, os.environ if env is None else env, retries, backoff_s)
        try:
            self._dw = DICOMwebClient(self.url, session=session, timeout=timeout_s)
        except ValueError:
            raise PacsError(f"{self.url} is not a usable DICOMweb URL.") from None
        self._dw.set_http_retry_params(retry=False)  # the session's urllib3 Retry does it, with backoff
        self._timeout_s = timeout_s
        # Asked once, without retries, after a series fails: the series' own retries already waited.
        self._probe = make_session(self.url, os.environ if env is None else env, 0, 0.0)

    # ------------------------------------------------------------------ errors
    @contextmanager
    def _errors(self, what: str, series: bool = False) -> Iterator[None]:
        """Map what requests and dicomweb-client raise to one sentence: ``PacsError`` for the server,
        ``SeriesSkipped`` for one series (``series``) when the server itself still answers."""
        import requests

        try:
            yield
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (401, 403):
                raise PacsAuthError(
                    f"The DICOMweb server at {self.url} refused access (HTTP {status}): authentication failed; set "
                    f"{ENV_USER} and {ENV_PASSWORD}, or {ENV_TOKEN}, for an account allowed to read it."
                ) from None
            if series and status not in (400, 404, 405, 406):
                raise SeriesSkipped(FETCH_FAILED, f"HTTP {status} to {what}, after {self.retries} retries") from None
            if series and status in (404, 406):
                raise SeriesSkipped(FETCH_FAILED, f"HTTP {status} to {what} (gone from the PACS, or in a "
                                                  "form it cannot send)") from None
            if status in (400, 404, 405, 406):
                raise PacsError(
                    f"{self.url} does not answer as a DICOMweb server (HTTP {status} to {what}); give the DICOMweb "
                    "root, e.g. http://pacs:8042/dicom-web for Orthanc."
                ) from None
            raise PacsError(f"The DICOMweb server at {self.url} answered HTTP {status} to {what}, "
                            f"still after {self.retries} retries.") from None
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            if series and self.reachable():
                raise SeriesSkipped(FETCH_FAILED, f"{_why(exc)} during {what}, after {self.retries} retries") from None
            raise PacsError(f"Cannot reach the DICOMweb server at {self.url} ({_why(exc)}).") from None
        except requests.RequestException as exc:
            raise PacsError(f"The DICOMweb server at {self.url} could not be asked to {what} "
                            f"({type(exc).__name__}).") from None
        except ValueError:  # an answer that is not DICOM JSON, or not multipart DICOM
            if series:
                raise SeriesSkipped(FETCH_FAILED, f"the answer to {what} is not DICOM") from None
            raise PacsError(f"{self.url} does not answer as a DICOMweb server (its answer to {what} is not "
                            "DICOM JSON); give the DICOMweb root, e.g. http://pacs:8042/dicom-web for Orthanc.") from None

    def _search(self, what: str, call: Callable[[], Any]) -> list[dict]:
        with self._errors(what):
            found = call()
        if not isinstance(found, list) or not all(isinstance(item, dict) for item in found):
            raise PacsError(f"{self.url} does not answer as a DICOMweb server (its answer to {what} is not a "
                            "list of DICOM JSON objects); give the DICOMweb root, e.g. http://pacs:8042/dicom-web.")
        return found

    def reachable(self) -> bool:
        """Whether the server still answers a one-study search (told apart from one series failing)."""
        import requests

        try:
            answer = self._probe.get(f"{self.url}/studies", params={"limit": 1}, timeout=self._timeout_s,
                                     headers={"Accept": "application/dicom+json"})
        except requests.RequestException:
            return False
        return answer.status_code < 500

    # ------------------------------------------------------------------ QIDO-RS, WADO-RS
    def check(self) -> None:
        """Fail fast, before anything is written: the server answers, as DICOMweb, to these credentials."""
        self._search("a study search", lambda: self._dw.search_for_studies(limit=1))

    def studies(self, since: str | None = None, page: int = STUDY_PAGE) -> Iterator[Any]:
        """Every study (from ``since``, YYYYMMDD, on), a page at a time, as pydicom Datasets."""
        filters = {"StudyDate": f"{since}-"} if since else None
        offset = 0
        while True:
            found = self._search("a study search", lambda: self._dw.search_for_studies(
                offset=offset, limit=page, fields=["00080050", "00080020"], search_filters=filters))
            for item in found:
                yield _dataset(item)
            if len(found) < page:
                return
            offset += len(found)

    def find_studies(self, study: str) -> list[Any]:
        """The studies a Study Instance UID or an accession number names (a UID-shaped text is tried as
        both)."""
        text = study.strip()
        found: list[dict] = []
        if is_uid(text):
            found = self._search("a study search", lambda: self._dw.search_for_studies(
                search_filters={"StudyInstanceUID": text}, fields=["00080050"]))
        if not found:
            found = self._search("a study search", lambda: self._dw.search_for_studies(
                search_filters={"AccessionNumber": text}, fields=["00080050"]))
        return [_dataset(item) for item in found]

    def series(self, study_uid: str) -> list[SeriesInfo]:
        """The series of one study, with what the server tells of them (modality, SOP class, ImageType)."""
        found = self._search("a series search", lambda: self._dw.search_for_series(
            study_instance_uid=study_uid, fields=SERIES_FIELDS))
        out = []
        for item in found:
            header = _dataset(item)
            uid = str(header.get("SeriesInstanceUID", "") or "")
            if uid:
                out.append(SeriesInfo(study_uid, uid, header))
        return out

    def fetch_series(self, study_uid: str, series_uid: str) -> Iterator[Any]:
        """The instances of one series, streamed as pydicom Datasets in the transfer syntax stored."""
        what = "a series retrieval"
        with self._errors(what, series=True):
            instances = self._dw.iter_series(study_uid, series_uid, media_types=ANY_TRANSFER_SYNTAX)
        while True:
            with self._errors(what, series=True):
                try:
                    ds = next(instances)
                except StopIteration:
                    return
            yield ds


def _dataset(item: dict) -> Any:
    import pydicom

    try:
        return pydicom.Dataset.from_json(item)
    except Exception:  # a field pydicom cannot parse: keep those it can
        ds = pydicom.Dataset()
        for tag, value in item.items():
            try:
                ds.update(pydicom.Dataset.from_json({tag: value}))
            except Exception:
                continue
        return ds


# ------------------------------------------------------------------ reports from a CSV
@dataclass
class ReportTable:
    """Reports by StudyInstanceUID and by accession number, from ``--reports CSV``.

    Held in memory while a build runs and never stored: the keys identify studies.
    """

    by_study: dict[str, str] = field(default_factory=dict)
    by_accession: dict[str, str] = field(default_factory=dict)

    def lookup(self, study_uid: str, accession: str) -> str | None:
        if study_uid and study_uid in self.by_study:
            return self.by_study[study_uid]
        if accession and accession in self.by_accession:
            return self.by_accession[accession]
        return None

    def __len__(self) -> int:
        return len(self.by_study) + len(self.by_accession)


def read_report_table(path: str | os.PathLike[str]) -> ReportTable:
    """Reports from a CSV with columns ``AccessionNumber,report`` or ``StudyInstanceUID,report`` (or both)."""
    path = Path(path)
    columns, rows = _open_csv(path, "report table")
    if "report" not in columns or not ({"AccessionNumber", "StudyInstanceUID"} & set(columns)):
        raise ManifestError(f"The report table {path} needs the columns AccessionNumber,report or "
                            "StudyInstanceUID,report.")
    table = ReportTable()
    for row in rows:
        text = (row.get("report") or "").strip()
        if not text:
            continue
        study, accession = (row.get("StudyInstanceUID") or "").strip(), (row.get("AccessionNumber") or "").strip()
        if study:
            table.by_study[study] = text
        elif accession:
            table.by_accession[accession] = text
    return table


# ------------------------------------------------------------------ the case stream of a build
def read_series(instances: Iterator[Any], label: str, max_voxels: int = DEFAULT_MAX_VOXELS,
                first: dict | None = None) -> Volume:
    """The CT volume of one series' instances, leaving out those that are not CT slices (a localizer
    sent in the series); a series with no slice left raises ``SeriesSkipped`` with the reason, one
    that does not form a valid volume raises it with ``NOT_A_VOLUME`` and the loader's sentence.

    ``first``, if given, receives ``slices`` (how many instances were kept) and ``orientation`` (the
    ImageOrientationPatient of the first kept one), for choosing among a study's series.
    """
    left_out: Counter[str] = Counter()
    info = first if first is not None else {}
    info["slices"] = 0

    def slices() -> Iterator[Any]:
        for ds in instances:
            reason = not_a_ct_slice(ds)
            if reason:
                left_out[reason] += 1
                continue
            if info["slices"] == 0:
                info["orientation"] = list(ds.get("ImageOrientationPatient") or [])
            info["slices"] += 1
            yield ds

    try:
        return assemble_datasets(slices(), max_voxels, label)
    except VolumeError as exc:
        if info["slices"] == 0 and left_out:
            reason = left_out.most_common(1)[0][0]
            raise SeriesSkipped(reason, f"{label}: {reason}.") from None
        raise SeriesSkipped(NOT_A_VOLUME, str(exc)) from None


class DicomwebSource:
    """The cases of a DICOMweb build, streamed study by study (``build_index`` takes it as its records).

    Args:
        client: the PACS.
        key: the index's case-id key (``medfinder.index.privacy.case_id_key``).
        reports: reports by StudyInstanceUID or accession number (``read_report_table``); a study they
            miss takes the text of its text SRs.
        since: only studies from this date on (YYYYMMDD).
        link_to_pacs: keep each case's Study and Series UIDs (as its source) for a viewer link; off by default.
        max_voxels: the largest volume accepted.
    """

    def __init__(self, client: PacsClient, key: bytes, reports: ReportTable | None = None, since: str | None = None,
                 link_to_pacs: bool = False, max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
        self.client = client
        self.key = key
        self.reports = reports or ReportTable()
        self.since = since
        self.link_to_pacs = link_to_pacs
        self.max_voxels = max_voxels
        #: Series left out, by reason (the build adds it to its summary).
        self.skipped: Counter[str] = Counter()
        self._pending: dict[str, tuple[str, str]] = {}

    def case_id(self, series_uid: str) -> str:
        return series_case_id(self.key, series_uid)

    def cases(self, done: Container[str]) -> Iterator[ManifestCase]:
        """One record per CT series not in ``done``, its report attached; series that are not CT
        volumes are counted in ``skipped`` as they are listed (from what QIDO-RS tells) or fetched."""
        for study in self.client.studies(self.since):
            study_uid = str(study.get("StudyInstanceUID", "") or "")
            if not study_uid:
                continue
            candidates, reports = [], []
            for series in self.client.series(study_uid):
                reason = not_a_ct_slice(series.header)
                told = "SOPClassUID" in series.header  # whether the server said what kind of SR it is
                if series.modality == "SR" or reason in (TEXT_REPORT, OTHER_SR):
                    if told:
                        self.skipped[reason or OTHER_SR] += 1
                    if reason == TEXT_REPORT or not told:
                        reports.append((series, told))
                elif reason:
                    self.skipped[reason] += 1
                else:
                    candidates.append(series)
            todo = [s for s in candidates if self.case_id(s.series_uid) not in done]
            if not todo:
                continue
            report = self._study_report(study_uid, str(study.get("AccessionNumber", "") or ""), reports)
            for series in todo:
                case_id = self.case_id(series.series_uid)
                self._pending[case_id] = (study_uid, series.series_uid)
                source = pacs_source(study_uid, series.series_uid) if self.link_to_pacs else case_id
                # ``image`` is a placeholder the build hands back to ``load``; it appears in no sentence.
                yield ManifestCase(case_id=case_id, image=Path("pacs") / case_id, report=report,
                                   metadata={"source_name": source})

    def load(self, case: ManifestCase) -> Volume:
        """The ``ScanLoader`` of the build: fetch the case's series (WADO-RS) and assemble its volume."""
        try:
            study_uid, series_uid = self._pending.pop(case.case_id)
        except KeyError:
            raise SeriesSkipped(FETCH_FAILED, f"{case.case_id}: this series was not listed by this build.") from None
        return read_series(self.client.fetch_series(study_uid, series_uid), case.case_id, self.max_voxels)

    def _study_report(self, study_uid: str, accession: str, reports: list[tuple[SeriesInfo, bool]]) -> str:
        """The study's report: the CSV's, else the text of its text SRs in series order. An SR series
        whose kind the listing did not tell (``told`` false) is counted here, once read."""
        listed = self.reports.lookup(study_uid, accession)
        if listed is not None and all(told for _, told in reports):
            return listed
        texts = []
        for series, told in reports:
            label = f"an SR series ({self.case_id(series.series_uid)})"
            kinds: Counter[str] = Counter()
            try:
                for ds in self.client.fetch_series(study_uid, series.series_uid):
                    if is_dose_report(ds):
                        kinds[DOSE_REPORT] += 1
                    elif is_text_report(ds):
                        kinds[TEXT_REPORT] += 1
                        text = report_text(ds)
                        if text:
                            texts.append(text)
                    else:
                        kinds[OTHER_SR] += 1
            except SeriesSkipped as exc:
                log.warning("%s was not read: %s.", label, exc)
                if not told:
                    self.skipped[exc.reason] += 1
                continue
            if not told:
                self.skipped[kinds.most_common(1)[0][0] if kinds else OTHER_SR] += 1
        if listed is not None:
            return listed
        return "\n\n".join(texts)
