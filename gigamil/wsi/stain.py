"""Stain normalization with torchstain (numpy backend: no torch in ``wsi``).

torchstain fits the stain parameters; gigamil fits them **once per slide** on
a sample of its tissue (not per patch, which makes neighbouring patches
disagree) and then applies the fitted transform to batches of patches.

- ``macenko``: optical-density stain vectors and the 99th-percentile
  concentrations of the slide are mapped onto the reference's.
- ``reinhard``: per-channel LAB mean and standard deviation of the slide are
  mapped onto the reference's.

The reference is fitted from ``--stain-reference ref.png`` or, without one,
is torchstain's built-in H&E reference (Macenko) or typical H&E LAB
statistics (Reinhard). Near-white input stays near-white and never produces
NaN: optical density is clipped and empty concentration estimates fall back
to the reference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from gigamil.errors import StainFitError, UsageError
from gigamil.registry import Registry

__all__ = ["StainNormalizer", "STAIN_NORMALIZERS", "create_stain_normalizer",
           "MacenkoNormalizer", "ReinhardNormalizer", "load_reference"]

_IO = 240.0  # transmitted light intensity, as torchstain
_BETA = 0.15  # optical density below which a pixel counts as unstained, as torchstain
_GLASS = int(_IO * np.exp(-_BETA)) - 1  # RGB above this in every channel: unstained


class StainNormalizer(Protocol):
    name: str

    def fit_slide(self, sample: np.ndarray) -> None:
        """Estimate this slide's stain from an RGB uint8 image of its tissue."""
        ...

    def apply(self, patches: np.ndarray) -> np.ndarray:
        """Normalize a batch (B, H, W, 3) or one (H, W, 3) RGB uint8 image."""
        ...


STAIN_NORMALIZERS: Registry[StainNormalizer] = Registry("stain normalizer")


def load_reference(path: str | os.PathLike[str]) -> np.ndarray:
    """An RGB uint8 reference image (PNG/JPEG/TIFF)."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UsageError(f"cannot read stain reference {Path(path).name}",
                         "give a PNG or JPEG of well-stained H&E tissue")
    return np.ascontiguousarray(img[..., ::-1])


def _tissue_pixels(rgb: np.ndarray, min_pixels: int = 500) -> np.ndarray:
    """(N, 3) pixels of ``rgb`` that are not background; raises if too few."""
    flat = rgb.reshape(-1, 3)
    od = -np.log((flat.astype(np.float32) + 1) / _IO)
    keep = (od >= _BETA).any(axis=1)
    if keep.sum() < min_pixels:
        raise StainFitError(
            f"only {int(keep.sum())} stained pixels to estimate the stain from",
            "the slide has too little tissue for stain normalization; drop --stain-norm for it",
        )
    return flat[keep]


@STAIN_NORMALIZERS.register("macenko")
class MacenkoNormalizer:
    """Macenko et al. 2009 via torchstain, fitted per slide, applied per batch."""

    name = "macenko"

    def __init__(self, reference: np.ndarray | None = None) -> None:
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

        ref = NumpyMacenkoNormalizer()
        if reference is not None:
            ref.fit(_as_image(_tissue_pixels(reference)))
        self.he_ref = np.asarray(ref.HERef, np.float64)
        self.maxc_ref = np.asarray(ref.maxCRef, np.float64)
        self.he: np.ndarray | None = None
        self.maxc: np.ndarray | None = None

    def fit_slide(self, sample: np.ndarray) -> None:
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

        fitted = NumpyMacenkoNormalizer()
        try:
            fitted.fit(_as_image(_tissue_pixels(sample)))
        except StainFitError:
            raise
        except Exception as exc:  # torchstain on degenerate input
            raise StainFitError(f"Macenko fit failed: {exc}",
                                "try --stain-norm reinhard, or none for this slide") from exc
        he, maxc = np.asarray(fitted.HERef, np.float64), np.asarray(fitted.maxCRef, np.float64)
        if not (np.isfinite(he).all() and np.isfinite(maxc).all() and (maxc > 1e-6).all()):
            raise StainFitError("Macenko fit gave degenerate stain vectors",
                                "try --stain-norm reinhard, or none for this slide")
        self.he, self.maxc = he, maxc

    def apply(self, patches: np.ndarray) -> np.ndarray:
        if self.he is None or self.maxc is None:
            raise RuntimeError("fit_slide() first")
        shape = patches.shape
        od = -np.log((patches.reshape(-1, 3).astype(np.float32) + 1) / _IO)
        od = np.maximum(od, 0)  # brighter than Io: no stain
        conc, *_ = np.linalg.lstsq(self.he.astype(np.float32), od.T, rcond=None)  # (2, N)
        conc *= (self.maxc_ref / self.maxc).astype(np.float32)[:, None]
        conc = np.maximum(conc, 0)
        out = _IO * np.exp(-(self.he_ref.astype(np.float32) @ conc))
        out = np.clip(out.T, 0, 255).astype(np.uint8)
        flat = patches.reshape(-1, 3)
        glass = (flat > _GLASS).all(axis=-1)  # unstained pixels stay as they are (not Io grey)
        out[glass] = flat[glass]
        return np.ascontiguousarray(out.reshape(shape))


#: Typical LAB statistics of H&E tissue, the Reinhard default target, in torchstain's
#: OpenCV-style units (L×2.55 in 0–255, a and b offset by 128): L 70±14, a 22±9, b −12±7.
_REINHARD_DEFAULT = (np.array([178.5, 150.0, 116.0]), np.array([35.7, 9.0, 7.0]))


@STAIN_NORMALIZERS.register("reinhard")
class ReinhardNormalizer:
    """Reinhard et al. 2001: match LAB mean and std of the slide's tissue to the reference."""

    name = "reinhard"

    def __init__(self, reference: np.ndarray | None = None) -> None:
        if reference is None:
            self.mu_ref, self.std_ref = _REINHARD_DEFAULT
        else:
            self.mu_ref, self.std_ref = _lab_stats(_as_image(_tissue_pixels(reference)))
        self.mu: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit_slide(self, sample: np.ndarray) -> None:
        self.mu, self.std = _lab_stats(_as_image(_tissue_pixels(sample)))

    def apply(self, patches: np.ndarray) -> np.ndarray:
        if self.mu is None or self.std is None:
            raise RuntimeError("fit_slide() first")
        from torchstain.numpy.utils import lab2rgb, rgb2lab

        shape = patches.shape
        img = patches.reshape(-1, shape[-2], 3) if patches.ndim == 4 else patches
        lab = rgb2lab(img.astype(np.float32) / 255)
        lab = (lab - self.mu) / np.maximum(self.std, 1e-6) * self.std_ref + self.mu_ref
        rgb = lab2rgb(lab.astype(np.float32))
        out = np.clip(np.nan_to_num(rgb) * 255 + 0.5, 0, 255).astype(np.uint8)
        glass = (img > _GLASS).all(axis=-1)  # unstained pixels stay as they are
        out[glass] = img[glass]
        return np.ascontiguousarray(out.reshape(shape))


def _lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from torchstain.numpy.utils import rgb2lab

    lab = rgb2lab(rgb.astype(np.float32) / 255).reshape(-1, 3)
    return lab.mean(axis=0).astype(np.float64), lab.std(axis=0).astype(np.float64)


def _as_image(pixels: np.ndarray) -> np.ndarray:
    """(N, 3) pixels as a (1, N, 3) image, the shape torchstain expects."""
    return np.ascontiguousarray(pixels.reshape(1, -1, 3))


def create_stain_normalizer(method: str, reference: str | os.PathLike[str] | None = None
                            ) -> StainNormalizer:
    """``macenko`` or ``reinhard``, fitted to ``reference`` (a file) or the built-in one."""
    ref = load_reference(reference) if reference is not None else None
    return STAIN_NORMALIZERS.create(method, reference=ref)
