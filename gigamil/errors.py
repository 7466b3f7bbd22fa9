"""The exceptions gigamil raises for problems a user can fix.

Every message says what went wrong *and* what to do about it; the CLI prints
``str(error)`` as one red line and exits non-zero, never a traceback.
"""

from __future__ import annotations

__all__ = [
    "GigamilError",
    "UsageError",
    "BackendUnavailableError",
    "SlideError",
    "SlideOpenError",
    "MissingMppError",
    "UpsampleError",
    "SlideTooSmallError",
    "UnreadableRegionError",
    "StainFitError",
    "StoreError",
    "CopyCancelled",
    "TrainingInterrupted",
    "NoPatchesError",
    "DiskFullError",
    "is_disk_full",
]


class GigamilError(Exception):
    """Base class: a problem the user can fix. ``hint`` says how."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} — {hint}" if hint else message)


class UsageError(GigamilError):
    """Bad options or paths given on the command line."""


class BackendUnavailableError(GigamilError):
    """A requested optional backend (cucim, …) is not installed."""


class SlideError(GigamilError):
    """A slide cannot be processed; the batch goes on without it."""


class SlideOpenError(SlideError):
    """The file is not a slide, or it is truncated/unreadable."""


class MissingMppError(SlideError):
    """The slide does not record its resolution (µm per pixel)."""


class UpsampleError(SlideError):
    """The requested resolution is finer than the slide was scanned at."""


class SlideTooSmallError(SlideError):
    """The slide is smaller than a single patch at the requested resolution."""


class UnreadableRegionError(SlideError):
    """Pixels under a region cannot be decoded (a damaged or missing tile).

    Raised by a reader for one region read; extraction then reads that region's
    patches one by one and leaves out (and counts as ``unreadable``) the ones that
    still fail, so that no garbage pixel is ever stored.
    """


class StainFitError(SlideError):
    """The slide's stain could not be estimated (too little tissue in the sample)."""


class CopyCancelled(GigamilError):
    """A staging copy stopped because its slide was released or the stager closed
    (control flow inside :mod:`gigamil.cluster.staging`; never reaches a user)."""


class StoreError(GigamilError):
    """A patch store or feature file is missing, incomplete or inconsistent."""


class TrainingInterrupted(GigamilError):
    """Training stopped on request after writing a checkpoint."""


class NoPatchesError(UsageError):
    """No patch of a slide passed QC, so there is nothing to predict from."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        super().__init__(f"{sid}: no tissue patches passed QC",
                         "check the slide, or lower --min-tissue when extracting")

    def __reduce__(self) -> tuple[type, tuple[str]]:  # back from a Ray or pool worker intact
        return (type(self), (self.sid,))


class DiskFullError(GigamilError):
    """The output's file system is full: the run stops (every later slide would fail too)."""

    def __init__(self, directory: object) -> None:
        self.directory = directory
        super().__init__(f"no space left on the device of {directory}",
                         "free space there (or choose another --out) and rerun: finished "
                         "outputs are kept and only the rest is done")

    def __reduce__(self) -> tuple[type, tuple[object]]:  # back from a worker process intact
        return (type(self), (self.directory,))


def is_disk_full(exc: BaseException, directory: object = None) -> bool:
    """Whether ``exc`` (or what caused it) is the file system running out of space, as
    Python, LMDB, HDF5 and torch report it. Some writers do not say so (LMDB through its
    memory map: "Input/output error"; torch: "file write failed"): given the
    ``directory`` written to, a failure there counts when it has less than 16 MB left."""
    import errno
    import shutil

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    if directory is None:
        return False
    try:
        return shutil.disk_usage(str(directory)).free < 16 << 20
    except OSError:
        return False
