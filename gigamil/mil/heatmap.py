"""Attention (or per-patch score) heatmaps over a slide thumbnail, with a colour bar.

    img = attention_heatmap(thumb, thumb_mpp, coords, patch_size0, level0_mpp, attention)
    save_png("a.png", img)

Memory is bounded: the thumbnail is read at a coarse µm/px (block by block) and the
map is drawn at thumbnail resolution, whatever the slide size.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["attention_heatmap", "attention_grid", "HEATMAP_MPP"]

HEATMAP_MPP = 8.0  # µm per thumbnail pixel


def attention_grid(shape: tuple[int, int], coords0: np.ndarray, size0: float, scale: float,
                   values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``values`` of patches (level-0 top-left ``coords0``, side ``size0``) onto a
    (H, W) grid at ``scale`` thumbnail px per level-0 px; (sum of values, coverage count)."""
    acc = np.zeros(shape, np.float64)
    cover = np.zeros(shape, np.float64)
    h, w = shape
    side = max(1, int(round(size0 * scale)))
    for (x, y), v in zip(np.asarray(coords0), np.asarray(values, np.float64)):
        x0, y0 = int(x * scale), int(y * scale)
        x1, y1 = min(w, x0 + side), min(h, y0 + side)
        if x1 > x0 and y1 > y0:
            acc[y0:y1, x0:x1] += v
            cover[y0:y1, x0:x1] += 1
    return acc, cover


def attention_heatmap(thumb: np.ndarray, scale: float, coords0: np.ndarray, size0: float,
                      values: np.ndarray, title: str = "", alpha: float = 0.5,
                      label: str = "attention (rank-scaled)", rank_scale: bool = True
                      ) -> np.ndarray:
    """The thumbnail with patch values blended in as a jet colour map, plus a colour bar.

    With ``rank_scale`` values are rank-scaled to [0, 1] (attention spans orders of
    magnitude); else they are taken as they are, clipped to [0, 1] (probabilities).
    Patches not in the bag stay uncoloured.
    """
    values = np.asarray(values, np.float64)
    if len(values) and rank_scale:
        ranks = values.argsort().argsort().astype(np.float64)
        values = ranks / max(1, len(values) - 1)
    acc, cover = attention_grid(thumb.shape[:2], coords0, size0, scale, values)
    inside = cover > 0
    level = np.zeros(thumb.shape[:2], np.uint8)
    level[inside] = np.clip(acc[inside] / cover[inside] * 255, 0, 255).astype(np.uint8)
    colour = cv2.applyColorMap(level, cv2.COLORMAP_JET)[..., ::-1]
    out = thumb.astype(np.float32).copy()
    out[inside] = (1 - alpha) * out[inside] + alpha * colour[inside]
    ends = ("high", "low") if rank_scale else ("1", "0")
    return _with_colour_bar(out.astype(np.uint8), title, label, ends)


def _with_colour_bar(img: np.ndarray, title: str, label: str,
                     ends: tuple[str, str] = ("high", "low")) -> np.ndarray:
    h, w = img.shape[:2]
    bar_h = max(120, min(h, 400))
    pad = 36
    canvas = np.full((max(h, bar_h) + pad, w + 90, 3), 255, np.uint8)
    canvas[pad : pad + h, :w] = img
    ramp = np.linspace(255, 0, bar_h).astype(np.uint8)[:, None].repeat(18, 1)
    bar = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)[..., ::-1]
    canvas[pad : pad + bar_h, w + 12 : w + 30] = bar
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(canvas, ends[0], (w + 34, pad + 12), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, ends[1], (w + 34, pad + bar_h), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    text = f"{title}  {label}".strip()
    cv2.putText(canvas, text, (4, 24), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas
