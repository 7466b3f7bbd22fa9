"""Direct tile reading for the TIFF family (Aperio SVS, Hamamatsu NDPI, OME-TIFF,
generic tiled TIFF, …).

:class:`TiffTileReader` (backend ``tiles``) finds the pyramid levels among a
TIFF's pages with tifffile, reads the compressed tiles (or strips) that cover a
region straight from the file with ``os.pread`` (safe from many threads at
once) and decodes them with imagecodecs (libjpeg-turbo, JPEG 2000, LZW, …)
through tifffile. No compositing library sits between the file and the pixels,
so a region is exactly the level's own pixels on every level, fractional
downsamples included, and reading runs at the speed of decoding.

A tile that is missing (offset or length 0) or that the decoder rejects raises
:class:`~gigamil.errors.UnreadableRegionError` for the region; callers then
read patch by patch and leave out only the patches over that tile. Decoded tiles
are kept in a small LRU cache (bounded in bytes) so that neighbouring regions
that share a tile decode it once. Label, macro and thumbnail pages are listed by
name and never decoded.

NDPI levels are single JPEG strips with restart markers; tifffile splits them at the
offsets in ``McuStarts`` into tiles one MCU row high, each decoded on its own behind
the level's JPEG header (the tile's trailing restart marker replaced by an end of
image). The macro and map images (``SourceLens`` -1 and -2) and other focal planes
are never read.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gigamil.errors import SlideOpenError, UnreadableRegionError
from gigamil.wsi.jpeg import strict_jpeg_decode
from gigamil.wsi.metadata import valid_mpp
from gigamil.wsi.slide import SlideReader

__all__ = ["TiffTileReader", "TiffLevel", "pyramid_levels", "FLAT_TIFF_MAX_SEGMENT_PX"]

#: A level-0 page without reduced levels is read only if one decoded segment (tile or
#: strip) stays under this many pixels; a larger one needs ``gigamil convert``.
FLAT_TIFF_MAX_SEGMENT_PX = 64 * 2**20
#: Decoded tiles kept per open slide, in bytes.
TILE_CACHE_BYTES = 64 * 2**20
_ASSOCIATED = re.compile(r"\b(label|macro|thumbnail|overview)\b", re.IGNORECASE)


@dataclass(frozen=True)
class TiffLevel:
    """One pyramid level: its page and the layout of its segments (tiles or strips)."""

    page: Any  # tifffile.TiffPage
    width: int
    height: int
    seg_w: int  # tile (or strip) width
    seg_h: int  # tile height (or rows per strip)
    across: int  # segments per row
    jpeg: Callable[..., np.ndarray] | None = None  # direct decoder of JPEG tiles (data, out=)

    @classmethod
    def of(cls, page: Any) -> TiffLevel:
        if page.is_tiled:
            tw, th = int(page.tilewidth), int(page.tilelength)
        else:
            tw, th = int(page.imagewidth), int(page.rowsperstrip or page.imagelength)
            th = min(th, int(page.imagelength))
        w = int(page.imagewidth)
        return cls(page, w, int(page.imagelength), tw, th, -(-w // tw), _jpeg_decoder(page))


def _jpeg_decoder(page: Any) -> Callable[..., np.ndarray] | None:
    """A strict JPEG decoder for the tiles of an 8-bit RGB/YCbCr JPEG page, called as
    ``decode(data, out=None)``.

    YCbCr tiles (nearly all) go through simplejpeg (libjpeg-turbo) with ``strict``: data
    that libjpeg only warns about ("Corrupt JPEG data: … extraneous bytes") raises, so a
    damaged tile is never decoded to garbage. The page's shared tables are spliced into
    each tile. RGB-coded tiles (rare) go through imagecodecs, which is not strict.
    """
    import imagecodecs

    if (int(page.compression) != 7 or int(page.samplesperpixel) != 3
            or int(page.photometric) not in (2, 6)):
        return None
    if getattr(page, "jpegheader", None) is not None:  # NDPI: an MCU-row tile of a strip
        return functools.partial(_ndpi_decode, header=page.jpegheader)
    if not page.is_tiled:
        return None
    tables = page.jpegtables
    if int(page.photometric) == 2:  # RGB-coded JPEG (Aperio's "RGB" tiles): no YCbCr step
        return functools.partial(imagecodecs.jpeg8_decode, tables=tables, colorspace=2,
                                 outcolorspace=2)
    return functools.partial(strict_jpeg_decode, tables=tables)


def _ndpi_decode(data: bytes, header: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """Strictly decode one NDPI restart interval: the level's JPEG header (its frame
    resized to one interval by tifffile), the interval without its trailing restart
    marker, and an end of image."""
    if len(data) >= 2 and data[-2] == 0xFF and (0xD0 <= data[-1] <= 0xD7 or data[-1] == 0xD9):
        data = data[:-2]
    return strict_jpeg_decode(header + data + b"\xff\xd9", out=out)


def _ndpi_levels(tif: Any) -> tuple[list[TiffLevel], list[str]]:
    """NDPI: pages with a positive ``SourceLens`` (objective power) in the focal plane 0,
    finest first; ``SourceLens`` -1 is the macro image and -2 the map."""
    levels, names = [], []
    for page in tif.pages:
        lens = page.tags.valueof(65421)
        if lens is None or float(lens) <= 0:
            names.append({-1: "macro", -2: "map"}.get(round(float(lens or 0)), "thumbnail"))
        elif int(page.tags.valueof(65424, 0) or 0) == 0 and _readable_rgb(page):
            levels.append(TiffLevel.of(page))
    levels.sort(key=lambda lv: -lv.width)
    return levels, sorted(set(names))


def _philips_mpp(xml: str) -> float | None:
    """Level 0's µm/px from a Philips ``DPUfsImport`` description: the WSI image's
    ``DICOM_PIXEL_SPACING`` (row and column spacing in mm, quoted)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
        for image in root.iter("DataObject"):
            attrs = {a.get("Name"): a for a in image.findall("Attribute")}
            kind = attrs.get("PIM_DP_IMAGE_TYPE")
            spacing = attrs.get("DICOM_PIXEL_SPACING")
            if kind is not None and kind.text == "WSI" and spacing is not None:
                values = (spacing.text or "").replace('"', " ").split()
                return valid_mpp(float(values[-1]) * 1000.0)
    except (ET.ParseError, ValueError, IndexError):
        return None
    return None


def _readable_rgb(page: Any) -> bool:
    """An 8-bit RGB(A)/grey image page stored chunky, whose codec tifffile can decode."""
    try:
        if int(page.compression) == 33003:
            return False  # Aperio JPEG 2000 in YCbCr: tifffile leaves it unconverted
        return (
            page.dtype is not None and np.dtype(page.dtype) == np.uint8
            and int(page.samplesperpixel) in (1, 3, 4)
            and (int(page.samplesperpixel) == 1 or int(page.planarconfig) == 1)
            and int(page.imagedepth) == 1 and len(page.dataoffsets) > 0
        )
    except Exception:
        return False


def pyramid_levels(tif: Any) -> tuple[list[TiffLevel], list[str]]:
    """The pyramid levels of an open ``tifffile.TiffFile`` (finest first) and the names
    of its associated images (label, macro, thumbnail), whose pixels are never read.

    OME-TIFF: the first image and its sub-resolutions. Anything else: the first page,
    then every later tiled page whose size is a reduction of it with the same aspect.
    """
    if tif.is_ndpi:
        return _ndpi_levels(tif)
    if tif.is_philips and tif.series and tif.series[0].kind == "philips":
        # tifffile trims the padding of the reduced levels (their stored size is rounded
        # up to whole tiles) to level 0's size over the downsample, as openslide does
        pages = [lv.keyframe for lv in tif.series[0].levels]
        others = [s.name.lower() for s in tif.series[1:] if s.name in ("Label", "Macro")]
        return [TiffLevel.of(p) for p in pages if _readable_rgb(p)], sorted(set(others))
    if tif.is_ome and tif.series:
        series = tif.series[0]
        if any(ax not in "YXS" and n > 1 for ax, n in zip(series.axes, series.shape)):
            return [], []  # channels (or z, t) as separate planes: not an RGB slide
        pages = [lv.keyframe for lv in series.levels]
        others = [s.name or f"image {i}" for i, s in enumerate(tif.series[1:], 1)]
        return [TiffLevel.of(p) for p in pages if _readable_rgb(p)], others
    pages = list(tif.pages)
    if not pages:
        return [], []
    base = pages[0]
    levels = [TiffLevel.of(base)] if _readable_rgb(base) else []
    names: list[str] = []
    w0, h0 = int(base.imagewidth), int(base.imagelength)
    for page in pages[1:]:
        desc = str(getattr(page, "description", "") or "")
        w, h = int(page.imagewidth), int(page.imagelength)
        match = _ASSOCIATED.search(desc)
        reduced = (page.is_tiled and _readable_rgb(page) and levels
                   and w < levels[-1].width and h < levels[-1].height
                   and abs(w0 / w - h0 / h) <= 0.02 * (w0 / w) + 2.0 / min(w, h))
        if reduced and not match:
            levels.append(TiffLevel.of(page))
        else:
            names.append(match.group(1).lower() if match else "thumbnail")
    return levels, sorted(set(names))


class TiffTileReader(SlideReader):
    """TIFF-family slides read tile by tile with tifffile + imagecodecs."""

    backend = "tiles"
    exact_levels = True

    def _open(self) -> None:
        import tifffile

        if not self.path.is_file():
            raise SlideOpenError(f"{self.path.name} does not exist or is not a file")
        try:
            tif = tifffile.TiffFile(self.path)
        except Exception as exc:
            raise SlideOpenError(
                f"{self.path.name} is not a readable TIFF ({type(exc).__name__}: {exc})",
                "check that it is a complete slide file; re-copy it if it was truncated",
            ) from exc
        try:
            levels, names = pyramid_levels(tif)
            if not levels:
                raise SlideOpenError(
                    f"{self.path.name} has no 8-bit RGB image that tifffile can read",
                    "try --backend openslide, or convert it with `gigamil convert`")
            base = levels[0]
            if len(levels) == 1 and base.seg_w * base.seg_h > FLAT_TIFF_MAX_SEGMENT_PX:
                raise SlideOpenError(
                    f"{self.path.name} is a flat TIFF ({base.width}x{base.height} px, no "
                    f"pyramid) stored in {base.seg_w}x{base.seg_h} px pieces, too large to "
                    "read with bounded memory",
                    f"make a tiled pyramid first: gigamil convert {self.path.name} "
                    f"{self.path.stem}_pyramid.tif")
        except BaseException:
            tif.close()
            raise
        self._handle = tif
        self._levels = levels
        self._names = names
        self._fd = os.open(self.path, os.O_RDONLY)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self._scratch = threading.local()

    def _close(self) -> None:
        os.close(self._fd)
        self._handle.close()
        self._cache.clear()

    def _forget_tiles(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0

    def _level_dims_and_downsamples(self) -> list[tuple[int, int, float]]:
        w0, h0 = self._levels[0].width, self._levels[0].height
        # the mean of both axes' ratios, as openslide reports downsamples
        return [(lv.width, lv.height, 1.0 if i == 0 else (w0 / lv.width + h0 / lv.height) / 2)
                for i, lv in enumerate(self._levels)]

    def _native_mpp(self) -> float | None:
        if self._handle.is_philips:
            return _philips_mpp(self._handle.philips_metadata or "")
        if not self._handle.is_ome:
            return None  # resolution tags and Aperio's description: SlideReader._tiff_meta
        try:
            import xml.etree.ElementTree as ET

            root = ET.fromstring(self._handle.ome_metadata or "")
            for el in root.iter():
                if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
                    unit = el.attrib.get("PhysicalSizeXUnit", "µm")
                    factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
                    if factor is not None:
                        return valid_mpp(float(el.attrib["PhysicalSizeX"]) * factor)
        except Exception:
            return None
        return None

    def _native_objective_power(self) -> float | None:
        return None  # from the Aperio description: SlideReader._tiff_meta

    @property
    def associated_names(self) -> list[str]:
        return list(self._names)

    @functools.cached_property
    def format(self) -> str:
        tif = self._handle
        for kind in ("ome", "svs", "philips", "ndpi", "scn", "bif", "qpi"):
            if getattr(tif, f"is_{kind}", False):
                return {"ome": "ome-tiff", "svs": "aperio"}.get(kind, kind)
        return "tiff" if len(self._levels) > 1 else "tiff (no pyramid)"

    # ---- pixels ----------------------------------------------------------------
    def _segment(self, level: int, index: int, scratch: bool = False) -> np.ndarray:
        """Decoded segment ``index`` of ``level`` as (seg_h, seg_w, 3) uint8 (cached).

        ``scratch``: the caller copies the tile out at once and no other region needs
        it (it lies inside the region): decode into this thread's reused buffer, uncached.
        """
        key = (level, index)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        lv = self._levels[level]
        if scratch and lv.jpeg is not None:
            return self._decode_into_scratch(lv, level, index)
        page = lv.page
        offset, length = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if offset <= 0 or length <= 0:  # a sparse tile: background, as openslide draws it
            return np.full((lv.seg_h, lv.seg_w, 3), 255, np.uint8)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise UnreadableRegionError(f"tile {index} of level {level} is cut short "
                                        "(the file is truncated)")
        try:
            if lv.jpeg is not None:  # the common case, without tifffile's per-call overhead
                decoded = lv.jpeg(data)[None]
                if decoded.shape[1:3] != (lv.seg_h, lv.seg_w) and page.is_tiled:
                    raise ValueError(f"tile decodes to {decoded.shape[2]}x{decoded.shape[1]}")
            else:
                decoded = page.decode(data, index, jpegtables=page.jpegtables)[0]
        except Exception as exc:
            raise UnreadableRegionError(
                f"tile {index} of level {level} cannot be decoded ({type(exc).__name__})"
            ) from exc
        if decoded is None:
            raise UnreadableRegionError(f"tile {index} of level {level} cannot be decoded")
        seg = np.asarray(decoded)[0]  # (h, w, samples)
        seg = np.repeat(seg, 3, axis=2) if seg.shape[2] == 1 else seg[..., :3]
        with self._lock:
            if key not in self._cache:
                self._cache[key] = seg
                self._cache_bytes += seg.nbytes
                while self._cache_bytes > TILE_CACHE_BYTES and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= old.nbytes
        return seg

    def _decode_into_scratch(self, lv: TiffLevel, level: int, index: int) -> np.ndarray:
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.shape != (lv.seg_h, lv.seg_w, 3):
            buf = self._scratch.buf = np.empty((lv.seg_h, lv.seg_w, 3), np.uint8)
        page = lv.page
        offset, length = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if offset <= 0 or length <= 0:  # a sparse tile: background, as openslide draws it
            buf[:] = 255
            return buf
        data = os.pread(self._fd, length, offset)
        try:
            if len(data) != length:
                raise ValueError("the file is truncated")
            assert lv.jpeg is not None
            lv.jpeg(data, out=buf)
        except Exception as exc:
            raise UnreadableRegionError(
                f"tile {index} of level {level} cannot be decoded ({type(exc).__name__})"
            ) from exc
        return buf

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        lv = self._levels[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lv.width), min(y + h, lv.height)
        inside = (x0, y0, x1, y1) == (x, y, x + w, y + h)
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        bad: list[str] = []
        for ty in range(y0 // lv.seg_h, (y1 - 1) // lv.seg_h + 1):
            for tx in range(x0 // lv.seg_w, (x1 - 1) // lv.seg_w + 1):
                sx, sy = tx * lv.seg_w, ty * lv.seg_h
                inner = (sx >= x and sy >= y and sx + lv.seg_w <= x + w
                         and sy + lv.seg_h <= y + h)
                try:
                    seg = self._segment(level, ty * lv.across + tx, scratch=inner)
                except UnreadableRegionError as exc:
                    bad.append(exc.message)
                    continue
                ax0, ay0 = max(x0, sx), max(y0, sy)
                ax1 = min(x1, sx + lv.seg_w, sx + seg.shape[1])
                ay1 = min(y1, sy + lv.seg_h, sy + seg.shape[0])
                if ax1 > ax0 and ay1 > ay0:
                    out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = seg[ay0 - sy : ay1 - sy,
                                                                    ax0 - sx : ax1 - sx]
        if bad:
            raise UnreadableRegionError(f"{self.path.name}: {bad[0]}"
                                        + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        return out
