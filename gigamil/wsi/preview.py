"""Pictures a person looks at: patch montages (and, later, extraction previews)."""

from __future__ import annotations

import math
import os

import cv2
import numpy as np

from gigamil.io import atomic_path
from gigamil.wsi.store import PatchStore

__all__ = ["patch_montage", "save_png", "extraction_preview", "PREVIEW_COLORS"]


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


#: Colours (RGB) of the extraction preview.
PREVIEW_COLORS = {
    "tissue": (20, 160, 60),
    "kept": (30, 90, 220),
    "background": (150, 150, 150),
    "pen": (230, 30, 200),
    "blur": (240, 170, 0),
}


def extraction_preview(
    thumb: np.ndarray,
    tissue_mask: np.ndarray,
    coords0: np.ndarray,
    size0: float,
    thumb_scale: float,
    reasons: list[str],
    title: str = "",
    min_width: int = 1024,
) -> np.ndarray:
    """The thumbnail with the tissue contour, kept patches (outlines) and rejected patches
    (filled, coloured by reason), plus a legend with counts.

    ``thumb_scale`` is thumbnail px per level-0 px; ``reasons[i]`` is ``""`` for a kept patch.
    """
    up = max(1, math.ceil(min_width / max(thumb.shape[1], 1)))  # small slides: enlarge to read
    img = cv2.resize(thumb, (thumb.shape[1] * up, thumb.shape[0] * up),
                     interpolation=cv2.INTER_LINEAR) if up > 1 else thumb.copy()
    thumb_scale *= up
    overlay = img.copy()
    side = max(1, int(round(size0 * thumb_scale)))
    for (x, y), reason in zip(coords0, reasons):
        x0, y0 = int(round(x * thumb_scale)), int(round(y * thumb_scale))
        if reason:
            cv2.rectangle(overlay, (x0, y0), (x0 + side - 1, y0 + side - 1),
                          PREVIEW_COLORS.get(reason, (255, 0, 0)), -1)
    img = cv2.addWeighted(overlay, 0.55, img, 0.45, 0)
    for (x, y), reason in zip(coords0, reasons):
        if not reason and side >= 3:
            x0, y0 = int(round(x * thumb_scale)), int(round(y * thumb_scale))
            cv2.rectangle(img, (x0, y0), (x0 + side - 1, y0 + side - 1), PREVIEW_COLORS["kept"], 1)
    mask = cv2.resize(tissue_mask.astype(np.uint8), (img.shape[1], img.shape[0]),
                      interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, PREVIEW_COLORS["tissue"], 2)
    counts = {"kept": sum(1 for r in reasons if not r)}
    for r in reasons:
        if r:
            counts[r] = counts.get(r, 0) + 1
    return _with_legend(img, counts, title)


def _with_legend(img: np.ndarray, counts: dict[str, int], title: str) -> np.ndarray:
    h = 28
    width = max(img.shape[1], 640)
    bar = np.full((h, width, 3), 255, np.uint8)
    x = 6
    if title:
        cv2.putText(bar, title, (x, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        x += 12 + cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)[0][0]
    entries = [("tissue", None)] + [(k, counts.get(k, 0)) for k in ("kept", "background", "pen", "blur")]
    for name, n in entries:
        if n == 0 and name not in ("kept",):
            continue
        cv2.rectangle(bar, (x, 8), (x + 14, 22), PREVIEW_COLORS[name], -1)
        label = name if n is None else f"{name} {n}"
        cv2.putText(bar, label, (x + 18, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += 30 + cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0]
    canvas = np.full((img.shape[0] + h, width, 3), 255, np.uint8)
    canvas[: img.shape[0], : img.shape[1]] = img
    canvas[img.shape[0] :] = bar
    return canvas
