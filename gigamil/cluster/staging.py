# cohesive: one stager — its copier thread, byte budget, signal and stale-folder cleanup
"""Copy the next slides to node-local disk while the current one is read (``--stage-dir``).

On Lustre/GPFS, the random tile reads of extraction are slow, while one sequential copy
is fast. :class:`SlideStager` copies slides, in the order they will be read, from the
shared filesystem to a local folder (``$TMPDIR`` on a compute node) a few slides ahead
of the reader::

    with SlideStager(paths, Path(os.environ["TMPDIR"]), max_bytes=20 * GiB, ahead=2) as st:
        for path in paths:
            local = st.get(path)       # blocks until the copy is complete
            extract(local)             # same file name: the slide id does not change
            st.release(path)           # deletes the copy; the copier goes on

Guarantees:

- one background thread copies, sequentially, into a private folder
  ``stage_dir/gigamil-stage-<host>-<pid>-<random>/``, one sub-folder per slide, written
  under a temporary name and renamed when complete: a half-copied slide is never handed out;
- at most ``max_bytes`` of copies are on disk at once (apparent file sizes, counted from
  the start of each copy), and at most ``ahead`` copies wait that no :meth:`~SlideStager.get`
  has handed out yet;
- ``get`` of a slide that is not copied yet moves it to the front (a pool of workers takes
  slides as they come). ``get`` never waits for a ``release``: when a requested slide cannot
  be staged (larger than ``max_bytes``, no room beside the slides in use, disk full, a
  permission error, a copy that fails) it returns the original path and records a note in
  :attr:`~SlideStager.notes` — the slide is then read from the shared filesystem, and never
  fails because of staging;
- every copy and the private folder are removed when the ``with`` block ends (normally or
  by an exception) and when the process gets SIGTERM (SLURM pre-emption and time limits;
  a handler is installed only when the stager is made in the main thread, and chains to the
  handler that was there before). A job killed with SIGKILL cannot clean up: its folder is
  removed by the next stager started in the same ``stage_dir`` on the same host, which
  finds that the folder's lock (``fcntl.flock`` held by its living owner) can be taken.
  (On SLURM, ``$TMPDIR`` is usually wiped at the end of the job anyway.)

The stager is thread-safe and lives in one process: the process that hands slides to the
extract pool calls ``get``/``release``; the workers only see the local paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal

from gigamil.errors import CopyCancelled, UsageError
from gigamil.wsi.discovery import slide_files

__all__ = ["SlideStager", "slide_files", "slide_bytes", "remove_stale", "DEFAULT_MAX_BYTES", "GiB",
           "STAGE_PREFIX"]

log = logging.getLogger("gigamil")

GiB = 1 << 30
DEFAULT_MAX_BYTES = 20 * GiB
#: the private folders of stagers are ``STAGE_PREFIX<host>-<pid>-<random>``
STAGE_PREFIX = "gigamil-stage-"

_LOCK = ".lock"
_NEW_PREFIX = ".gigamil-stage-new-"  # a private folder before its lock is held
_CHUNK = 8 << 20  # sequential reads of 8 MiB: a few RPCs per chunk on Lustre/GPFS
_FREE_MARGIN = 256 << 20  # leave this much free on the stage disk
_POLL_S = 0.5  # waits wake up this often (a signal handler, a dead copier)

_State = Literal["pending", "copying", "ready", "in_place", "released"]


def _walk(path: Path) -> Iterator[Path]:
    """Every file under ``path`` (itself if it is a file)."""
    if path.is_dir():
        for root, _dirs, files in os.walk(path, followlinks=True):
            for name in files:
                yield Path(root) / name
    else:
        yield path


def slide_bytes(path: str | os.PathLike[str]) -> int:
    """The size of a slide on disk: every file of :func:`slide_files` (apparent sizes)."""
    return sum(f.stat().st_size for top in slide_files(path) for f in _walk(top))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _remove_folder(folder: Path) -> bool:
    """Remove a private folder, its lock file last (so that a folder that could not be
    removed whole keeps the lock that tells the next stager its owner is gone)."""
    with contextlib.suppress(OSError):
        for child in folder.iterdir():
            if child.name == _LOCK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    child.unlink()
    try:
        if any(c.name != _LOCK for c in folder.iterdir()):
            return False
        with contextlib.suppress(FileNotFoundError):
            (folder / _LOCK).unlink()
        folder.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(stage_dir: Path, host: str) -> list[Path]:
    """Remove the private folders in ``stage_dir`` of dead stagers on this host; return them.

    A folder belongs to a dead process when its lock can be taken (or, where it has no lock
    file, when the pid in its name is not running). Folders of other hosts are left alone
    (``flock`` does not reach across nodes on every filesystem).
    """
    removed: list[Path] = []
    try:
        candidates = sorted(stage_dir.glob(f"{STAGE_PREFIX}*"))
        unborn = sorted(stage_dir.glob(f"{_NEW_PREFIX}*"))
    except OSError:
        return removed
    for folder in unborn:  # killed before its folder got its name: no pid to check
        with contextlib.suppress(OSError):
            if time.time() - folder.stat().st_mtime > 3600 and _remove_folder(folder):
                removed.append(folder)
    for folder in candidates:
        parts = folder.name[len(STAGE_PREFIX):].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or not folder.is_dir():
            continue
        try:
            fd = os.open(folder / _LOCK, os.O_RDWR)
        except FileNotFoundError:
            if not _pid_alive(int(parts[1])) and _remove_folder(folder):
                removed.append(folder)
            continue
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a living stager, or flock unsupported here: leave it
                continue
            if _remove_folder(folder):
                removed.append(folder)
        finally:
            os.close(fd)
    return removed


@dataclasses.dataclass(eq=False)
class _Slide:
    """One source and its copy."""

    source: Path
    index: int
    state: _State = "pending"
    size: int = -1  # bytes, measured when first considered for copying
    local: Path | None = None  # the path handed out, once ready
    handed: bool = False  # a ``get`` returned the copy
    requested: int = 0  # >0: a ``get`` waits for it (the order of the requests)


class SlideStager:
    """Copies slides ahead of their reading to ``stage_dir``; see the module docstring.

    ``sources``: the slides, in the order they will (mostly) be read, each a file, a
    DICOM series folder or a ``.mrxs`` file (copied with its data folder).
    ``max_bytes``: the most bytes of copies on disk at once. ``ahead``: the most copies
    that wait, made but not handed out yet (0: copy only what ``get`` asks for).
    """

    def __init__(self, sources: Sequence[str | os.PathLike[str]],
                 stage_dir: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES,
                 ahead: int = 2) -> None:
        if max_bytes <= 0:
            raise UsageError(f"the stage size must be positive, not {max_bytes} bytes",
                             "give e.g. --stage-max 20G, or leave out --stage-dir")
        if ahead < 0:
            raise UsageError(f"cannot stage {ahead} slides ahead", "give 0 or more")
        self.stage_dir = Path(stage_dir)
        self.max_bytes = int(max_bytes)
        self.ahead = int(ahead)
        self._slides: dict[Path, _Slide] = {}
        for src in sources:
            key = self._key(src)
            if key not in self._slides:
                self._slides[key] = _Slide(Path(src), len(self._slides))
        self._order = list(self._slides.values())
        self._cond = threading.Condition(threading.RLock())
        self._reserved = 0  # bytes of the copies being made or on disk
        self._requests = 0
        self._notes: dict[Path, str] = {}
        self._stop = False
        self._closed = False
        self._folder: Path | None = None
        self._lock_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._prev_handler: Any = None
        self._handler: Callable[[int, FrameType | None], None] | None = None
        self.removed_stale: list[Path] = []
        self.copied_bytes = 0

    # -- public API --------------------------------------------------------------------------

    @property
    def folder(self) -> Path | None:
        """This stager's private folder (``None`` before start and after close)."""
        return self._folder

    @property
    def notes(self) -> dict[Path, str]:
        """For each source read in place instead of from a copy: why."""
        with self._cond:
            return dict(self._notes)

    def start(self) -> SlideStager:
        """Remove stale folders, make the private folder, start copying (``with`` does this)."""
        if self._thread is not None:
            return self
        host = _host()
        try:
            self.stage_dir.mkdir(parents=True, exist_ok=True)
            self.removed_stale = remove_stale(self.stage_dir, host)
            self._folder, self._lock_fd = self._make_folder(host)
        except OSError as exc:
            raise UsageError(f"cannot use the stage dir {self.stage_dir}: "
                             f"{exc.strerror or exc}",
                             "give a local directory you can write to (e.g. $TMPDIR), "
                             "or leave out --stage-dir") from None
        for folder in self.removed_stale:
            log.info("removed %s, left by a stager that was killed", folder.name)
        self._install_handler()
        self._thread = threading.Thread(target=self._run, name="gigamil-stager", daemon=True)
        self._thread.start()
        return self

    def get(self, source: str | os.PathLike[str]) -> Path:
        """The local copy of ``source`` once it is complete (blocks), or ``source`` itself
        when it cannot be staged (see :attr:`notes`)."""
        slide = self._slide(source)
        with self._cond:
            if self._closed or self._thread is None:
                return slide.source
            if slide.state in ("pending", "released"):
                slide.state = "pending"
                self._requests += 1
                slide.requested = self._requests
                self._cond.notify_all()
            while slide.state in ("pending", "copying"):
                if self._closed or self._stop or not self._thread.is_alive():
                    self._note(slide, "the stager stopped before this slide was copied")
                    return slide.source
                self._cond.wait(_POLL_S)
            slide.requested = 0
            if slide.state == "ready" and slide.local is not None:
                slide.handed = True
                self._cond.notify_all()  # one fewer copy waits: the copier may go on
                return slide.local
            return slide.source

    def release(self, source: str | os.PathLike[str]) -> None:
        """Done with ``source``: delete its copy (or, if it is not copied yet, do not copy it)."""
        slide = self._slide(source)
        with self._cond:
            if slide.state == "ready":
                self._delete(slide)
            slide.state = "released"  # a copy in progress sees this and stops
            slide.requested = 0
            self._cond.notify_all()

    def close(self) -> None:
        """Stop copying and remove every copy and the private folder."""
        with self._cond:
            self._stop = True
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._cleanup()
        self._restore_handler()

    def __enter__(self) -> SlideStager:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- bookkeeping -------------------------------------------------------------------------

    @staticmethod
    def _key(source: str | os.PathLike[str]) -> Path:
        return Path(os.path.abspath(source))

    def _slide(self, source: str | os.PathLike[str]) -> _Slide:
        try:
            return self._slides[self._key(source)]
        except KeyError:
            raise UsageError(f"{source} was not given to the stager",
                             "pass every slide to SlideStager(sources, …) first") from None

    def _note(self, slide: _Slide, why: str) -> None:
        if slide.source not in self._notes:
            log.debug("a slide is read in place, not staged (%s)", why)  # no name: PHI
        self._notes[slide.source] = why

    def _make_folder(self, host: str) -> tuple[Path, int | None]:
        """The private folder, made under a temporary name with its lock held, then renamed:
        a folder with the final name always has a lock file."""
        tmp = Path(tempfile.mkdtemp(prefix=_NEW_PREFIX, dir=self.stage_dir))
        fd: int | None = os.open(tmp / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        assert fd is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # no flock on this filesystem: no lock (others cannot take it either)
            pass
        final = self.stage_dir / f"{STAGE_PREFIX}{host}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(tmp, final)
        except OSError:
            os.close(fd)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, fd

    def _waiting(self) -> int:
        """Copies made or being made that no ``get`` has handed out (the ones ahead)."""
        return sum(1 for s in self._order
                   if (s.state == "copying" and not s.requested)
                   or (s.state == "ready" and not s.handed))

    def _delete(self, slide: _Slide) -> None:
        """Remove a ready copy (under the lock) and give its bytes back."""
        if slide.local is not None:
            shutil.rmtree(slide.local.parent, ignore_errors=True)
        slide.local = None
        slide.handed = False
        self._reserved -= max(slide.size, 0)

    def _measure(self, slide: _Slide) -> bool:
        """Measure a slide; False (with a note) when it cannot be staged at all."""
        if slide.size >= 0:
            return True
        if slide.source.suffix.lower() in (".vms", ".vmu"):
            slide.state = "in_place"
            self._note(slide, "its index names image files that are not copied")
            return False
        try:
            slide.size = slide_bytes(slide.source)
        except OSError as exc:
            slide.state = "in_place"
            self._note(slide, f"cannot read its size: {exc.strerror or exc}")
            return False
        return True

    def _fits(self, slide: _Slide) -> bool | None:
        """True: it fits now; False: it never fits (noted); None: not now (wait)."""
        if slide.size > self.max_bytes:
            slide.state = "in_place"
            self._note(slide, f"{slide.size / GiB:.1f} GiB is more than the stage size "
                              f"{self.max_bytes / GiB:.1f} GiB")
            return False
        if self._reserved + slide.size <= self.max_bytes:
            return True
        if not slide.requested:
            return None
        # a get waits for it: make room from the copies that wait, last in order first
        for other in sorted(self._order, key=lambda s: -s.index):
            if other.state == "ready" and not other.handed and other is not slide:
                self._delete(other)
                other.state = "pending"
                if self._reserved + slide.size <= self.max_bytes:
                    return True
        slide.state = "in_place"
        self._note(slide, f"no room in the stage size {self.max_bytes / GiB:.1f} GiB beside "
                          f"the slides in use")
        return False

    def _pick(self) -> _Slide | None:
        """The next slide to copy (and reserve its bytes), or None to wait. Under the lock."""
        requested = sorted((s for s in self._order if s.state == "pending" and s.requested),
                           key=lambda s: s.requested)
        for slide in requested:  # each is reserved now, or turned in place (never waits)
            if self._measure(slide) and self._fits(slide):
                return self._reserve(slide)
        if self._waiting() >= self.ahead:
            return None
        for slide in self._order:
            if slide.state != "pending":
                continue
            if not self._measure(slide):
                continue
            fits = self._fits(slide)
            if fits is None:
                return None  # keep the order: wait for a release
            if fits:
                return self._reserve(slide)
        return None

    def _reserve(self, slide: _Slide) -> _Slide:
        slide.state = "copying"
        self._reserved += slide.size
        return slide

    # -- the copier thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    slide = None
                    while not self._stop:
                        slide = self._pick()
                        if slide is not None:
                            break
                        self._cond.wait(_POLL_S)
                    if self._stop:
                        return
                assert slide is not None
                self._stage(slide)
        except BaseException as exc:  # noqa: BLE001 - never let staging fail a slide
            log.warning("slide staging stopped: %s; reading the rest in place", exc)
            with self._cond:
                self._stop = True
                self._cond.notify_all()
        finally:
            if self._closed:
                self._cleanup()

    def _stage(self, slide: _Slide) -> None:
        """Copy one slide (its bytes are reserved) and make it ready, or read it in place."""
        assert self._folder is not None
        tmp = self._folder / f".{slide.index:06d}.partial"
        final = self._folder / f"{slide.index:06d}"
        error: str | None = None
        try:
            free = shutil.disk_usage(self._folder).free
            if free < slide.size + _FREE_MARGIN:
                raise OSError(errno.ENOSPC, f"{free / GiB:.1f} GiB free on the stage disk")
            tmp.mkdir()
            for top in slide_files(slide.source):
                self._copy_tree(top, tmp / top.name, slide)
        except CopyCancelled:
            pass
        except OSError as exc:
            error = f"the copy failed: {exc.strerror or exc}"
        with self._cond:
            ok = error is None and slide.state == "copying" and not self._stop
            if ok:
                try:
                    os.rename(tmp, final)
                except OSError as exc:
                    ok, error = False, f"the copy failed: {exc.strerror or exc}"
            if ok:
                slide.local = final / slide.source.name
                slide.state = "ready"
                slide.handed = False
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                self._reserved -= slide.size
                if error is not None and slide.state == "copying":
                    slide.state = "in_place"
                    self._note(slide, error)
            self._cond.notify_all()

    def _copy_tree(self, src: Path, dst: Path, slide: _Slide) -> None:
        if src.is_dir():
            dst.mkdir()
            for child in sorted(src.iterdir()):
                self._copy_tree(child, dst / child.name, slide)
            shutil.copystat(src, dst)
            return
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        with open(src, "rb", buffering=0) as fin, open(dst, "xb", buffering=0) as fout:
            with contextlib.suppress(AttributeError, OSError):  # a larger readahead window
                os.posix_fadvise(fin.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while True:
                if self._stop or slide.state != "copying":
                    raise CopyCancelled("copy cancelled")
                n = fin.readinto(view)
                if not n:
                    break
                written = 0
                while written < n:
                    written += fout.write(view[written:n])
                self.copied_bytes += n
        shutil.copystat(src, dst)  # the same mtime: stores record the source's size and mtime

    # -- cleanup -----------------------------------------------------------------------------

    def _cleanup(self) -> None:
        """Remove the private folder (idempotent; safe from a signal handler)."""
        folder, fd = self._folder, self._lock_fd
        if folder is None:
            return
        if _remove_folder(folder):
            self._folder = None
            self._lock_fd = None
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for slide in self._order:
            slide.local = None

    def _install_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            self._prev_handler = signal.getsignal(signal.SIGTERM)
            self._handler = self._on_sigterm
            signal.signal(signal.SIGTERM, self._handler)
        except (ValueError, OSError):  # not the main interpreter
            self._handler = None

    def _restore_handler(self) -> None:
        handler, self._handler = self._handler, None
        if handler is None or threading.current_thread() is not threading.main_thread():
            return
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) == handler:
                signal.signal(signal.SIGTERM, self._prev_handler)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM: remove the copies now, then do what the previous handler did."""
        self._stop = True
        self._closed = True
        self._cleanup()
        prev = self._prev_handler
        self._restore_handler()
        if callable(prev):
            prev(signum, frame)
        elif prev != signal.SIG_IGN:  # the default (or a handler not set from Python): die
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
