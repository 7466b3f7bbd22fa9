"""Tissue detection on a low-resolution view of the slide.

Detectors live in :data:`TISSUE_DETECTORS` and map an RGB thumbnail at a known
resolution to a boolean mask. The default, ``otsu``, thresholds saturation with
Otsu's method (background glass is grey/white, stained tissue is coloured),
then cleans the mask with a morphological closing, drops regions smaller than a
minimum area and fills small holes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from gigamil.memory import release_freed_memory
from gigamil.registry import Registry
from gigamil.wsi.slide import SlideReader

__all__ = ["TissueDetector", "TissueMask", "OtsuTissueDetector", "TISSUE_DETECTORS", "detect_tissue"]


class TissueDetector(Protocol):
    def __call__(self, rgb: np.ndarray, mpp: float) -> np.ndarray:
        """Boolean tissue mask with the shape of ``rgb`` (h, w, 3) at ``mpp`` µm/px."""
        ...


TISSUE_DETECTORS: Registry[TissueDetector] = Registry("tissue detector")


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask at ``mpp`` µm per mask pixel, covering the whole slide."""

    mask: np.ndarray
    mpp: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def coverage(self, coords0: np.ndarray, size0: float, mpp0: float, band: int = 512
                 ) -> np.ndarray:
        """Tissue fraction in each square patch (level-0 top-left ``coords0``, side ``size0`` px)."""
        if len(coords0) == 0:
            return np.zeros(0, np.float32)
        h, w = self.mask.shape
        f = mpp0 / self.mpp
        x0 = np.clip(np.round(coords0[:, 0] * f), 0, w - 1).astype(np.int64)
        y0 = np.clip(np.round(coords0[:, 1] * f), 0, h - 1).astype(np.int64)
        side = max(1, int(round(size0 * f)))
        x1 = np.clip(x0 + side, 1, w)
        y1 = np.clip(y0 + side, 1, h)
        total = np.zeros(len(coords0), np.int64)
        # integral images of bands of mask rows (each with the rows its patches reach
        # below it), not of the whole mask: the same sums in a fraction of the memory
        for top in range(0, h, band):
            sel = np.flatnonzero((y0 >= top) & (y0 < top + band))
            if not len(sel):
                continue
            bottom = int(y1[sel].max())
            integral = cv2.integral(self.mask[top:bottom].astype(np.uint8), sdepth=cv2.CV_32S)
            ya, yb, xa, xb = y0[sel] - top, y1[sel] - top, x0[sel], x1[sel]
            total[sel] = integral[yb, xb] - integral[ya, xb] - integral[yb, xa] + integral[ya, xa]
        area = (x1 - x0) * (y1 - y0)
        return (total / np.maximum(area, 1)).astype(np.float32)


@TISSUE_DETECTORS.register("otsu")
@dataclass(frozen=True)
class OtsuTissueDetector:
    """Otsu threshold on HSV saturation, with clean-up.

    ``min_saturation`` (0–255) is a floor on the threshold so that a blank slide,
    whose saturation is all noise, yields no tissue. Areas are in µm².
    """

    min_saturation: int = 20
    min_area_um2: float = 20_000.0
    max_hole_um2: float = 50_000.0
    close_um: float = 32.0
    blur_um: float = 16.0

    def __call__(self, rgb: np.ndarray, mpp: float) -> np.ndarray:
        if rgb.size == 0:
            return np.zeros(rgb.shape[:2], bool)
        sat = _saturation(rgb, median=min(_odd(self.blur_um / mpp), 5))
        thr, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        mask: np.ndarray = cv2.threshold(sat, max(thr, self.min_saturation), 1,
                                         cv2.THRESH_BINARY)[1]
        del sat
        r = _odd(self.close_um / mpp)
        if r > 1:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (r, r))
            mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
        px_area = mpp * mpp
        mask = _drop_small(np.ascontiguousarray(mask, np.uint8), self.min_area_um2 / px_area)
        np.subtract(1, mask, out=mask)  # the background, in the same buffer
        _drop_small(mask, self.max_hole_um2 / px_area, keep_border=True)  # its large parts
        np.subtract(1, mask, out=mask)  # tissue, with the small holes filled
        return mask.view(bool)


def _odd(x: float) -> int:
    n = max(1, int(round(x)))
    return n if n % 2 else n + 1


def _saturation(rgb: np.ndarray, median: int = 1, rows: int = 256) -> np.ndarray:
    """HSV saturation (0–255) of an RGB image, median-filtered with a ``median``-px kernel
    (1: none). Made a band of rows at a time, each with the rows its filter needs above
    and below, so that neither a full-size HSV copy nor OpenCV's median buffers (several
    times the image) are ever made; the result equals filtering the whole image."""
    h = rgb.shape[0]
    pad = median // 2
    sat = np.empty(rgb.shape[:2], np.uint8)
    for y in range(0, h, rows):
        y0, y1 = max(0, y - pad), min(h, y + rows + pad)
        band = cv2.cvtColor(rgb[y0:y1], cv2.COLOR_RGB2HSV)[..., 1]
        if median > 1:
            band = cv2.medianBlur(np.ascontiguousarray(band), median)
        sat[y:y + rows] = band[y - y0:y - y0 + rows]
    return sat


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, stats) of the 8-connected components of a uint8 mask; 16-bit labels
    (half the memory) unless there are too many components for them."""
    try:
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8,
                                                               ltype=cv2.CV_16U)
    except cv2.error:  # more than 65534 components
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8,
                                                               ltype=cv2.CV_32S)
    return labels, stats


def _drop_small(mask: np.ndarray, min_area: float, keep_border: bool = False) -> np.ndarray:
    """Zero out connected components of the 0/1 uint8 ``mask`` smaller than ``min_area``
    px, in place (the mask's buffer is reused: a large mask is not copied); returns it."""
    labels, stats = _components(mask)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    if keep_border:  # background regions touching the border are never "holes"
        h, w = mask.shape
        x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
        keep |= (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    keep[0] = False  # label 0 is the complement
    lut = keep.astype(np.uint8)
    for row in range(0, mask.shape[0], 256):  # in bands: no full-size temporary
        mask[row:row + 256] = lut[labels[row:row + 256]]
    return mask


def detect_tissue(
    slide: SlideReader, detector: str = "otsu", mpp: float = 8.0, **kwargs: object
) -> tuple[TissueMask, np.ndarray]:
    """Read ``slide`` at ``mpp`` µm/px (block by block) and detect tissue.

    Returns the mask and the thumbnail it was computed from.
    """
    mpp = max(mpp, slide.mpp)
    thumb = slide.read_at_mpp(mpp)
    release_freed_memory()  # the blocks read, before detection allocates its own
    mask = TISSUE_DETECTORS.create(detector, **kwargs)(thumb, mpp)
    # the thumbnail is round(size / scale) px: use its actual µm per px
    actual_mpp = slide.dimensions[0] * slide.mpp / thumb.shape[1]
    return TissueMask(mask, actual_mpp), thumb
