"""Exceptions that carry one sentence for a person.

Every error raised on purpose by MedFinder derives from ``MedFinderError``; ``str(error)``
is a complete sentence naming the file (or thing) and what is wrong with it, fit for a
command line (exit status 2) or a message in the app.
"""

from __future__ import annotations


class MedFinderError(Exception):
    """Base class: a problem a user can act on, described in one sentence."""


# --- input volumes -------------------------------------------------------------------
class VolumeError(MedFinderError):
    """A CT file or series cannot be turned into a trustworthy Volume."""


class UnreadableVolumeError(VolumeError):
    """The file is missing, empty, truncated, corrupt or of an unknown format."""


class NotCTError(VolumeError):
    """The data is not CT: another modality, or intensities that cannot be Hounsfield units."""


class NotAVolumeError(VolumeError):
    """The data is not a single 3D volume (2D, 4D with several frames, 5D...)."""


class InvalidValuesError(VolumeError):
    """Voxel values are NaN or infinite."""


class SpacingError(VolumeError):
    """Voxel spacing is zero, negative, non-finite or absurd."""


class SliceGeometryError(VolumeError):
    """A DICOM series has missing, duplicated, unevenly spaced or inconsistent slices."""


class VolumeTooLargeError(VolumeError):
    """The volume exceeds the configured voxel budget."""


class UnsafeArchiveError(VolumeError):
    """An archive has members that escape its folder, links, or unpacks past the size limit."""


# --- models, indexes, reports ----------------------------------------------------------
class ModelError(MedFinderError):
    """A model folder, config or checkpoint cannot be loaded or does not match."""


class CaseIndexError(MedFinderError):
    """An index folder is missing, corrupt, or was built by a different model."""


class ReportError(MedFinderError):
    """A report cannot be read (e.g. too large or not text)."""


class ManifestError(MedFinderError):
    """A manifest CSV or dataset folder is missing or malformed."""


# --- a PACS ----------------------------------------------------------------------------
class PacsError(MedFinderError):
    """A PACS cannot be used at all: unreachable, not a DICOMweb service, or it stopped answering.

    A build stops at once on this error (after committing what it had), unlike a problem with one
    series, which is skipped and counted.
    """


class PacsAuthError(PacsError):
    """The PACS refused the credentials (HTTP 401 or 403)."""


class SeriesSkipped(MedFinderError):
    """A series a PACS source leaves out rather than index: a localizer, a dose report, a broken
    series, one that could not be fetched. ``reason`` is the short category counted in the build
    summary; ``str()`` the sentence logged for it (naming the case by its keyed id, never a UID)."""

    def __init__(self, reason: str, sentence: str | None = None) -> None:
        super().__init__(sentence or reason)
        self.reason = reason


def os_error_sentence(exc: OSError) -> str:
    """One sentence for a file-system error, naming the path when the error carries one."""
    if isinstance(exc, FileNotFoundError):
        reason = "no such file or folder"
    elif isinstance(exc, PermissionError):
        reason = "permission denied"
    else:  # e.g. "Not a directory", "No space left on device"
        reason = str(exc.strerror or exc).rstrip(".")
        reason = reason[:1].lower() + reason[1:]
    name = getattr(exc, "filename", None)
    return f"{name}: {reason}." if name else f"A file could not be read or written: {reason}."
