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

__all__ = ["QCConfig", "QC_REASONS", "background_fraction", "pen_fraction", "pen_mask",
           "laplacian_variance"]

QC_REASONS = ("background", "pen", "blur")


def _hsv(patch: np.ndarray, step: int = 1) -> np.ndarray:
    """HSV (H in [0, 180), S and V in [0, 255]), of every ``step``-th pixel."""
    return cv2.cvtColor(np.ascontiguousarray(patch[::step, ::step]), cv2.COLOR_RGB2HSV)


def _step(side: int) -> int:
    """Subsampling step for colour fractions: divides the patch side, keeps ≥ 16 samples."""
    return next(s for s in (4, 2, 1) if side % s == 0 and side // s >= 16 or s == 1)


def _glass(hsv: np.ndarray) -> np.ndarray:
    return (hsv[..., 2] > 210) & (hsv[..., 1] < 25)


def background_fraction(patch: np.ndarray, hsv: np.ndarray | None = None) -> float:
    """Fraction of pixels that look like glass: bright (V > 210) and unsaturated (S < 25)."""
    hsv = _hsv(patch) if hsv is None else hsv
    return float(_glass(hsv).mean())


def _pen_mask(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    blue = (h >= 100) & (h <= 124) & (s >= 90) & (v >= 50)  # 200–248°
    green = (h >= 35) & (h <= 90) & (s >= 60) & (v >= 40)  # 70–180°
    black = (v < 80) & (s < 100)  # ink is dark and grey; nuclei are dark but saturated
    return blue | green | black


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels of ``rgb`` coloured like marker ink."""
    return _pen_mask(_hsv(rgb))


def pen_fraction(patch: np.ndarray, hsv: np.ndarray | None = None) -> float:
    """Fraction of pixels coloured like marker ink (blue, green or black)."""
    hsv = _hsv(patch) if hsv is None else hsv
    return float(_pen_mask(hsv).mean())


def _focus_scores(strip: np.ndarray, n: int, glass: np.ndarray, step: int,
                  block: int = 32) -> np.ndarray:
    """Per patch of the strip: median over its tissue blocks of the Laplacian's variance."""
    h, w = strip.shape[:2]
    side = w // n
    block = min(block, side)
    nb = side // block  # blocks per patch side
    if nb == 0:
        return np.zeros(n)
    grey = cv2.cvtColor(np.ascontiguousarray(strip), cv2.COLOR_RGB2GRAY)
    # exact integer sums in int16 (|lap| ≤ 8·255), then float32 for the block statistics:
    # OpenCV's uint8 → float32 Laplacian is 10× slower on slide content, and uint8 → int16
    # is faster still than going through a float32 copy
    lap = cv2.Laplacian(grey, cv2.CV_16S, ksize=3).astype(np.float32)
    # a patch's edge pixels would see its neighbour in the strip: zero them (in both paths),
    # so a patch scores the same whichever run it is read in
    edges = lap.reshape(h, n, side)
    edges[:, :, 0] = edges[:, :, -1] = 0
    lap[0, :] = lap[-1, :] = 0
    crop = lap[: nb * block].reshape(nb * block, n, side)[:, :, : nb * block]
    lap = np.ascontiguousarray(crop.reshape(nb * block, n * nb * block))
    grid = (n * nb, nb)
    mean = cv2.resize(lap, grid, interpolation=cv2.INTER_AREA)  # block means
    var = cv2.resize(lap * lap, grid, interpolation=cv2.INTER_AREA) - mean * mean
    gb = block // step
    g = glass[: nb * gb].reshape(nb * gb, n, -1)[:, :, : nb * gb].astype(np.float32)
    g = np.ascontiguousarray(g.reshape(nb * gb, n * nb * gb))
    tissue = cv2.resize(g, grid, interpolation=cv2.INTER_AREA) < 0.5
    var = var.reshape(nb, n, nb).transpose(1, 0, 2).reshape(n, -1)
    tissue = tissue.reshape(nb, n, nb).transpose(1, 0, 2).reshape(n, -1)
    scores = np.where(tissue, var, np.inf).astype(np.float64)
    out = np.zeros(n)
    count = tissue.sum(axis=1)
    has = count > 0
    if has.any():  # the median of each patch's tissue blocks (non-tissue sorts last)
        ordered = np.sort(scores[has], axis=1)
        rows, k = np.arange(int(has.sum())), count[has]
        out[has] = (ordered[rows, (k - 1) // 2] + ordered[rows, k // 2]) / 2
    return out


def laplacian_variance(patch: np.ndarray, block: int = 32) -> float:
    """Focus score: the median, over tissue blocks of ``block`` px, of the Laplacian's variance.

    The median (not the whole-patch variance) makes a patch that is mostly out of
    focus score low even when a sharp edge crosses one corner of it.
    """
    step = _step(patch.shape[1])
    return float(_focus_scores(patch, 1, _glass(_hsv(patch, step)), step, block)[0])


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
        return self.check_strip(patch, 1)[0]

    def check(self, patches: list[np.ndarray]) -> list[str]:
        return [self.reason(p) for p in patches]

    def check_strip(self, strip: np.ndarray, n: int) -> list[str]:
        """QC of ``n`` equal square patches laid side by side in ``strip`` (h, n*h, 3).

        One colour conversion and one Laplacian for the whole strip: several times
        faster than patch by patch, with the same thresholds.
        """
        if not self.enabled:
            return [""] * n
        h, w = strip.shape[:2]
        side = w // n
        reasons = [""] * n
        step = _step(side)  # fractions need no full resolution
        hsv = _hsv(strip, step)
        sh, sw = hsv.shape[0], (hsv.shape[1] // n) * n
        per = sw // n

        def frac(mask: np.ndarray) -> np.ndarray:
            return mask[:, :sw].reshape(sh, n, per).mean(axis=(0, 2))

        glass = _glass(hsv)
        if self.background_max is not None:
            bg = frac(glass)
            for i in np.flatnonzero(bg > self.background_max):
                reasons[i] = "background"
        if self.pen_max is not None:
            pen = frac(_pen_mask(hsv))
            for i in np.flatnonzero(pen > self.pen_max):
                reasons[i] = reasons[i] or "pen"
        if self.blur_min is not None:
            scores = _focus_scores(strip, n, glass, step)
            for i in np.flatnonzero(scores < self.blur_min):
                reasons[i] = reasons[i] or "blur"
        return reasons
