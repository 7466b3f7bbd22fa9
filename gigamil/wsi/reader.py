"""Whole-slide image reading behind :class:`SlideReader`: direct TIFF tiles, DICOM,
openslide and cuCIM.

A slide is opened with :func:`open_slide` and used as a context manager::

    with open_slide("slides/s000.svs") as slide:
        level, scale = slide.level_for_mpp(0.5)
        rgb = slide.read_region(level, x, y, w, h)   # level coordinates, RGB uint8 (h, w, 3)

The interface and its lazy metadata are in :mod:`gigamil.wsi.slide`; levels,
resolution parsing and slide ids in :mod:`gigamil.wsi.metadata`. ``auto`` reads
TIFF-family files tile by tile (:mod:`gigamil.wsi.tiles`), DICOM series with
wsidicom (:mod:`gigamil.wsi.dicom`) and every other format through openslide.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gigamil.errors import (
    BackendUnavailableError,
    SlideOpenError,
    UnreadableRegionError,
    UsageError,
)
from gigamil.wsi.extract_config import Backend, ExtractConfig
from gigamil.wsi.metadata import TILE_EXTENSIONS, valid_mpp, valid_power
from gigamil.wsi.slide import SlideReader
from gigamil.wsi.tile_check import TileVerifier

__all__ = [
    "Backend",
    "OpenSlideReader",
    "CuCIMReader",
    "open_slide",
    "auto_backend",
    "open_slide_for",
    "cucim_available",
]



class OpenSlideReader(SlideReader):
    backend = "openslide"

    def _open(self) -> None:
        import openslide

        if not self.path.is_file():
            raise SlideOpenError(f"{self.path.name} does not exist or is not a file")
        self._retired: list[Any] = []
        self._swap = threading.Lock()
        try:
            self._handle = openslide.OpenSlide(str(self.path))
        except Exception as exc:
            raise SlideOpenError(
                f"{self.path.name} is not a readable slide ({type(exc).__name__}: {exc})",
                "check that it is a complete whole-slide image; re-copy it if it was truncated",
            ) from exc

    def _close(self) -> None:
        self._handle.close()
        for old in self._retired:
            with contextlib.suppress(Exception):
                old.close()
        verifier = self.__dict__.get("_verifier")
        if verifier is not None:
            verifier.close()

    @functools.cached_property
    def _verifier(self) -> TileVerifier | None:
        if self.path.suffix.lower() not in TILE_EXTENSIONS:
            return None
        return TileVerifier(self.path, self._level_dims_and_downsamples())

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
        import openslide

        if self._verifier is not None:  # openslide only warns about corrupt JPEG data
            self._verifier.check(level, x, y, w, h)
        ds = self._level_dims_and_downsamples()[level][2]
        x0, y0 = int(round(x * ds)), int(round(y * ds))
        handle = self._handle
        try:
            rgba = np.asarray(handle.read_region((x0, y0), level, (w, h)))
        except openslide.OpenSlideError as exc:
            # openslide's errors are sticky: a fresh handle for the next reads. The old one
            # is closed with the slide, never while other threads may be reading through it
            with self._swap:
                if self._handle is handle:
                    self._retired.append(handle)
                    self._handle = openslide.OpenSlide(str(self.path))
            raise UnreadableRegionError(f"{self.path.name}: level {level} region ({x},{y}) "
                                        f"{w}x{h} cannot be decoded ({exc})") from exc
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

    def _level0(self, v: int, ds: float) -> int:
        """A level-0 position cuCIM maps to level position ``v``: it takes floor(v0 / ds)."""
        v0 = int(math.floor((v + 0.5) * ds))  # the middle of the range that maps to v:
        while math.floor(v0 / ds) > v:      # safe from float rounding on either side
            v0 -= 1
        while math.floor(v0 / ds) < v:
            v0 += 1
        return v0

    @functools.cached_property
    def _verifier(self) -> TileVerifier:
        """Strict checks of the tiles under a region before cuCIM decodes them: cuCIM turns
        a missing or damaged tile into garbage pixels without raising."""
        return TileVerifier(self.path, self._level_dims_and_downsamples())

    def _check_tiles(self, level: int, x: int, y: int, w: int, h: int) -> None:
        self._verifier.check(level, x, y, w, h)

    def _close(self) -> None:
        close = getattr(self._handle, "close", None)
        if close is not None:
            close()
        if "_verifier" in self.__dict__:
            self._verifier.close()

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        self._check_tiles(level, x, y, w, h)
        ds = self._level_dims_and_downsamples()[level][2]
        x0, y0 = self._level0(x, ds), self._level0(y, ds)
        region = self._handle.read_region(location=(x0, y0), size=(w, h), level=level, device="cpu")
        arr = np.asarray(region)
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., :3]
        return np.ascontiguousarray(arr)


def _readers() -> dict[str, type[SlideReader]]:
    from gigamil.wsi.tiles import TiffTileReader

    readers: dict[str, type[SlideReader]] = {
        "tiles": TiffTileReader, "openslide": OpenSlideReader, "cucim": CuCIMReader}
    try:
        from gigamil.wsi.dicom import DicomReader

        readers["wsidicom"] = DicomReader
    except ImportError:  # pragma: no cover - wsidicom is a dependency
        pass
    return readers


def auto_backend(path: Path) -> str:
    """The reader ``auto`` tries first for ``path``: ``wsidicom`` for a DICOM series
    (its folder or one of its files), ``tiles`` for the TIFF family, else ``openslide``."""
    if path.is_dir() or path.suffix.lower() == ".dcm":
        return "wsidicom"
    if path.suffix.lower() in TILE_EXTENSIONS:
        return "tiles"
    return "openslide"


def open_slide(
    path: str | os.PathLike[str],
    backend: Backend | str = "auto",
    mpp_override: float | None = None,
) -> SlideReader:
    """Open a slide with the chosen backend.

    ``auto`` reads TIFF-family files (.svs, .tif, .tiff) tile by tile with tifffile and
    imagecodecs, a DICOM series with wsidicom, and falls back to openslide for every
    other format or when the direct reader cannot open the file.
    """
    path = Path(path)
    readers = _readers()
    if backend == "auto":
        first = auto_backend(path)
        if first == "openslide" or first not in readers:
            return OpenSlideReader(path, mpp_override)
        try:
            return readers[first](path, mpp_override)
        except SlideOpenError as exc:
            if first == "wsidicom":
                raise
            try:  # openslide reads a few layouts the direct reader does not
                return OpenSlideReader(path, mpp_override)
            except SlideOpenError:
                raise exc from None
    try:
        cls = readers[backend]
    except KeyError:
        raise UsageError(
            f"unknown backend {backend!r}",
            "use --backend " + ", ".join(["auto", *readers]),
        ) from None
    return cls(path, mpp_override)


def open_slide_for(path: str | os.PathLike[str], cfg: ExtractConfig) -> SlideReader:
    """Open a slide as extraction options say: backend, mpp override, mpp from the
    objective's magnification."""
    slide = open_slide(path, cfg.backend, cfg.mpp_override)
    slide.mpp_from_magnification = cfg.mpp_from_magnification
    return slide
