"""Pictures a person looks at: patch montages (and, later, extraction previews)."""

from __future__ import annotations

import math
import os

import cv2
import numpy as np

from gigamil.io import atomic_path
from gigamil.wsi.store import PatchStore

__all__ = ["patch_montage", "save_png"]


def patch_montage(store: PatchStore, n: int = 64, seed: int = 0, tile: int = 128) -> np.ndarray:
    """A square grid of up to ``n`` randomly chosen patches, each shrunk to ``tile`` px."""
    count = len(store)
    if count == 0:
        return np.full((tile, tile, 3), 255, np.uint8)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(count, size=min(n, count), replace=False))
    cols = math.ceil(math.sqrt(len(idx)))
    rows = math.ceil(len(idx) / cols)
    sheet = np.full((rows * (tile + 2), cols * (tile + 2), 3), 255, np.uint8)
    for k, i in enumerate(idx):
        r, c = divmod(k, cols)
        small = cv2.resize(store[int(i)], (tile, tile), interpolation=cv2.INTER_AREA)
        sheet[r * (tile + 2) : r * (tile + 2) + tile, c * (tile + 2) : c * (tile + 2) + tile] = small
    return sheet


def save_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG, atomically."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError("PNG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())
