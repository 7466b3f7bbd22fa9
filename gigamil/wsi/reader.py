"""Whole-slide image reading behind one interface, over openslide and cuCIM.

A slide is opened with :func:`open_slide` and used as a context manager::

    with open_slide("slides/s000.svs") as slide:
        level, scale = slide.level_for_mpp(0.5)
        rgb = slide.read_region(level, x, y, w, h)   # level coordinates, RGB uint8 (h, w, 3)

Metadata (levels, mpp, vendor, …) is read lazily on first use. Pixels of
associated images (label, macro — which may carry PHI) are never read: only
their names are exposed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from gigamil.errors import (
    BackendUnavailableError,
    MissingMppError,
    SlideOpenError,
    UpsampleError,
    UsageError,
)

__all__ = [
    "Backend",
    "Level",
    "SlideReader",
    "OpenSlideReader",
    "CuCIMReader",
    "open_slide",
    "cucim_available",
    "SLIDE_EXTENSIONS",
    "resize_area",
    "choose_level",
    "slide_id",
]

Backend = Literal["auto", "openslide", "cucim"]

#: File extensions treated as slides when a directory is scanned.
SLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm"}
)
#: Extensions cuCIM reads (TIFF family); ``auto`` prefers cuCIM for these.
_CUCIM_EXTENSIONS = frozenset({".svs", ".tif", ".tiff"})

#: Relative tolerance under which a level's mpp counts as equal to a target mpp.
MPP_RTOL = 1e-2
#: Plausible level-0 resolutions; outside (e.g. 352.8 from a 72-dpi TIFF) counts as missing.
_MPP_RANGE = (0.02, 20.0)


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels, downsample from level 0 and resolution."""

    index: int
    width: int
    height: int
    downsample: float
    mpp: float


def resize_area(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an RGB image to ``size`` (w, h) px; area interpolation when shrinking."""
    w, h = (size, size) if isinstance(size, int) else size
    if image.shape[1] == w and image.shape[0] == h:
        return image
    shrinking = w <= image.shape[1] and h <= image.shape[0]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp)


def _parse_aperio(description: str) -> dict[str, str]:
    """Key/value pairs of an Aperio ImageDescription (``... |MPP = 0.25|AppMag = 40``)."""
    if not description.startswith("Aperio"):
        return {}
    out = {}
    for part in description.split("|")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _number_in(value: Any, lo: float, hi: float) -> float | None:
    """``value`` as a float if it parses and lies in (lo, hi); else None."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and lo < x < hi else None


def _valid_mpp(value: Any) -> float | None:
    return _number_in(value, *_MPP_RANGE)


def _valid_power(value: Any) -> float | None:
    return _number_in(value, 0.1, 400.0)


def _tiff_metadata(path: Path) -> tuple[float | None, float | None]:
    """(mpp, objective power) from TIFF tags of the first page, for any backend."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            aperio = _parse_aperio(str(page.description or ""))
            mpp = _valid_mpp(aperio.get("MPP"))
            power = _valid_power(aperio.get("AppMag"))
            if mpp is None:
                tags = page.tags
                unit = tags.get("ResolutionUnit")
                xres = tags.get("XResolution")
                if unit is not None and xres is not None:
                    num, den = xres.value
                    per_unit = num / den if den else 0.0
                    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
                    if per_unit > 0 and um_per_unit:
                        mpp = _valid_mpp(um_per_unit / per_unit)
            return mpp, power
    except Exception:  # not a TIFF, or unreadable tags: the backend decides
        return None, None


def choose_level(
    levels: list[Level], target_mpp: float, allow_upsample: bool = False, name: str = "slide"
) -> tuple[int, float]:
    """See :meth:`SlideReader.level_for_mpp`."""
    if not target_mpp > 0:
        raise UsageError(f"target mpp must be positive, got {target_mpp}")
    best = None
    for level in levels:  # levels go from fine to coarse
        if level.mpp <= target_mpp * (1 + MPP_RTOL):
            best = level
    if best is None:
        if not allow_upsample:
            raise UpsampleError(
                f"{name} was scanned at {levels[0].mpp:.4g} µm/px, "
                f"coarser than the requested {target_mpp:g} µm/px",
                "ask for a coarser --mpp, or pass --allow-upsample to interpolate",
            )
        best = levels[0]
    scale = target_mpp / best.mpp
    if abs(scale - 1.0) <= MPP_RTOL:
        scale = 1.0
    return best.index, scale


class SlideReader:
    """A whole-slide image. Subclasses implement the backend-specific hooks.

    Use as a context manager; metadata properties are computed lazily and cached.
    """

    backend: str = "?"

    def __init__(self, path: str | os.PathLike[str], mpp_override: float | None = None) -> None:
        self.path = Path(path)
        self.mpp_override = mpp_override
        self.mpp_source = "slide"  # or "override"
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

    def _read_level0(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at ``level``; the top-left corner in level-0 pixels."""
        raise NotImplementedError

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
        return _tiff_metadata(self.path)

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
            override = _valid_mpp(self.mpp_override)
            if override is None:
                raise UsageError(
                    f"--mpp-override {self.mpp_override} is not a plausible resolution",
                    "give µm per pixel of level 0, e.g. 0.25 for 40x or 0.5 for 20x",
                )
            self.mpp_source = "override"
            return override
        raise MissingMppError(
            f"{self.path.name} does not record its resolution (µm per pixel)",
            "pass --mpp-override MPP (e.g. 0.25 for a 40x scan, 0.5 for 20x)",
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
        ds = self.levels[level].downsample
        x0, y0 = int(round(x * ds)), int(round(y * ds))
        try:
            region = self._read_level0(x0, y0, level, w, h)
        except SlideOpenError:
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

    def read_at_mpp(self, target_mpp: float, block: int = 4096) -> np.ndarray:
        """The whole slide at a coarse ``target_mpp`` (e.g. 8 µm/px), read block by block.

        Memory stays bounded by the output plus one input block of about
        ``block``×``block`` px, whatever the slide size.
        """
        level, scale = self.level_for_mpp(target_mpp, allow_upsample=True)
        lv = self.levels[level]
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


class OpenSlideReader(SlideReader):
    backend = "openslide"

    def _open(self) -> None:
        import openslide

        if not self.path.is_file():
            raise SlideOpenError(f"{self.path.name} does not exist or is not a file")
        try:
            self._handle = openslide.OpenSlide(str(self.path))
        except Exception as exc:
            raise SlideOpenError(
                f"{self.path.name} is not a readable slide ({type(exc).__name__}: {exc})",
                "check that it is a complete whole-slide image; re-copy it if it was truncated",
            ) from exc

    def _close(self) -> None:
        self._handle.close()

    def _level_dims_and_downsamples(self) -> list[tuple[int, int, float]]:
        h = self._handle
        return [
            (int(w), int(ht), float(ds))
            for (w, ht), ds in zip(h.level_dimensions, h.level_downsamples)
        ]

    def _native_mpp(self) -> float | None:
        import openslide

        props = self._handle.properties
        x = _valid_mpp(props.get(openslide.PROPERTY_NAME_MPP_X))
        return x

    def _native_objective_power(self) -> float | None:
        import openslide

        return _valid_power(self._handle.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))

    @property
    def associated_names(self) -> list[str]:
        return sorted(self._handle.associated_images.keys())

    def _read_level0(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        rgba = np.asarray(self._handle.read_region((x0, y0), level, (w, h)))
        rgb = rgba[..., :3]
        alpha = rgba[..., 3]
        if alpha.min() < 255:  # transparent (outside scanned area) → white background
            rgb = rgb.copy()
            rgb[alpha == 0] = 255
        return np.ascontiguousarray(rgb)


@functools.lru_cache(maxsize=1)
def cucim_available() -> bool:
    """Whether cuCIM can be imported (it is an optional extra: ``gigamil[cucim]``)."""
    try:
        with _quiet_stderr():
            import cucim  # noqa: F401
    except Exception:
        return False
    return True


@contextlib.contextmanager
def _quiet_stderr():  # type: ignore[no-untyped-def]
    """Silence C-level stderr (cuCIM prints cuFile/libcuda warnings on CPU-only hosts)."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)


class CuCIMReader(SlideReader):
    backend = "cucim"

    def _open(self) -> None:
        if not cucim_available():
            raise BackendUnavailableError(
                "the cucim backend is not installed",
                "pip install 'gigamil[cucim]', or use --backend openslide",
            )
        from cucim import CuImage

        if not self.path.is_file():
            raise SlideOpenError(f"{self.path.name} does not exist or is not a file")
        try:
            with _quiet_stderr():
                self._handle = CuImage(str(self.path))
        except Exception as exc:
            raise SlideOpenError(
                f"{self.path.name} is not a readable slide for cucim ({exc})",
                "check the file; --backend openslide reads more formats",
            ) from exc

    def _close(self) -> None:
        close = getattr(self._handle, "close", None)
        if close is not None:
            close()

    @functools.cached_property
    def _resolutions(self) -> dict[str, Any]:
        return dict(self._handle.resolutions)

    def _level_dims_and_downsamples(self) -> list[tuple[int, int, float]]:
        r = self._resolutions
        return [
            (int(w), int(h), float(ds))
            for (w, h), ds in zip(r["level_dimensions"], r["level_downsamples"])
        ]

    @functools.cached_property
    def _metadata(self) -> dict[str, Any]:
        try:
            return dict(self._handle.metadata)
        except Exception:
            return {}

    def _native_mpp(self) -> float | None:
        aperio = self._metadata.get("aperio", {})
        return _valid_mpp(aperio.get("MPP")) if isinstance(aperio, dict) else None

    def _native_objective_power(self) -> float | None:
        aperio = self._metadata.get("aperio", {})
        return _valid_power(aperio.get("AppMag")) if isinstance(aperio, dict) else None

    @property
    def associated_names(self) -> list[str]:
        return sorted(str(n) for n in self._handle.associated_images)

    def _read_level0(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        region = self._handle.read_region(location=(x0, y0), size=(w, h), level=level, device="cpu")
        arr = np.asarray(region)
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., :3]
        return np.ascontiguousarray(arr)


_READERS: dict[str, type[SlideReader]] = {"openslide": OpenSlideReader, "cucim": CuCIMReader}


def open_slide(
    path: str | os.PathLike[str],
    backend: Backend | str = "auto",
    mpp_override: float | None = None,
) -> SlideReader:
    """Open a slide with the chosen backend.

    ``auto`` uses cuCIM for TIFF-family files (.svs, .tif, .tiff) when it is
    installed and can open the file, and openslide otherwise.
    """
    path = Path(path)
    if backend == "auto":
        if path.suffix.lower() in _CUCIM_EXTENSIONS and cucim_available():
            try:
                reader = CuCIMReader(path, mpp_override)
                _ = reader.dimensions  # cuCIM opened it and can read its pyramid
                return reader
            except Exception:
                pass  # openslide below gives the authoritative error
        return OpenSlideReader(path, mpp_override)
    try:
        cls = _READERS[backend]
    except KeyError:
        raise UsageError(
            f"unknown backend {backend!r}", "use --backend auto, openslide or cucim"
        ) from None
    return cls(path, mpp_override)


_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def slide_id(path: str | os.PathLike[str]) -> str:
    """A filesystem-safe slide id from a file name (``TCGA-AB 12.svs`` → ``TCGA-AB_12``)."""
    stem = Path(path).name
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    return _SAFE_ID.sub("_", stem).strip("._") or "slide"
