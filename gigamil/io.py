"""Crash-safe file output: write to a temporary name, fsync, rename.

A killed process leaves either the complete old file, the complete new file,
or a stray ``*.tmp-*`` file that no reader ever opens — never a truncated output.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_open", "write_json", "write_csv", "write_slide_vectors",
           "fsync_dir", "work_lock", "ensure_writable", "sweep_stale_temps"]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush a directory entry (the rename) to disk; a no-op where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename onto ``target``.

    The caller writes (and closes) the file at the yielded path. On an exception the
    temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(
    target: str | os.PathLike[str], mode: str = "w", **kwargs: Any
) -> Iterator[IO[Any]]:
    """Like ``open(target, mode)`` but crash-safe (``mode`` is "w" or "wb")."""
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    with atomic_open(target, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def write_csv(
    target: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    fieldnames: Sequence[str],
) -> None:
    with atomic_open(target, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fieldnames), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_slide_vectors(target: str | os.PathLike[str], slide_ids: Sequence[str], vectors: Any,
                        attrs: Mapping[str, Any] | None = None) -> None:
    """An HDF5 file of per-slide vectors: ``slide_id`` (n,) strings and ``embedding``
    (n, ...) float32, with ``attrs`` on the file (slide embeddings of a run or inference)."""
    import h5py
    import numpy as np

    with atomic_path(target) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("slide_id", data=np.array(list(slide_ids), dtype=h5py.string_dtype()))
        f.create_dataset("embedding", data=np.asarray(vectors, np.float32), compression="gzip")
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


@contextlib.contextmanager
def work_lock(target: str | os.PathLike[str], wait: bool = False) -> Iterator[bool]:
    """Claim the work of writing ``target`` against other processes (and threads): yields
    True when this caller holds it, False when someone else does right now (with
    ``wait``, blocks until the holder is done and yields True).

    An ``flock`` on ``<target>.lock``: the kernel releases it when its holder exits, however
    it dies, so a lock file left by a killed job never blocks a rerun. The file is removed
    by the holder when done; a claim on a file already replaced is retried on the new one.
    Whoever writes ``target`` holds its claim, so the claimant removes the temporary files
    of ``target`` that a killed writer left (``.<name>.tmp-*``).
    """
    import fcntl

    path = Path(str(target) + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed that file after we opened it: claim the new one
    for stale in path.parent.glob(f".{glob.escape(Path(target).name)}.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    try:
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def sweep_stale_temps(directory: str | os.PathLike[str], older_than_s: float = 3600.0) -> int:
    """Remove the ``.*.tmp-*`` files in ``directory`` untouched for ``older_than_s`` (left
    by a killed job: a live writer finishes a manifest in moments); how many went."""
    import time

    root = Path(directory)
    if not root.is_dir():
        return 0
    removed = 0
    cutoff = time.time() - older_than_s
    for stale in root.glob(".*.tmp-*"):
        try:
            if stale.is_file() and stale.stat().st_mtime < cutoff:
                stale.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def ensure_writable(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` if needed and prove it takes a file, before any work starts
    (a read-only mount, missing permissions, a full disk); a clear error naming it."""
    from gigamil.errors import DiskFullError, UsageError, is_disk_full

    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".gigamil-write-test-")
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(path) from None
        raise UsageError(f"cannot write to {path}: {exc.strerror or exc}",
                         "choose another --out, or make the folder writable") from None
    return path
