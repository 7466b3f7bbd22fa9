"""Feature bags on disk: ``features/<encoder>/<slide_id>.h5`` (CLAM/TRIDENT-readable).

Layout written (schema version 1):

- ``features``: float32 (N, D), chunked in row blocks;
- ``coords``: int64 (N, 2) level-0 top-left x, y, with TRIDENT's attributes
  (``patch_size``, ``patch_size_level0``, ``level0_magnification``,
  ``target_magnification``, ``overlap``, ``name``, ``level0_width``,
  ``level0_height``) and gigamil's (``mpp``, ``patch_size_um``, ``encoder``,
  ``encoder_sha256``, ``schema_version``).

A multi-scale store embedded with ``--scales all`` adds a group ``scales/<mpp>`` per
extra scale: ``features`` (R, D), ``coords`` (R, 2) and ``parent`` (N,), the row of
the patch of that scale covering each primary patch (-1: not kept); attributes
``mpp`` and ``patch_size_level0``.

Files are written to a temporary name, flushed and renamed. :func:`read_bag`
also reads CLAM files (``features`` + ``coords`` with ``patch_level``) and STAMP
files (``feats`` + ``coords``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gigamil.errors import StoreError
from gigamil.io import atomic_path

__all__ = ["FeatureBag", "ScaleBag", "write_bag", "read_bag", "read_scales", "parent_index",
           "bag_header", "trident_attrs", "FEATURE_SCHEMA_VERSION"]

FEATURE_SCHEMA_VERSION = 1
_ROW_BLOCK = 1024


@dataclass
class FeatureBag:
    """One slide's features (N, D), coordinates (N, 2) and the attributes that describe them."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    layout: str = "gigamil"  # or "clam", "trident", "stamp": what the file looked like

    def __len__(self) -> int:
        return len(self.features)


@dataclass
class ScaleBag:
    """The features of one extra scale of a multi-scale store, and how the primary
    patches nest in it: ``parent[i]`` is the row of the patch covering primary patch
    ``i`` (-1 when that patch was not kept)."""

    mpp: float
    features: np.ndarray  # (R, D)
    coords: np.ndarray  # (R, 2) level-0 top-left
    size_level0: float
    parent: np.ndarray  # (N,) int64 into this scale's rows, -1: none


def write_bag(path: str | os.PathLike[str], features: np.ndarray, coords: np.ndarray,
              attrs: dict[str, Any], scales: list[ScaleBag] | None = None) -> Path:
    """Write a feature file atomically; ``attrs`` go on ``coords`` (TRIDENT's convention);
    each of ``scales`` goes to the group ``scales/<mpp>`` (readers of one scale ignore it)."""
    import h5py

    features = np.ascontiguousarray(features, np.float32)
    coords = np.ascontiguousarray(coords, np.int64).reshape(-1, 2)
    if features.ndim != 2 or len(features) != len(coords):
        raise StoreError(f"features {features.shape} and coords {coords.shape} do not match")
    if not np.isfinite(features).all():
        raise StoreError("features contain NaN or infinity", "check the encoder and its weights")
    rows = max(1, min(len(features), _ROW_BLOCK))
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features, chunks=(rows, features.shape[1]),
                             maxshape=(None, features.shape[1]))
            ds = f.create_dataset("coords", data=coords, chunks=(rows, 2), maxshape=(None, 2))
            for key, value in {**attrs, "schema_version": FEATURE_SCHEMA_VERSION}.items():
                if value is not None:
                    ds.attrs[key] = value
            for sc in scales or []:
                sf = np.ascontiguousarray(sc.features, np.float32)
                if not np.isfinite(sf).all():
                    raise StoreError("features contain NaN or infinity",
                                     "check the encoder and its weights")
                if len(sc.parent) != len(features):
                    raise StoreError(f"{len(sc.parent)} parents for {len(features)} patches")
                g = f.create_group(f"scales/{sc.mpp:g}")
                g.create_dataset("features", data=sf.reshape(-1, features.shape[1]))
                g.create_dataset("coords", data=np.asarray(sc.coords, np.int64).reshape(-1, 2))
                g.create_dataset("parent", data=np.asarray(sc.parent, np.int64))
                g.attrs["mpp"] = float(sc.mpp)
                g.attrs["patch_size_level0"] = float(sc.size_level0)
    return path


def read_scales(path: str | os.PathLike[str]) -> list[ScaleBag]:
    """The extra scales of a feature file, finest first (none for a one-scale file)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "scales" not in f:
            return []
        out = [ScaleBag(float(g.attrs["mpp"]), g["features"][:], g["coords"][:],
                        float(g.attrs["patch_size_level0"]), g["parent"][:])
               for g in f["scales"].values()]
    return sorted(out, key=lambda sc: sc.mpp)


def parent_index(fine: np.ndarray, fine_size0: float, coarse: np.ndarray,
                 coarse_size0: float) -> np.ndarray:
    """For each fine patch (level-0 top-left ``fine`` (N, 2), side ``fine_size0``), the
    row of the coarse patch whose square holds its centre, -1 where none was kept. Grids
    of every scale start at level-0 (0, 0) with a stride of their side, so a coarse
    patch's lattice position is its top-left divided by its side."""
    fine = np.asarray(fine, np.float64).reshape(-1, 2)
    coarse = np.asarray(coarse, np.int64).reshape(-1, 2)
    lattice = {(int(round(x / coarse_size0)), int(round(y / coarse_size0))): i
               for i, (x, y) in enumerate(coarse)}
    cell = np.floor((fine + fine_size0 / 2) / coarse_size0).astype(np.int64)
    return np.array([lattice.get((int(cx), int(cy)), -1) for cx, cy in cell], np.int64)


def bag_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int] | None:
    """A gigamil feature file's ``coords`` attributes and row count, without reading the
    features; None when the file is missing, unreadable or not a gigamil/TRIDENT bag."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return dict(f["coords"].attrs), int(f["features"].shape[0])
    except Exception:
        return None


def read_bag(path: str | os.PathLike[str]) -> FeatureBag:
    """Read a gigamil, TRIDENT, CLAM or STAMP feature file."""
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"cannot read feature file {path.name}: {exc}",
                         "it may be truncated; delete it and rerun `gigamil embed`") from exc
    with f:
        if "features" in f:
            feats = f["features"][:]
            layout = "gigamil"
        elif "feats" in f:
            feats = f["feats"][:]
            layout = "stamp"
        else:
            raise StoreError(f"{path.name} has neither `features` nor `feats`",
                             "it is not a CLAM/TRIDENT/STAMP/gigamil feature file")
        if feats.ndim == 3 and feats.shape[0] == 1:  # some writers keep a batch axis
            feats = feats[0]
        coords = f["coords"][:] if "coords" in f else np.zeros((len(feats), 2), np.int64)
        if coords.ndim == 3 and coords.shape[0] == 1:
            coords = coords[0]
        attrs = dict(f["coords"].attrs) if "coords" in f else {}
        attrs.update({k: v for k, v in f.attrs.items() if k not in attrs})
    if layout == "gigamil" and "encoder" not in attrs:
        layout = "clam" if "patch_level" in attrs and "level0_magnification" not in attrs \
            else "trident"
    if len(coords) != len(feats):
        raise StoreError(f"{path.name}: {len(feats)} features but {len(coords)} coordinates")
    return FeatureBag(np.asarray(feats, np.float32), np.asarray(coords, np.int64).reshape(-1, 2),
                      attrs, layout)


def trident_attrs(meta: dict[str, Any]) -> dict[str, Any]:
    """TRIDENT/CLAM ``coords`` attributes from a patch store's ``__meta__``."""
    mpp0 = float(meta["level0_mpp"])
    power = meta.get("objective_power") or 10.0 / mpp0
    target = float(meta["target_mpp"])
    attrs: dict[str, Any] = {
        # TRIDENT
        "patch_size": int(meta["patch_size"]),
        "patch_size_level0": int(round(meta["patch_size_level0"])),
        "level0_magnification": float(power),
        "target_magnification": float(power * mpp0 / target),
        "overlap": int(meta["params"]["overlap"]),
        "name": meta["slide_id"],
        "level0_width": int(meta["level0_width"]),
        "level0_height": int(meta["level0_height"]),
        # gigamil
        "mpp": target,
        "level0_mpp": mpp0,
        "patch_size_um": int(meta["patch_size"]) * target,
        "schema_version": 1,
    }
    if int(meta["read_size"]) == int(meta["patch_size"]):
        # CLAM reads `patch_size` px at `patch_level`: only true without a resize. Otherwise
        # the attribute is left out, so that CLAM fails loudly instead of reading the wrong µm.
        attrs["patch_level"] = int(meta["read_level"])
    return attrs
