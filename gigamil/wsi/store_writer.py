"""Writing one slide's patch store (see :mod:`gigamil.wsi.store_format` for the layout).

The writer fills ``<slide_id>.lmdb.partial`` and renames it only once complete,
so a reader never sees a half-written store; an exclusive lock keeps two
processes from writing the same slide.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from gigamil.errors import StoreError
from gigamil.io import fsync_dir
from gigamil.memory import drop_mapped_pages
from gigamil.wsi.store_format import (
    META_KEY,
    PARTIAL_SUFFIX,
    SCHEMA_VERSION,
    Encoding,
    coords_key,
    encode_patch,
    patch_key,
)

__all__ = ["PatchStoreWriter", "WRITEBACK_BYTES"]

#: Committed bytes after which the store is fsynced in the background, while reading goes on.
WRITEBACK_BYTES = 32 << 20


class PatchStoreWriter:
    """Writes one slide's store to ``<path>.partial``; :meth:`finish` renames it to ``path``.

    Patches are committed in large transactions. If the writer is left without
    :meth:`finish` (an exception, or the process is killed) the ``.partial`` file
    is never mistaken for a store; the next run removes it. An exclusive lock on
    ``<path>.lock`` keeps two processes from writing the same slide.

    A multi-scale store has a primary scale (plain keys) and extra scales whose
    keys carry a prefix (``add_encoded(data, scale="1")``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        n_patches: int,
        patch_size: int,
        encoding: Encoding = "jpeg",
        quality: int = 90,
        commit_bytes: int = 16 << 20,
    ) -> None:
        import lmdb

        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.encoding: Encoding = encoding
        self.quality = quality
        self.patch_size = patch_size
        self._commit_bytes = commit_bytes
        self._counts: dict[str, int] = {}
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0
        self._last_key = b""
        self._unsynced = 0
        self._syncer: Any = None
        self._fd: int | None = None
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _exclusive_lock(self.path.with_name(f".{self.path.name}.lock"))
        for stale in (self.partial, Path(str(self.partial) + "-lock")):
            if stale.exists():
                stale.unlink()
        raw = patch_size * patch_size * 3
        map_size = max(64 << 20, int(n_patches * raw * 1.25) + (32 << 20))
        self._env = lmdb.open(
            str(self.partial), subdir=False, map_size=map_size, lock=False,
            sync=False, metasync=False, readahead=False, meminit=True,
        )  # no writemap: written pages would stay mapped, and RSS would grow with the store;
        # meminit: the unused tail of each page is zeroed. Without it LMDB writes whatever
        # the malloc'd page held before (seen: text from this process's memory in a store).

    @property
    def count(self) -> int:
        return self._counts.get("", 0)

    def add(self, patch: np.ndarray, scale: str = "") -> None:
        self.add_encoded(encode_patch(patch, self.encoding, self.quality), scale)

    def add_encoded(self, data: bytes, scale: str = "") -> None:
        index = self._counts.get(scale, 0)
        self._pending.append((patch_key(index, scale), data))
        self._pending_bytes += len(data)
        self._counts[scale] = index + 1
        if self._pending_bytes >= self._commit_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        self._pending.sort()
        # appending (keys above every key so far) is several times faster than inserting
        import lmdb

        append = self._pending[0][0] > self._last_key
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value, append=append)
                break
            except lmdb.MapFullError:  # incompressible patches: grow the map and redo the batch
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
        self._last_key = max(self._last_key, self._pending[-1][0])
        self._unsynced += self._pending_bytes
        self._pending.clear()
        self._pending_bytes = 0
        if self._unsynced >= WRITEBACK_BYTES and (self._syncer is None
                                                  or not self._syncer.is_alive()):
            self._start_writeback()
            drop_mapped_pages(str(self.partial.resolve()))  # RSS stays flat as the store grows

    def _start_writeback(self) -> None:
        """fsync what is committed so far in a background thread, while patches are still
        being read: the final sync then waits only for the last part."""
        import threading

        if self._fd is None:
            self._fd = os.open(self.partial, os.O_RDONLY)
        self._unsynced = 0
        self._syncer = threading.Thread(target=os.fsync, args=(self._fd,),
                                        name="gigamil-writeback", daemon=True)
        self._syncer.start()

    def _stop_writeback(self) -> None:
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def finish(self, coords: np.ndarray | dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
        """Write coordinates (per scale) and metadata, flush to disk and rename into place."""
        by_scale = coords if isinstance(coords, dict) else {"": coords}
        if "" not in by_scale:
            raise StoreError("the primary scale needs coordinates")
        for scale, xy in by_scale.items():
            if len(xy) != self._counts.get(scale, 0):
                raise StoreError(f"{len(xy)} coordinates for {self._counts.get(scale, 0)} patches"
                                 f" at scale {scale or 'primary'}")
        self._flush()
        meta = {
            **meta,
            "schema_version": SCHEMA_VERSION,
            "count": self.count,
            "patch_size": self.patch_size,
            "encoding": self.encoding,
            "jpeg_quality": self.quality if self.encoding == "jpeg" else None,
        }
        if len(by_scale) > 1:
            meta["scale_counts"] = {k: int(self._counts.get(k, 0)) for k in by_scale if k}
        with self._env.begin(write=True) as txn:
            for scale, xy in by_scale.items():
                xy = np.ascontiguousarray(xy, dtype="<i8").reshape(-1, 2)
                txn.put(coords_key(scale), xy.tobytes())
            txn.put(META_KEY, json.dumps(meta, sort_keys=True).encode())
        self._stop_writeback()
        self._env.sync(True)
        self._env.close()
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)
        self._release()
        return self.path

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None

    def abort(self) -> None:
        """Close and delete the partial file."""
        try:
            self._stop_writeback()
            self._env.close()
        finally:
            if self.partial.exists():
                self.partial.unlink()
            self._release()

    def __enter__(self) -> PatchStoreWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


def _exclusive_lock(path: Path) -> Any:
    """Hold an exclusive ``flock`` on ``path`` (released when the process dies)."""
    import fcntl

    fh = open(path, "a+b")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise StoreError(
            f"another process is writing {path.name[1:].removesuffix('.lock')}",
            "wait for the other gigamil run to finish (or stop it) before rerunning",
        ) from None
    return fh
