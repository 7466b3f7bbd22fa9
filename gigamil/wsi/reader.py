"""Whole-slide image reading over openslide and cuCIM, behind :class:`SlideReader`.

A slide is opened with :func:`open_slide` and used as a context manager::

    with open_slide("slides/s000.svs") as slide:
        level, scale = slide.level_for_mpp(0.5)
        rgb = slide.read_region(level, x, y, w, h)   # level coordinates, RGB uint8 (h, w, 3)

The interface and its lazy metadata are in :mod:`gigamil.wsi.slide`; levels,
resolution parsing and slide ids in :mod:`gigamil.wsi.metadata`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gigamil.errors import BackendUnavailableError, SlideOpenError, UsageError
from gigamil.wsi.metadata import CUCIM_EXTENSIONS, valid_mpp, valid_power
from gigamil.wsi.slide import SlideReader

__all__ = [
    "Backend",
    "OpenSlideReader",
    "CuCIMReader",
    "open_slide",
    "cucim_available",
]

Backend = Literal["auto", "openslide", "cucim"]


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
        x = valid_mpp(props.get(openslide.PROPERTY_NAME_MPP_X))
        return x

    def _native_objective_power(self) -> float | None:
        import openslide

        return valid_power(self._handle.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))

    @property
    def associated_names(self) -> list[str]:
        return sorted(self._handle.associated_images.keys())

    exact_levels = False  # cairo resamples level positions that are not integers

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._level_dims_and_downsamples()[level][2]
        x0, y0 = int(round(x * ds)), int(round(y * ds))
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
def _quiet_stderr() -> Iterator[None]:
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
        # cucim re-exports CuImage from cucim.clara without __all__; unused-ignore: cucim is optional
        from cucim import CuImage  # type: ignore[attr-defined, unused-ignore]

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
        return valid_mpp(aperio.get("MPP")) if isinstance(aperio, dict) else None

    def _native_objective_power(self) -> float | None:
        aperio = self._metadata.get("aperio", {})
        return valid_power(aperio.get("AppMag")) if isinstance(aperio, dict) else None

    @property
    def associated_names(self) -> list[str]:
        return sorted(str(n) for n in self._handle.associated_images)

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._level_dims_and_downsamples()[level][2]
        x0, y0 = int(round(x * ds)), int(round(y * ds))
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
        if path.suffix.lower() in CUCIM_EXTENSIONS and cucim_available():
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

