"""On-disk patch stores (one LMDB file per slide) and coordinate HDF5 files.

Layout of ``patches/<slide_id>.lmdb`` (``subdir=False``), schema version 1:

- ``00000000`` … : the encoded patch (``jpeg``, ``png``, or ``raw`` uint8 HWC);
- ``__meta__``   : JSON — schema, slide id, source, mpp, patch size, encoding, count, parameters, versions;
- ``__coords__`` : int64 (N, 2) level-0 top-left x, y, little-endian.

The writer fills ``<slide_id>.lmdb.partial`` and renames it only once complete,
so a reader never sees a half-written store. Readers open read-only with
``lock=False``: many processes can read one store, also on Lustre/GPFS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import imagecodecs
import numpy as np

from gigamil.errors import StoreError
from gigamil.io import atomic_path, fsync_dir

__all__ = [
    "SCHEMA_VERSION",
    "Encoding",
    "encode_patch",
    "decode_patch",
    "PatchStoreWriter",
    "PatchStore",
    "write_coords_h5",
    "PARTIAL_SUFFIX",
    "describe_store",
    "scale_key",
]

SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"
META_KEY = b"__meta__"
COORDS_KEY = b"__coords__"
Encoding = Literal["jpeg", "png", "raw"]


def encode_patch(patch: np.ndarray, encoding: Encoding, quality: int = 90) -> bytes:
    """Encode an RGB uint8 (h, w, 3) patch; JPEG via libjpeg-turbo, 4:4:4 chroma."""
    if encoding == "jpeg":
        return bytes(imagecodecs.jpeg8_encode(patch, level=quality, subsampling="444"))
    if encoding == "png":
        return bytes(imagecodecs.png_encode(patch, level=1))
    if encoding == "raw":
        return np.ascontiguousarray(patch, dtype=np.uint8).tobytes()
    raise StoreError(f"unknown patch encoding {encoding!r}", "use jpeg, png or raw")


def decode_patch(data: bytes, encoding: Encoding, patch_size: int) -> np.ndarray:
    """Decode bytes from a store into an RGB uint8 (patch_size, patch_size, 3) array."""
    if encoding == "jpeg":
        arr = imagecodecs.jpeg8_decode(data)
    elif encoding == "png":
        arr = imagecodecs.png_decode(data)
    elif encoding == "raw":
        arr = np.frombuffer(data, np.uint8).reshape(patch_size, patch_size, 3)
    else:
        raise StoreError(f"unknown patch encoding {encoding!r}", "the store may be from a newer gigamil")
    if arr.shape != (patch_size, patch_size, 3):
        raise StoreError(f"decoded patch has shape {arr.shape}, expected {(patch_size, patch_size, 3)}")
    return arr


def scale_key(mpp: float) -> str:
    """Key prefix of an extra scale in a multi-scale store (``1`` for 1.0 µm/px)."""
    return f"{mpp:g}"


def _patch_key(index: int, scale: str = "") -> bytes:
    return (f"{scale}/{index:08d}" if scale else f"{index:08d}").encode()


def _coords_key(scale: str = "") -> bytes:
    return COORDS_KEY + (f"/{scale}".encode() if scale else b"")


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
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _exclusive_lock(self.path.with_name(f".{self.path.name}.lock"))
        for stale in (self.partial, Path(str(self.partial) + "-lock")):
            if stale.exists():
                stale.unlink()
        raw = patch_size * patch_size * 3
        map_size = max(64 << 20, int(n_patches * raw * 1.25) + (32 << 20))
        self._env = lmdb.open(
            str(self.partial), subdir=False, map_size=map_size, lock=False,
            sync=False, metasync=False, readahead=False, meminit=False,
        )  # no writemap: written pages would stay mapped, and RSS would grow with the store

    @property
    def count(self) -> int:
        return self._counts.get("", 0)

    def add(self, patch: np.ndarray, scale: str = "") -> None:
        self.add_encoded(encode_patch(patch, self.encoding, self.quality), scale)

    def add_encoded(self, data: bytes, scale: str = "") -> None:
        index = self._counts.get(scale, 0)
        self._pending.append((_patch_key(index, scale), data))
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
        self._pending.clear()
        self._pending_bytes = 0

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
                txn.put(_coords_key(scale), xy.tobytes())
            txn.put(META_KEY, json.dumps(meta, sort_keys=True).encode())
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


# LMDB refuses to open one file twice in a process, so PatchStore objects of the
# same file share one read-only environment, counted by reference.
_ENVS: dict[str, tuple[int, Any, int]] = {}  # realpath -> (pid, env, refcount)


def _shared_env(path: Path) -> tuple[str, Any]:
    import lmdb

    key = _env_key(path)
    entry = _ENVS.get(key)
    if entry is not None and entry[0] == os.getpid():
        _ENVS[key] = (entry[0], entry[1], entry[2] + 1)
        return key, entry[1]
    try:  # an entry from a parent process (fork) is not ours to use or close
        env = lmdb.open(
            str(path), subdir=False, readonly=True, lock=False,
            readahead=False, meminit=False, max_readers=2048,
        )
    except lmdb.Error as exc:
        raise StoreError(f"cannot open patch store {path.name}: {exc}",
                         "the file is damaged; delete it and rerun `gigamil extract`") from exc
    info, stat = env.info(), env.stat()
    needed = (info["last_pgno"] + 1) * stat["psize"]
    if needed > os.stat(path).st_size:  # a truncated copy: reading would SIGBUS
        env.close()
        raise StoreError(f"patch store {path.name} is truncated ({os.stat(path).st_size} of "
                         f"{needed} bytes)", "delete it and rerun `gigamil extract`")
    _ENVS[key] = (os.getpid(), env, 1)
    return key, env


def _env_key(path: Path) -> str:
    """The file's identity: a store replaced by a re-extraction is a new file."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return f"{os.path.realpath(path)}:{st.st_ino}:{st.st_mtime_ns}"


def _release_env(key: str) -> None:
    entry = _ENVS.get(key)
    if entry is None or entry[0] != os.getpid():
        return
    if entry[2] <= 1:
        del _ENVS[key]
        entry[1].close()
    else:
        _ENVS[key] = (entry[0], entry[1], entry[2] - 1)


def _scales(meta: dict[str, Any]) -> list[float]:
    if "scales" in meta:
        return [float(m) for m in meta["scales"]]
    return [float(meta["target_mpp"])] if meta.get("target_mpp") is not None else []


class PatchStore:
    """Read-only access to a finished patch store.

    ``len(store)``, ``store[i]`` (decoded RGB uint8), ``store.coords`` (N, 2),
    ``store.meta``. ``PatchStore(path, mpp=1.0)`` selects another scale of a
    multi-scale store (``store.scales`` lists them). Safe to pickle into
    DataLoader workers: each process opens its own read-only, lock-free handle.
    """

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None) -> None:
        self.path = Path(path)
        if self.path.name.endswith(PARTIAL_SUFFIX):
            raise StoreError(
                f"{self.path.name} is an unfinished store (its extraction was interrupted)",
                "rerun `gigamil extract` to finish it",
            )
        if not self.path.is_file():
            partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
            hint = ("its extraction was interrupted; rerun `gigamil extract`" if partial.exists()
                    else "run `gigamil extract` first, or check the path")
            raise StoreError(f"no patch store at {self.path.name}", hint)
        self._env: Any = None
        self._key = ""
        self._meta: dict[str, Any] | None = None
        self._coords: np.ndarray | None = None
        self._mpp = mpp
        self._scale = ""

    def _open(self) -> Any:
        if self._env is None:
            self._key, self._env = _shared_env(self.path)
        return self._env

    def _get(self, key: bytes) -> bytes | None:
        with self._open().begin(buffers=False) as txn:
            return txn.get(key)

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            raw = self._get(META_KEY)
            if raw is None:
                raise StoreError(f"{self.path.name} has no metadata",
                                 "it is not a gigamil store; delete it and rerun `gigamil extract`")
            try:
                meta = json.loads(raw)
            except ValueError:
                raise StoreError(f"{self.path.name} has corrupt metadata",
                                 "delete it and rerun `gigamil extract`") from None
            if meta.get("schema_version", 0) > SCHEMA_VERSION:
                raise StoreError(f"{self.path.name} has schema {meta['schema_version']}",
                                 "upgrade gigamil to read it")
            self._meta = meta
            self._scale = self._select_scale(meta)
        return self._meta

    def _select_scale(self, meta: dict[str, Any]) -> str:
        scales = _scales(meta)
        if self._mpp is None or (scales and abs(self._mpp - scales[0]) < 1e-9):
            return ""
        if not any(abs(self._mpp - m) < 1e-9 for m in scales[1:]):
            raise StoreError(f"{self.path.name} has no patches at {self._mpp:g} µm/px",
                             f"it holds {', '.join(f'{m:g}' for m in scales)}")
        return scale_key(self._mpp)

    @property
    def scales(self) -> list[float]:
        """µm/px of every scale in the store, the primary first."""
        return _scales(self.meta)

    @property
    def mpp(self) -> float | None:
        """µm/px of the selected scale (None for a store that does not record it)."""
        return self._mpp if self._mpp is not None else (self.scales or [None])[0]

    @property
    def coords(self) -> np.ndarray:
        if self._coords is None:
            _ = self.meta
            raw = self._get(_coords_key(self._scale)) or b""
            self._coords = np.frombuffer(raw, dtype="<i8").reshape(-1, 2).astype(np.int64)
        return self._coords

    @property
    def patch_size(self) -> int:
        return int(self.meta["patch_size"])

    @property
    def encoding(self) -> Encoding:
        return self.meta["encoding"]

    def __len__(self) -> int:
        meta = self.meta
        if self._scale:
            return int(meta["scale_counts"][self._scale])
        return int(meta["count"])

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"patch {index} out of range for {n} patches")
        return index % n

    def get_encoded(self, index: int) -> bytes:
        index = self._check_index(index)
        data = self._get(_patch_key(index, self._scale))
        if data is None:
            raise StoreError(f"{self.path.name} lacks patch {index}", "re-extract the slide")
        return data

    def __getitem__(self, index: int) -> np.ndarray:
        return decode_patch(self.get_encoded(index), self.encoding, self.patch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        for data in self.iter_encoded():
            yield decode_patch(data, self.encoding, self.patch_size)

    def iter_encoded(self) -> Iterator[bytes]:
        """Encoded patches in order, read in one transaction."""
        n = len(self)
        with self._open().begin(buffers=False) as txn:
            for i in range(n):
                data = txn.get(_patch_key(i, self._scale))
                if data is None:
                    raise StoreError(f"{self.path.name} lacks patch {i}", "re-extract the slide")
                yield data

    def read_many(self, indices: Sequence[int]) -> list[bytes]:
        """Encoded bytes of several patches in one transaction."""
        idx = [self._check_index(int(i)) for i in indices]
        with self._open().begin(buffers=False) as txn:
            out = [txn.get(_patch_key(i, self._scale)) for i in idx]
        if any(d is None for d in out):
            raise StoreError(f"{self.path.name} lacks patches", "re-extract the slide")
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if self._env is not None:
            _release_env(self._key)
            self._env = None

    def __enter__(self) -> PatchStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_env"] = None
        return state

    def __repr__(self) -> str:
        return f"PatchStore({self.path.name!r})"


def write_coords_h5(
    path: str | os.PathLike[str],
    coords: np.ndarray,
    attrs: dict[str, Any],
) -> None:
    """Coordinates in the CLAM/TRIDENT layout: dataset ``coords`` int64 (N, 2) with attributes."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset(
                "coords", data=np.asarray(coords, np.int64).reshape(-1, 2),
                chunks=(max(1, min(len(coords), 4096)), 2),
                maxshape=(None, 2),
            )
            for key, value in attrs.items():
                if value is not None:
                    ds.attrs[key] = value


def describe_store(store: PatchStore) -> dict[str, Any]:
    """What ``gigamil inspect store`` shows: counts, resolution, parameters, versions."""
    meta = store.meta
    return {
        "file": store.path.name,
        "slide_id": meta.get("slide_id"),
        "count": len(store),
        "patch_size": meta.get("patch_size"),
        "target_mpp": meta.get("target_mpp"),
        "scales": meta.get("scales", [meta.get("target_mpp")]),
        "scale_counts": meta.get("scale_counts"),
        "qc_rejected": meta.get("qc_rejected"),
        "stain_norm": meta.get("stain_norm"),
        "level0_mpp": meta.get("level0_mpp"),
        "read_level": meta.get("read_level"),
        "encoding": meta.get("encoding"),
        "jpeg_quality": meta.get("jpeg_quality"),
        "tissue_fraction": meta.get("tissue_fraction"),
        "grid_patches": meta.get("n_grid"),
        "backend": meta.get("backend"),
        "schema_version": meta.get("schema_version"),
        "source": {k: v for k, v in meta.get("source", {}).items()},
        "params": meta.get("params", {}),
        "versions": meta.get("versions", {}),
        "size_bytes": store.path.stat().st_size,
    }
