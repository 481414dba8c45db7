"""Uploads are not kept: a private folder, each file deleted once read, the folder removed on exit.

Gradio writes uploads under ``GRADIO_TEMP_DIR``; the folder is made private to this process and
set before any Blocks exists. Gradio stores identical uploads at one path, so a file is deleted
only once no request is still reading it (a reference count per path).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable

from ..errors import MedFinderError
from ..io import Volume, load_volume


class UploadFolder:
    """The app's private upload folder and the reading of uploaded CTs out of it."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="medfinder-uploads-"))
        self._lock = threading.Lock()
        self._in_use: dict[str, int] = {}

    def install(self) -> "UploadFolder":
        """Make Gradio put uploads here, and remove the folder when the process ends."""
        os.environ["GRADIO_TEMP_DIR"] = str(self.path)
        atexit.register(self.remove)
        return self

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def holds(self, path: str | Path) -> bool:
        return Path(path).resolve().is_relative_to(self.path.resolve())

    def read(self, paths: Iterable[str]) -> Volume:
        """Load the CT the files make up; every one of them that is an upload is deleted after reading,
        whether it loaded or not. Raises MedFinderError with one sentence."""
        paths = [str(p) for p in paths]
        uploads = [p for p in paths if self.holds(p)]
        with self._lock:
            for p in uploads:
                self._in_use[p] = self._in_use.get(p, 0) + 1
        try:
            target: Any = paths if len(paths) > 1 else paths[0]
            return load_volume(target)
        finally:
            with self._lock:
                for p in uploads:
                    self._in_use[p] -= 1
                    if not self._in_use[p]:
                        del self._in_use[p]
                        Path(p).unlink(missing_ok=True)


def upload_paths(files: Any) -> list[str]:
    """The file paths of a Gradio File value (a path, an object with ``.name``, or a list of those)."""
    items = files if isinstance(files, (list, tuple)) else ([files] if files else [])
    paths = [f if isinstance(f, str) else getattr(f, "name", None) for f in items]
    return [p for p in paths if p]


__all__ = ["MedFinderError", "UploadFolder", "upload_paths"]
