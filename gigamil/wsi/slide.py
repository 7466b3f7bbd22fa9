"""The backend-independent slide interface: :class:`SlideReader` and area resizing.

Backends (:mod:`gigamil.wsi.reader`) implement a handful of hooks; this class
turns them into lazily computed metadata (levels, mpp, vendor, …), level choice
by resolution and checked region reads. Pixels of associated images (label,
macro — which may carry PHI) are never read: only their names are exposed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gigamil.errors import (
    MissingMppError,
    SlideError,
    SlideOpenError,
    UnreadableRegionError,
    UsageError,
)
from gigamil.wsi.metadata import Level, choose_level, tiff_metadata, valid_mpp

__all__ = ["SlideReader", "resize_area"]


def resize_area(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an RGB image to ``size`` (w, h) px; area interpolation when shrinking."""
    w, h = (size, size) if isinstance(size, int) else size
    if image.shape[1] == w and image.shape[0] == h:
        return image
    shrinking = w <= image.shape[1] and h <= image.shape[0]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp)


class SlideReader:
    """A whole-slide image. Subclasses implement the backend-specific hooks.

    Use as a context manager; metadata properties are computed lazily and cached.
    """

    backend: str = "?"

    def __init__(self, path: str | os.PathLike[str], mpp_override: float | None = None) -> None:
        self.path = Path(path)
        self.mpp_override = mpp_override
        self.mpp_source = "slide"  # or "override", "magnification"
        self.mpp_from_magnification = False  # else a missing mpp is an error
        self.notes: list[str] = []  # what a reader did differently (a level fallback, …)
        self._handle: Any = None
        self._open()

    # ---- backend hooks -------------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _level_dims_and_downsamples(self) -> list[tuple[int, int, float]]:
        raise NotImplementedError

    def _native_mpp(self) -> float | None:
        raise NotImplementedError

    def _native_objective_power(self) -> float | None:
        raise NotImplementedError

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at ``level``, top-left (x, y) in that level's pixels.

        Raises :class:`UnreadableRegionError` when tiles under the region cannot be
        decoded; areas outside the level are white.
        """
        raise NotImplementedError

    #: Whether :meth:`_read` returns the level's own pixels, so that a wide region
    #: cut into patches equals reading each patch alone on any level (fractional
    #: downsamples included). openslide resamples fractional levels: False.
    exact_levels: bool = True

    @property
    def format(self) -> str:
        """The slide's file format, as a user would name it (``aperio``, ``dicom``, …)."""
        return self.vendor

    @property
    def associated_names(self) -> list[str]:
        """Names of associated images (label, macro, thumbnail); pixels are never read."""
        raise NotImplementedError

    # ---- lifecycle ------------------------------------------------------------
    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(Exception):
                self._close()
            self._handle = None

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path.name!r})"

    # ---- metadata ------------------------------------------------------------
    @functools.cached_property
    def _tiff_meta(self) -> tuple[float | None, float | None]:
        return tiff_metadata(self.path)

    @functools.cached_property
    def vendor(self) -> str:
        try:
            import openslide

            return openslide.OpenSlide.detect_format(str(self.path)) or "unknown"
        except Exception:
            return "unknown"

    @functools.cached_property
    def mpp(self) -> float:
        """Level-0 resolution in µm per pixel.

        From the backend's properties, else TIFF resolution tags or the Aperio
        description, else ``mpp_override`` (which never replaces a recorded value).
        Raises :class:`MissingMppError` if there is none.
        """
        mpp = self._native_mpp() or self._tiff_meta[0]
        if mpp is not None:
            return mpp
        if self.mpp_override is not None:
            override = valid_mpp(self.mpp_override)
            if override is None:
                raise UsageError(
                    f"--mpp-override {self.mpp_override} is not a plausible resolution",
                    "give µm per pixel of level 0, e.g. 0.25 for 40x or 0.5 for 20x",
                )
            self.mpp_source = "override"
            return override
        power = self.objective_power
        if self.mpp_from_magnification and power is not None:
            guess = valid_mpp(10.0 / power)
            if guess is not None:
                self.mpp_source = "magnification"
                self.notes.append(f"mpp {guess:g} guessed from the {power:g}x objective "
                                  "(--mpp-from-magnification): scanners differ, check it")
                return guess
        raise MissingMppError(
            f"{self.path.name} does not record its resolution (µm per pixel)",
            "pass --mpp-override MPP (e.g. 0.25 for a 40x scan, 0.5 for 20x), list it in "
            "--mpp-csv, or allow --mpp-from-magnification",
        )

    @functools.cached_property
    def objective_power(self) -> float | None:
        return self._native_objective_power() or self._tiff_meta[1]

    @functools.cached_property
    def levels(self) -> list[Level]:
        mpp = self.mpp
        return [
            Level(i, w, h, ds, mpp * ds)
            for i, (w, h, ds) in enumerate(self._level_dims_and_downsamples())
        ]

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        w, h, _ = self._level_dims_and_downsamples()[0]
        return w, h

    # ---- resolution ----------------------------------------------------------
    def level_for_mpp(self, target_mpp: float, allow_upsample: bool = False) -> tuple[int, float]:
        """The level to read for ``target_mpp`` and the factor to shrink it by.

        Picks the coarsest level that is not coarser than the target (so reading
        only ever shrinks, with area interpolation). Returns ``(level, scale)``
        with ``scale = target_mpp / level_mpp`` (1.0 when the level matches).
        A target finer than level 0 raises :class:`UpsampleError` unless allowed.
        """
        return choose_level(self.levels, target_mpp, allow_upsample, self.path.name)

    # ---- pixels --------------------------------------------------------------
    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read a ``w``×``h`` RGB uint8 region at ``level``, top-left (x, y) in *level* pixels."""
        try:
            region = self._read(level, x, y, w, h)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideOpenError(
                f"{self.path.name}: could not read pixels at level {level} ({x},{y}): {exc}",
                "the file may be truncated or corrupt; copy it again from the source",
            ) from exc
        if region.shape != (h, w, 3):
            raise SlideOpenError(
                f"{self.path.name}: backend returned shape {region.shape}, expected {(h, w, 3)}",
                "the file may be corrupt; try --backend openslide",
            )
        return region

    def read_at_mpp(self, target_mpp: float, block: int = 1024) -> np.ndarray:
        """The whole slide at a coarse ``target_mpp`` (e.g. 8 µm/px), read block by block.

        Memory stays bounded by the output plus one input block of about
        ``block``×``block`` px, whatever the slide size. A level that cannot be
        decoded falls back to the next finer one, with a note in :attr:`notes`.
        """
        level, _ = self.level_for_mpp(target_mpp, allow_upsample=True)
        for lvl in range(level, -1, -1):
            try:
                out = self._read_level_at(lvl, target_mpp, block)
                self._forget_tiles()  # a coarse level's tiles: patches are read elsewhere
                return out
            except UnreadableRegionError as exc:
                if lvl == 0:
                    raise UnreadableRegionError(
                        f"{exc.message}; no finer level to read instead",
                        "the file is damaged; copy it again from the source") from exc
                self.notes.append(f"level {lvl} cannot be decoded ({exc.message}); "
                                  f"read level {lvl - 1} instead")
        raise AssertionError("unreachable")

    def _forget_tiles(self) -> None:
        """Drop decoded tiles the reader keeps (none here; see ``TiffTileReader``)."""

    def _read_level_at(self, level: int, target_mpp: float, block: int) -> np.ndarray:
        lv = self.levels[level]
        scale = target_mpp / lv.mpp
        out_w = max(1, int(round(lv.width / scale)))
        out_h = max(1, int(round(lv.height / scale)))
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        step = max(8, int(block / max(scale, 1.0)))  # output px per block
        for oy in range(0, out_h, step):
            oy1 = min(out_h, oy + step)
            iy0 = min(lv.height - 1, int(math.floor(oy * scale)))
            iy1 = max(iy0 + 1, min(lv.height, int(math.ceil(oy1 * scale))))
            for ox in range(0, out_w, step):
                ox1 = min(out_w, ox + step)
                ix0 = min(lv.width - 1, int(math.floor(ox * scale)))
                ix1 = max(ix0 + 1, min(lv.width, int(math.ceil(ox1 * scale))))
                region = self.read_region(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
                out[oy:oy1, ox:ox1] = resize_area(region, (ox1 - ox, oy1 - oy))
        return out

    def describe(self) -> dict[str, Any]:
        """Metadata a user can see (no paths beyond the file name, no associated pixels)."""
        try:
            mpp: float | None = self.mpp
        except MissingMppError:
            mpp = None
        levels = [
            {
                "level": i,
                "width": w,
                "height": h,
                "downsample": round(ds, 4),
                "mpp": None if mpp is None else round(mpp * ds, 5),
            }
            for i, (w, h, ds) in enumerate(self._level_dims_and_downsamples())
        ]
        return {
            "file": self.path.name,
            "format": self.format,
            "backend": self.backend,
            "vendor": self.vendor,
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "mpp": mpp,
            "mpp_source": self.mpp_source if mpp is not None else None,
            "objective_power": self.objective_power,
            "levels": levels,
            "associated_images": self.associated_names,
        }

