"""Reading finished patch stores (one LMDB file per slide).

Readers open read-only with ``lock=False``: many processes can read one store,
also on Lustre/GPFS. The layout is in :mod:`gigamil.wsi.store_format`, the
writer in :mod:`gigamil.wsi.store_writer`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from gigamil.errors import StoreError
from gigamil.wsi.store_format import (
    META_KEY,
    PARTIAL_SUFFIX,
    SCHEMA_VERSION,
    Encoding,
    coords_key,
    decode_patch,
    patch_key,
    scale_key,
)

__all__ = ["PatchStore", "describe_store"]


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
        if self._mpp is not None:
            return self._mpp
        scales = self.scales
        return scales[0] if scales else None

    @property
    def coords(self) -> np.ndarray:
        if self._coords is None:
            _ = self.meta
            raw = self._get(coords_key(self._scale)) or b""
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
        data = self._get(patch_key(index, self._scale))
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
                data = txn.get(patch_key(i, self._scale))
                if data is None:
                    raise StoreError(f"{self.path.name} lacks patch {i}", "re-extract the slide")
                yield data

    def read_many(self, indices: Sequence[int]) -> list[bytes]:
        """Encoded bytes of several patches in one transaction."""
        idx = [self._check_index(int(i)) for i in indices]
        with self._open().begin(buffers=False) as txn:
            out: list[bytes | None] = [txn.get(patch_key(i, self._scale)) for i in idx]
        if any(d is None for d in out):
            raise StoreError(f"{self.path.name} lacks patches", "re-extract the slide")
        return cast(list[bytes], out)  # every entry checked not None above

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
