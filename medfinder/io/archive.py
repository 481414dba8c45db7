"""A DICOM series in a .zip, unpacked in memory behind checks for escaping paths, links and zip bombs."""

from __future__ import annotations

import io
import stat
import zipfile
import zlib
from pathlib import Path
from typing import Any

from ..errors import UnreadableVolumeError, UnsafeArchiveError
from .dicom import assemble_series
from .volume import Volume, short_reason

#: A DICOM zip may not unpack to more than this many bytes in total.
DEFAULT_MAX_ARCHIVE_BYTES = 4 * 1024**3
#: A member larger than this that deflates more than BOMB_RATIO times is a zip bomb (DICOM
#: slices, even mostly air, compress far less; deflate's ceiling is about 1032:1).
BOMB_MIN_BYTES = 16 * 1024**2
BOMB_RATIO = 200


def load_dicom_zip(path: Path, max_voxels: int, max_bytes: int, name: str) -> Volume:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnreadableVolumeError(f"{name}: not a readable zip archive ({short_reason(exc)}).") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        _check_archive_members(members, name, max_bytes)
        budget = _ByteBudget(max_bytes, name)

        def opener(member: zipfile.ZipInfo) -> Any:
            # Members are read into memory through a counting reader: nothing touches disk,
            # and a member that lies about its size still stops at the budget.
            with archive.open(member) as fh:
                return io.BytesIO(budget.read_all(fh, member.filename))

        return assemble_series(((m, opener) for m in members), max_voxels, name)


def _check_archive_members(members: list[zipfile.ZipInfo], name: str, max_bytes: int) -> None:
    if not members:
        raise UnreadableVolumeError(f"{name}: the zip archive is empty; expected a DICOM series.")
    total = 0
    for m in members:
        fn = m.filename.replace("\\", "/")
        if fn.startswith("/") or (len(fn) > 1 and fn[1] == ":") or ".." in fn.split("/"):
            raise UnsafeArchiveError(f"{name}: the archive member {m.filename!r} points outside the archive folder.")
        mode = (m.external_attr >> 16) & 0o170000
        if mode == stat.S_IFLNK:
            raise UnsafeArchiveError(f"{name}: the archive member {m.filename!r} is a symbolic link.")
        total += m.file_size
        if m.file_size > BOMB_MIN_BYTES and m.file_size > BOMB_RATIO * max(m.compress_size, 1):
            raise UnsafeArchiveError(
                f"{name}: the archive member {m.filename!r} expands {m.file_size // max(m.compress_size, 1):,} times "
                "(a zip bomb), so it was not unpacked."
            )
    if total > max_bytes:
        raise UnsafeArchiveError(
            f"{name}: the archive would unpack to {total / 1e6:,.0f} MB, above the limit of {max_bytes / 1e6:,.0f} MB."
        )


class _ByteBudget:
    def __init__(self, limit: int, name: str) -> None:
        self.left = limit
        self.name = name

    def read_all(self, fh: Any, member: str) -> bytes:
        chunks = []
        while True:
            try:
                chunk = fh.read(1 << 20)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                raise UnreadableVolumeError(f"{self.name}: member {member!r} is corrupt ({short_reason(exc)}).") from None
            if not chunk:
                return b"".join(chunks)
            self.left -= len(chunk)
            if self.left < 0:
                raise UnsafeArchiveError(f"{self.name}: the archive unpacks past the size limit.")
            chunks.append(chunk)
