"""Per-patch quality control: background, pen ink and blur.

Each filter has one threshold; ``None`` turns it off. :meth:`QCConfig.check`
takes a batch of RGB patches and returns, per patch, the first reason it fails
(``"background"``, ``"pen"``, ``"blur"``) or ``""`` when it passes. Checks
run in that order because a white or inked patch is also "blurry".

- **background**: fraction of near-white pixels (bright and unsaturated) above
  ``background_max``.
- **pen**: fraction of pixels coloured like blue, green or black marker ink
  above ``pen_max``. Ink hues are kept apart from haematoxylin (purple, hue
  ~260–290°) and eosin (pink, ~300–340°).
- **blur**: the median over 32-px tissue blocks of the variance of the Laplacian
  of the grey image, below ``blur_min``. It depends on magnification and stain;
  the default suits 0.25–1 µm/px. Look at ``--previews`` to tune it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from gigamil.errors import UsageError

__all__ = ["QCConfig", "QC_REASONS", "background_fraction", "pen_fraction", "laplacian_variance"]

QC_REASONS = ("background", "pen", "blur")


def _hsv(patch: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(patch, cv2.COLOR_RGB2HSV)  # H in [0, 180), S and V in [0, 255]


def background_fraction(patch: np.ndarray, hsv: np.ndarray | None = None) -> float:
    """Fraction of pixels that look like glass: bright (V > 210) and unsaturated (S < 25)."""
    hsv = _hsv(patch) if hsv is None else hsv
    return float(((hsv[..., 2] > 210) & (hsv[..., 1] < 25)).mean())


def pen_fraction(patch: np.ndarray, hsv: np.ndarray | None = None) -> float:
    """Fraction of pixels coloured like marker ink (blue, green or black)."""
    hsv = _hsv(patch) if hsv is None else hsv
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    blue = (h >= 100) & (h <= 124) & (s >= 90) & (v >= 50)  # 200–248°
    green = (h >= 35) & (h <= 90) & (s >= 60) & (v >= 40)  # 70–180°
    black = (v < 80) & (s < 100)  # ink is dark and grey; nuclei are dark but saturated
    return float((blue | green | black).mean())


def laplacian_variance(patch: np.ndarray, hsv: np.ndarray | None = None, block: int = 32) -> float:
    """Focus score: the median, over tissue blocks of ``block`` px, of the Laplacian's variance.

    The median (not the whole-patch variance) makes a patch that is mostly out of
    focus score low even when a sharp edge crosses one corner of it.
    """
    grey = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY)
    lap = cv2.Laplacian(grey, cv2.CV_32F, ksize=3)
    hsv = _hsv(patch) if hsv is None else hsv
    glass = (hsv[..., 2] > 210) & (hsv[..., 1] < 25)
    h, w = (grey.shape[0] // block) * block, (grey.shape[1] // block) * block
    if h == 0 or w == 0:
        block, h, w = min(grey.shape), grey.shape[0], grey.shape[1]
    tiles = lap[:h, :w].reshape(h // block, block, w // block, block).swapaxes(1, 2)
    glass_frac = glass[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3))
    var = tiles.reshape(tiles.shape[0], tiles.shape[1], -1).var(axis=2)
    tissue = glass_frac < 0.5
    return float(np.median(var[tissue])) if tissue.any() else 0.0


@dataclass(frozen=True)
class QCConfig:
    """Thresholds of the patch filters (``None`` switches a filter off)."""

    background_max: float | None = 0.75
    pen_max: float | None = 0.10
    blur_min: float | None = 30.0

    def __post_init__(self) -> None:
        for name in ("background_max", "pen_max"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise UsageError(f"--qc-{name.replace('_', '-')} {value} must be between 0 and 1")
        if self.blur_min is not None and self.blur_min < 0:
            raise UsageError(f"--qc-blur-min {self.blur_min} must be non-negative")

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.background_max, self.pen_max, self.blur_min))

    def reason(self, patch: np.ndarray) -> str:
        """Why ``patch`` fails QC, or ``""`` if it passes."""
        if not self.enabled:
            return ""
        hsv = _hsv(patch)
        if self.background_max is not None and background_fraction(patch, hsv) > self.background_max:
            return "background"
        if self.pen_max is not None and pen_fraction(patch, hsv) > self.pen_max:
            return "pen"
        if self.blur_min is not None and laplacian_variance(patch, hsv) < self.blur_min:
            return "blur"
        return ""

    def check(self, patches: list[np.ndarray]) -> list[str]:
        return [self.reason(p) for p in patches]
