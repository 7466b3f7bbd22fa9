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
- **blur**: variance of the Laplacian of the grey image, over tissue pixels,
  below ``blur_min``. It depends on magnification; the default suits 0.25–1 µm/px.
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


def laplacian_variance(patch: np.ndarray, hsv: np.ndarray | None = None) -> float:
    """Variance of the Laplacian of the grey image over non-background pixels."""
    grey = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY)
    lap = cv2.Laplacian(grey, cv2.CV_32F, ksize=3)
    hsv = _hsv(patch) if hsv is None else hsv
    tissue = ~((hsv[..., 2] > 210) & (hsv[..., 1] < 25))
    tissue[:1, :] = tissue[-1:, :] = False  # the kernel's border
    tissue[:, :1] = tissue[:, -1:] = False
    vals = lap[tissue]
    return float(vals.var()) if vals.size > 16 else 0.0


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
