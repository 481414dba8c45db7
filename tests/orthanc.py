"""A real Orthanc server for the PACS tests: its own storage, free ports, authentication on, DICOMweb.

Debian's ``orthanc`` and ``orthanc-dicomweb`` (``.ci/run`` installs them); tests that need it skip when
either is missing. Orthanc runs as a plain process with a JSON configuration, as the Debian service
would, and is stopped (or killed, to test a server that dies) by the test.
"""

from __future__ import annotations

import io
import json
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

import requests

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AVAILABLE = ORTHANC.exists() and DICOMWEB_PLUGIN.exists()
SKIP_REASON = "Debian orthanc and orthanc-dicomweb are not installed (.ci/run installs them)"
ORTHANC_AET = "ORTHANC"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Orthanc:
    """One Orthanc process. ``modalities``: name -> (AE title, port) of DICOM nodes on this machine it may
    send to (``DicomModalities``)."""

    def __init__(self, root: Path, modalities: dict[str, tuple[str, int]] | None = None) -> None:
        self.root = root
        self.user, self.password = "medfinder-test", secrets.token_urlsafe(12)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.modalities = modalities or {}
        self.proc: subprocess.Popen | None = None
        self.session = requests.Session()
        self.session.auth = (self.user, self.password)
        self.session.trust_env = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def env(self, **extra: str) -> dict[str, str]:
        """Credentials as MedFinder reads them."""
        return {"MEDFINDER_DICOMWEB_USER": self.user, "MEDFINDER_DICOMWEB_PASSWORD": self.password, **extra}

    def start(self, timeout_s: float = 30.0) -> "Orthanc":
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "MedFinder test PACS",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in self.modalities.items()},
            "DicomScuTimeout": 10,
            "StableAge": 1,
        }
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self.log = open(self.root / "orthanc.log", "ab")
        # Orthanc dies with the test process, even one killed before its teardown.
        self.proc = subprocess.Popen([str(ORTHANC), str(path)], stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.session.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not start in {timeout_s} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return (self.root / "orthanc.log").read_bytes()[-2000:].decode(errors="replace")

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    # ------------------------------------------------------------------ its REST API
    def upload(self, items: Iterable[Any]) -> int:
        """Upload DICOM files (paths) or pydicom datasets with ``POST /instances``; returns how many."""
        count = 0
        for item in items:
            if isinstance(item, (str, Path)):
                data = Path(item).read_bytes()
            else:
                buffer = io.BytesIO()
                item.save_as(buffer, enforce_file_format=True)
                data = buffer.getvalue()
            answer = self.session.post(f"{self.url}/instances", data=data, timeout=30)
            answer.raise_for_status()
            count += 1
        return count

    def lookup(self, uid: str) -> str:
        """Orthanc's own id of the study, series or instance with this UID."""
        answer = self.session.post(f"{self.url}/tools/lookup", data=uid, timeout=10)
        answer.raise_for_status()
        found = answer.json()
        if not found:
            raise KeyError("no such UID in Orthanc")
        return found[0]["ID"]

    def send(self, modality: str, uids: list[str]) -> dict:
        """C-STORE the studies or series with these UIDs to a declared modality (``/modalities/{id}/store``)."""
        answer = self.session.post(f"{self.url}/modalities/{modality}/store",
                                   json={"Resources": [self.lookup(u) for u in uids], "Synchronous": True},
                                   timeout=120)
        answer.raise_for_status()
        return answer.json()


class FaultyProxy:
    """An HTTP proxy in front of Orthanc that breaks requests on purpose: ``rule(method, path, attempt)``
    returns None (forward), ``("status", code)`` (answer that error) or ``("delay", seconds)`` (wait, then
    forward); ``attempt`` counts the requests seen for that path, from 1."""

    def __init__(self, upstream: str, rule: Any) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        proxy = self
        self.upstream, self.rule = upstream, rule
        self.seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._session.trust_env = False

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with proxy._lock:
                    attempt = proxy.seen[self.path] = proxy.seen.get(self.path, 0) + 1
                action = proxy.rule("GET", self.path, attempt)
                if action and action[0] == "status":
                    self.send_response(action[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if action and action[0] == "delay":
                    time.sleep(action[1])
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")}
                try:
                    answer = proxy._session.get(proxy.upstream + self.path, headers=headers, timeout=60)
                except requests.RequestException:
                    self.send_response(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = answer.content
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in ("transfer-encoding", "content-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout it was told to have)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
