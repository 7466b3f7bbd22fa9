"""What a pathologist looks at besides the heatmap: the top patches, and the map in QuPath.

    img = top_patch_montage("a.svs", coords, 512.0, 224, attention, k=16, cfg=extract)
    feats = patch_measurements(coords, 512.0, attention, patch_probs, classes)

:func:`top_patch_montage` reads the ``k`` patches with the highest and the lowest
attention back from the slide (at the run's µm/px) into one labelled picture.
:func:`patch_measurements` makes QuPath detections, one square per patch, whose
measurements are the attention (raw and rank-scaled) and each class's probability
with the patch scored as a bag of one; written with ``gigamil.wsi.qupath.write_geojson``
they open over the slide in QuPath (File › Import objects).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from gigamil.wsi.extract_config import ExtractConfig

__all__ = ["top_patch_montage", "top_and_bottom", "patch_measurements", "read_patches"]

_GAP = 4
_LABEL = 18


def top_and_bottom(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest values (highest first) and the ``k`` lowest (lowest
    first), disjoint when there are fewer than ``2k``; ties go to the lower index."""
    order = np.argsort(-np.asarray(values, np.float64), kind="stable")
    k = max(0, min(k, len(order)))
    top = order[:k]
    rest = order[k:][::-1]
    bottom = rest[: min(k, len(rest))]
    return top, bottom


def read_patches(path: str | os.PathLike[str], coords: np.ndarray, size_level0: float,
                 out_px: int, cfg: ExtractConfig) -> list[np.ndarray]:
    """The patches at level-0 top-left ``coords`` (side ``size_level0`` level-0 px), each
    read from the level nearest their resolution and resized to ``out_px``."""
    from gigamil.wsi.reader import open_slide_for
    from gigamil.wsi.slide import resize_area

    out = []
    with open_slide_for(path, cfg) as slide:
        level, _ = slide.level_for_mpp(slide.mpp * size_level0 / out_px, allow_upsample=True)
        lv = slide.levels[level]
        side = max(1, int(round(size_level0 / lv.downsample)))
        for x0, y0 in np.asarray(coords, np.int64).reshape(-1, 2):
            x = min(max(0, int(x0 / lv.downsample)), max(0, lv.width - side))
            y = min(max(0, int(y0 / lv.downsample)), max(0, lv.height - side))
            w, h = min(side, lv.width - x), min(side, lv.height - y)
            region = slide.read_region(level, x, y, w, h)
            out.append(resize_area(region, (out_px, out_px)))
    return out


def top_patch_montage(path: str | os.PathLike[str], coords: np.ndarray, size_level0: float,
                      patch_px: int, values: np.ndarray, k: int, cfg: ExtractConfig,
                      title: str = "", what: str = "attention", tile: int = 128) -> np.ndarray:
    """Two labelled rows of up to ``k`` patches each: the highest ``values`` and the lowest,
    read from the slide at ``path``, shrunk to ``tile`` px, with each one's value."""
    top, bottom = top_and_bottom(values, k)
    patches = read_patches(path, coords[np.concatenate([top, bottom])], size_level0,
                           min(patch_px, max(tile, 1)), cfg)
    cols = max(1, len(top))
    width = cols * (tile + _GAP) + _GAP
    rows = [("highest " + what, top, patches[: len(top)]),
            ("lowest " + what, bottom, patches[len(top):])]
    height = 30 + sum(_LABEL + tile + _LABEL + _GAP for _ in rows)
    sheet = np.full((height, max(width, 360), 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(sheet, title, (_GAP, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    y = 30
    for label, idx, imgs in rows:
        cv2.putText(sheet, label, (_GAP, y + 13), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        y += _LABEL
        for c, (i, img) in enumerate(zip(idx, imgs)):
            x = _GAP + c * (tile + _GAP)
            sheet[y:y + tile, x:x + tile] = cv2.resize(img, (tile, tile),
                                                       interpolation=cv2.INTER_AREA)
            cv2.putText(sheet, _short(float(values[i])), (x + 2, y + tile + 13), font, 0.38,
                        (0, 0, 0), 1, cv2.LINE_AA)
        y += tile + _LABEL + _GAP
    return sheet


def _short(v: float) -> str:
    if not math.isfinite(v):
        return "nan"
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def patch_measurements(coords: np.ndarray, size_level0: float, attention: np.ndarray,
                       patch_probs: np.ndarray | None, classes: Sequence[str]
                       ) -> list[dict[str, Any]]:
    """QuPath detections, one per patch, with ``attention``, ``attention rank`` (0 to 1)
    and, given ``patch_probs`` (N, C), ``P(<class>)`` for each class as measurements."""
    from gigamil.wsi.qupath import patch_features

    attention = np.asarray(attention, np.float64)
    ranks = attention.argsort().argsort() / max(1, len(attention) - 1)
    measurements: dict[str, np.ndarray] = {"attention": attention, "attention rank": ranks}
    if patch_probs is not None:
        for k, c in enumerate(classes):
            measurements[f"P({c})"] = np.asarray(patch_probs[:, k], np.float64)
    return patch_features(coords, size_level0, measurements, classification="Patch",
                          object_type="detection")
