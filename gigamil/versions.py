"""Versions of gigamil and the libraries that shape its outputs (recorded in every output)."""

from __future__ import annotations

import functools
from importlib import metadata

__all__ = ["package_versions", "gigamil_version"]

_PACKAGES = (
    "gigamil", "numpy", "opencv-python-headless", "openslide-python", "openslide-bin",
    "cucim-cu13", "tifffile", "imagecodecs", "lmdb", "h5py",
)


def gigamil_version() -> str:
    try:
        return metadata.version("gigamil")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
