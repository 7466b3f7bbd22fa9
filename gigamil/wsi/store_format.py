"""The on-disk format of patch stores, and coordinate HDF5 files.

Layout of ``patches/<slide_id>.lmdb`` (``subdir=False``), schema version 1:

- ``00000000`` … : the encoded patch (``jpeg``, ``png``, or ``raw`` uint8 HWC);
- ``__meta__``   : JSON — schema, slide id, source, mpp, patch size, encoding, count, parameters, versions;
- ``__coords__`` : int64 (N, 2) level-0 top-left x, y, little-endian.

Extra scales of a multi-scale store prefix their keys with :func:`scale_key`.
:func:`write_coords_h5` writes the CLAM/TRIDENT ``coords`` HDF5 layout.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import imagecodecs
import numpy as np

from gigamil.errors import StoreError
from gigamil.io import atomic_path

__all__ = [
    "SCHEMA_VERSION",
    "PARTIAL_SUFFIX",
    "META_KEY",
    "COORDS_KEY",
    "Encoding",
    "encode_patch",
    "decode_patch",
    "scale_key",
    "patch_key",
    "coords_key",
    "write_coords_h5",
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


def patch_key(index: int, scale: str = "") -> bytes:
    """LMDB key of patch ``index`` (of the extra scale ``scale``, or the primary one)."""
    return (f"{scale}/{index:08d}" if scale else f"{index:08d}").encode()


def coords_key(scale: str = "") -> bytes:
    """LMDB key of the coordinates of ``scale`` (the primary scale by default)."""
    return COORDS_KEY + (f"/{scale}".encode() if scale else b"")


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
