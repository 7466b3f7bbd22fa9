"""Convert a slide or a flat TIFF into a tiled, pyramidal, JPEG-compressed TIFF.

The output opens in openslide, cuCIM and tifffile: tiled JPEG levels in the Aperio
layout (reduced levels marked ``subfiletype=1``), an Aperio-style description with
``MPP = …`` and TIFF resolution tags in centimetres. Associated images (label,
macro, thumbnail), which may show patient data, are never read or written, and
nothing of the source's own description (scanner, user, dates) is copied.

Sources are slides :func:`gigamil.wsi.reader.open_slide` opens and flat TIFFs
(stripped or tiled, any size), read a band of rows at a time (``pread`` for
uncompressed data, tifffile's zarr store otherwise). Memory stays at about one
tile row of the source and one of the output level: each level is written tile
row by tile row, computed with area interpolation from the coarsest source level
not coarser than it (so a flat source is decoded once per output level). The file
is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from gigamil.errors import MissingMppError, SlideError, SlideOpenError, UsageError
from gigamil.io import atomic_path
from gigamil.wsi.metadata import tiff_metadata, valid_mpp
from gigamil.wsi.reader import open_slide
from gigamil.wsi.slide import SlideReader, resize_area

__all__ = ["ConvertResult", "convert_slide", "pyramid_sizes", "DEFAULT_TILE", "DEFAULT_QUALITY",
           "DEFAULT_DOWNSAMPLE", "DOWNSAMPLES", "MAX_TOP_LEVEL"]

DEFAULT_TILE = 256  # output tile side in px (a multiple of 16, as TIFF requires)
DEFAULT_QUALITY = 90  # JPEG quality
#: Downsample between levels. 2 stores every power of two, so reading 0.5 µm/px from a
#: 0.25 µm/px scan hits a level exactly; 4 is the Aperio layout (files ~20 % smaller).
DEFAULT_DOWNSAMPLE = 2
DOWNSAMPLES = (2, 4)
#: Levels are added until the coarsest one is at most this many pixels on its long side.
MAX_TOP_LEVEL = 1024

_COLUMN_BLOCK = 8192  # slide reads are cut into blocks this wide (level px)
_TILE_RANGE = (64, 4096)


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_slide` wrote."""

    src: Path
    dst: Path
    levels: tuple[tuple[int, int], ...]  # (width, height) of each level, level 0 first
    downsample: int
    mpp: float  # level-0 µm/px recorded in the output
    mpp_source: Literal["source", "option"]  # recorded by the source, or the ``mpp`` option
    reader: str  # how the source was read: ``flat-tiff`` or ``slide/<backend>``
    tile: int
    quality: int
    bytes: int
    seconds: float


class _SlideSource:
    """A slide opened by one of our readers, read in column blocks."""

    def __init__(self, slide: SlideReader) -> None:
        self.slide = slide
        self.levels = [(lv.width, lv.height, lv.downsample) for lv in slide.levels]
        self.reader = f"slide/{slide.backend}"

    def read_rows(self, level: int, y: int, h: int) -> np.ndarray:
        w = self.levels[level][0]
        band = np.empty((h, w, 3), np.uint8)
        for x in range(0, w, _COLUMN_BLOCK):
            bw = min(_COLUMN_BLOCK, w - x)
            band[:, x:x + bw] = self.slide.read_region(level, x, y, bw, h)
        return band

    def close(self) -> None:
        self.slide.close()


class _FlatTiff:
    """The first image of a TIFF, read by bands of rows: uncompressed data with
    ``pread``, compressed strips or tiles one chunk row at a time (each decoded
    once while rows are read top to bottom)."""

    reader = "flat-tiff"

    def __init__(self, path: Path, tif: Any) -> None:
        series = tif.series[0]
        page, axes, dtype = series.pages[0], str(series.axes), np.dtype(series.dtype)
        shape = tuple(int(n) for n in series.shape)
        while len(shape) > 2 and shape[0] == 1 and axes[0] not in "YX":
            shape, axes = shape[1:], axes[1:]  # singleton leading axes (Z=1, T=1, …)
        samples = 1 if axes == "YX" else shape[2] if axes == "YXS" else 0
        if samples not in (1, 2, 3, 4) or dtype != np.uint8:
            raise SlideOpenError(
                f"{path.name} holds {dtype} data of shape {shape} ({axes}), "
                "not one 8-bit grey or RGB image",
                "save the image as one 2-D 8-bit RGB TIFF (interleaved), e.g. with vips",
            )
        self.path, self._tif, self.samples, self._axes = path, tif, samples, axes
        self.height, self.width = shape[0], shape[1]
        self.levels = [(self.width, self.height, 1.0)]
        self._cache: dict[int, np.ndarray] = {}
        self._fd: int | None = None
        if page.is_contiguous and int(page.compression) == 1 and len(series.pages) == 1:
            self._offset = int(page.dataoffsets[0])
            self._fd = os.open(path, os.O_RDONLY)
        else:
            import zarr

            self._zarr = zarr.open_array(series.aszarr(), mode="r")
            self._chunk_h = int(self._zarr.chunks[-3 if axes == "YXS" else -2])

    def read_rows(self, level: int, y: int, h: int) -> np.ndarray:
        row = self.width * self.samples
        if self._fd is not None:
            data = os.pread(self._fd, row * h, self._offset + row * y)
            if len(data) != row * h:
                raise SlideOpenError(f"{self.path.name} is truncated at row {y}",
                                     "copy it again from the source")
            return _to_rgb(np.frombuffer(data, np.uint8).reshape(h, self.width, self.samples))
        ch = self._chunk_h
        first, last = y // ch, (y + h - 1) // ch
        for key in [k for k in self._cache if k < first]:
            del self._cache[key]  # rows are read top to bottom: earlier chunk rows are done
        for i in range(first, last + 1):
            if i not in self._cache:
                y0, y1 = i * ch, min(self.height, (i + 1) * ch)
                index = (..., slice(y0, y1), slice(None)) + ((slice(None),) if self._axes ==
                                                              "YXS" else ())
                block = np.asarray(self._zarr[index]).reshape(y1 - y0, self.width, self.samples)
                self._cache[i] = block
        band = np.concatenate([self._cache[i] for i in range(first, last + 1)], axis=0)
        return _to_rgb(band[y - first * ch:y - first * ch + h])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._cache.clear()
        self._tif.close()


def _to_rgb(raw: np.ndarray) -> np.ndarray:
    """(h, w, s) uint8 with s = 1…4 → RGB; alpha is composited onto white."""
    s = raw.shape[2]
    if s == 3:
        return np.ascontiguousarray(raw)
    color = np.repeat(raw[..., :1], 3, axis=2) if s <= 2 else raw[..., :3]
    if s in (2, 4):
        alpha = raw[..., -1:].astype(np.uint32)
        color = ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(color)


def _open_source(
    src: Path, backend: str, mpp: float | None
) -> tuple[_SlideSource | _FlatTiff, float, Literal["source", "option"], float | None]:
    """The source, its level-0 mpp, where that came from, and its objective power.

    With ``auto``, a slide our readers open with a pyramid is read through them; a
    TIFF with one level (openslide may not open it at all, e.g. stripped) directly.
    """
    tif = _first_tiff_image(src) if backend == "auto" else None
    slide: SlideReader | None = None
    flat: _FlatTiff | None = None
    try:
        try:
            slide = open_slide(src, backend, mpp_override=mpp)
        except SlideError:
            if tif is None:
                raise
        if tif is not None and (slide is None or len(slide.describe()["levels"]) == 1):
            try:
                flat = _FlatTiff(src, tif)
            except SlideError:
                if slide is None:
                    raise  # not a plain 2-D image; else the slide reader reads it
        recorded, power = tiff_metadata(src) if flat is not None else (None, None)
        if slide is not None:
            with contextlib.suppress(MissingMppError):
                if slide.mpp and slide.mpp_source != "override":
                    recorded = recorded or slide.mpp
            power = power or slide.objective_power
        if recorded is None and mpp is None:
            raise _missing_mpp(src)
    except BaseException:
        for handle in (flat or tif, slide):
            if handle is not None:
                handle.close()
        raise
    unused = slide if flat is not None else tif  # the reader that is not needed
    if unused is not None:
        unused.close()
    source = flat if flat is not None else _SlideSource(cast(SlideReader, slide))
    return source, cast(float, recorded or mpp), "source" if recorded else "option", power


def _missing_mpp(src: Path) -> MissingMppError:
    return MissingMppError(f"{src.name} does not record its resolution (µm per pixel)",
                           "pass --mpp MPP (e.g. 0.25 for a 40x scan, 0.5 for 20x)")


def _first_tiff_image(path: Path) -> Any:
    """An open ``tifffile.TiffFile`` if ``path`` is a TIFF with an image, else None."""
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception:
        return None  # not a TIFF: the slide readers decide
    if not tif.series:
        tif.close()
        return None
    return tif


# ---- the pyramid ----------------------------------------------------------------


def pyramid_sizes(
    width: int, height: int, downsample: int = DEFAULT_DOWNSAMPLE, top: int = MAX_TOP_LEVEL
) -> list[tuple[int, int]]:
    """(width, height) of each level, ``ceil(size / downsample**k)``, until long side ≤ top."""
    sizes = [(width, height)]
    factor = downsample
    while max(sizes[-1]) > top:
        sizes.append((max(1, math.ceil(width / factor)), max(1, math.ceil(height / factor))))
        factor *= downsample
    return sizes


def _pick_source_level(levels: list[tuple[int, int, float]], factor: float) -> tuple[int, float]:
    """The coarsest source level not coarser than ``factor``, and the shrink from it."""
    best = 0
    for i, (_, _, ds) in enumerate(levels):
        if ds <= factor * (1 + 1e-3):
            best = i
    f = factor / levels[best][2]
    if abs(f - round(f)) < 1e-3:
        f = float(round(f))  # integer factors give exact box means
    return best, max(f, 1.0)


def _level_rows(
    source: _SlideSource | _FlatTiff, level_w: int, level_h: int, factor: float, tile: int
) -> Iterator[np.ndarray]:
    """The output level as tile rows: pixel (x, y) is the mean of source pixels
    [x·f, (x+1)·f) × [y·f, (y+1)·f) (edges replicated), read in bands of ~one tile row."""
    import cv2

    lvl, f = _pick_source_level(source.levels, factor)
    src_w, src_h, _ = source.levels[lvl]
    need_w = math.ceil(level_w * f)
    step = max(1, int(tile // f))  # output rows per source band
    for ty in range(0, level_h, tile):
        rows = min(tile, level_h - ty)
        out = np.empty((rows, level_w, 3), np.uint8)
        for oy in range(ty, ty + rows, step):
            oy1 = min(ty + rows, oy + step)
            sy0 = min(src_h - 1, int(math.floor(oy * f)))
            need_h = max(1, math.ceil(oy1 * f) - sy0)
            sy1 = min(src_h, sy0 + need_h)
            band = source.read_rows(lvl, sy0, sy1 - sy0)
            if band.shape[1] > need_w:
                band = band[:, :need_w]
            pad_b, pad_r = need_h - band.shape[0], need_w - band.shape[1]
            if pad_b > 0 or pad_r > 0:
                band = cv2.copyMakeBorder(band, 0, pad_b, 0, pad_r, cv2.BORDER_REPLICATE)
            out[oy - ty:oy1 - ty] = resize_area(band, (level_w, oy1 - oy))
        yield out


def _encode(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs  # without ``out`` jpeg8_encode returns bytes (stub: bytes | bytearray)

    return cast(bytes, imagecodecs.jpeg8_encode(
        tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)))


def _tiles(
    rows: Iterator[np.ndarray], level_w: int, tile: int, quality: int,
    pool: cf.ThreadPoolExecutor, done: Callable[[], None],
) -> Iterator[bytes]:
    """JPEG tiles of each row, left to right; edge tiles padded with white."""
    for row in rows:
        tiles = []
        for tx in range(0, level_w, tile):
            part = row[:, tx:tx + tile]
            tiles.append(np.full((tile, tile, 3), 255, np.uint8))
            tiles[-1][:part.shape[0], :part.shape[1]] = part
        encoded = list(pool.map(_encode, tiles, [quality] * len(tiles)))
        done()  # before yielding: tifffile stops pulling once it has the last tile
        yield from encoded


def _description(
    sizes: list[tuple[int, int]], level: int, tile: int, quality: int, mpp: float,
    power: float | None,
) -> str:
    """An Aperio-style ImageDescription: openslide and cuCIM read ``MPP`` from it."""
    from gigamil.versions import gigamil_version

    (w0, h0), (w, h) = sizes[0], sizes[level]
    size = f"[0,0 {w0}x{h0}]" if level == 0 else f"-> {w}x{h} -"
    mag = "" if power is None else f"|AppMag = {power:g}"
    return (f"Aperio Image Library (gigamil {gigamil_version()} convert) \n{w0}x{h0} {size} "
            f"({tile}x{tile}) JPEG/RGB Q={quality}|MPP = {mpp:.10g}{mag}")


def _check_options(src: Path, dst: Path, mpp: float | None, tile: int, quality: int,
                   downsample: int, overwrite: bool) -> None:
    lo, hi = _TILE_RANGE
    problems = [
        (not src.exists(), f"{src} does not exist", "check the path of the slide to convert"),
        (not src.is_file(), f"{src} is not a file", "give one slide file (for MIRAX the .mrxs)"),
        (dst.is_dir(), f"{dst} is a directory", "give the output file, e.g. out/slide.tif"),
        (dst.exists() and src.resolve() == dst.resolve(), f"{dst} is the source itself",
         "write the converted slide to a new file"),
        (dst.exists() and not overwrite, f"{dst} already exists",
         "pass --overwrite to replace it, or choose another output name"),
        (dst.suffix.lower() not in (".tif", ".tiff", ".svs"), f"{dst.name} is not a TIFF name",
         "name the output .tif (or .tiff, .svs)"),
        (mpp is not None and valid_mpp(mpp) is None, f"--mpp {mpp} is not a plausible "
         "resolution", "give µm per pixel of level 0, e.g. 0.25 for 40x or 0.5 for 20x"),
        (not (lo <= tile <= hi and tile % 16 == 0), f"--tile {tile} is not a TIFF tile size",
         f"use a multiple of 16 between {lo} and {hi}, e.g. 256 or 512"),
        (not 1 <= quality <= 100, f"--quality {quality} is out of range", "use 1–100, e.g. 90"),
        (downsample not in DOWNSAMPLES, f"--downsample {downsample} is not supported",
         "use 2 or 4 (4 is the Aperio layout)"),
    ]
    for bad, message, hint in problems:
        if bad:
            raise UsageError(message, hint)


def convert_slide(
    src: Path, dst: Path, *, mpp: float | None = None, tile: int = DEFAULT_TILE,
    quality: int = DEFAULT_QUALITY, backend: str = "auto", downsample: int = DEFAULT_DOWNSAMPLE,
    overwrite: bool = False, on_progress: Callable[[int, int], None] | None = None,
) -> ConvertResult:
    """Write ``src`` as a tiled pyramidal JPEG TIFF at ``dst``; return what was written.

    ``mpp`` (level-0 µm/px) is used only when the source records none. ``backend``
    picks the slide reader (``auto`` reads one-level TIFFs directly).
    ``on_progress(done, total)`` follows tile rows over all levels. Raises
    :class:`UsageError` (bad options, existing ``dst`` without ``overwrite``),
    :class:`MissingMppError` (no resolution, no ``mpp``) or another :class:`SlideError`.
    """
    import tifffile

    src, dst = Path(src), Path(dst)
    _check_options(src, dst, mpp, tile, quality, downsample, overwrite)
    start = time.perf_counter()
    source, level0_mpp, mpp_source, power = _open_source(src, backend, mpp)
    try:
        width, height, _ = source.levels[0]
        sizes = pyramid_sizes(width, height, downsample)
        total = sum(math.ceil(h / tile) for _, h in sizes)
        count, report = iter(range(1, total + 1)), on_progress or (lambda done, total: None)
        report(0, total)

        def row_done() -> None:
            report(next(count), total)

        bigtiff = sum(w * h for w, h in sizes) * 3 > 2**31  # raw size: JPEG is far smaller
        workers = max(1, min(4, os.cpu_count() or 1))
        with atomic_path(dst) as tmp, cf.ThreadPoolExecutor(workers) as pool, \
                tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            for k, (w, h) in enumerate(sizes):
                rows = _level_rows(source, w, h, float(downsample**k), tile)
                res = 1e4 / (level0_mpp * downsample**k)  # pixels per centimetre
                tif.write(
                    _tiles(rows, w, tile, quality, pool, row_done), shape=(h, w, 3),
                    dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression="jpeg",
                    resolution=(res, res), resolutionunit="CENTIMETER",
                    description=_description(sizes, k, tile, quality, level0_mpp, power),
                    subfiletype=0 if k == 0 else 1, software="gigamil", metadata=None,
                )
    finally:
        source.close()
    return ConvertResult(
        src=src, dst=dst, levels=tuple(sizes), downsample=downsample, mpp=level0_mpp,
        mpp_source=mpp_source, reader=source.reader, tile=tile, quality=quality,
        bytes=dst.stat().st_size, seconds=time.perf_counter() - start,
    )
