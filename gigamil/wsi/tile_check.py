"""Checking a TIFF's tiles before a backend that does not report corrupt data reads them.

cuCIM decodes a damaged tile to garbage without raising, and openslide only warns;
:class:`TileVerifier` decodes each tile under a region strictly once (JPEG with
:func:`gigamil.wsi.jpeg.strict_jpeg_check`, at 1/8 scale) so that those backends leave
out exactly the patches the ``tiles`` backend leaves out.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from gigamil.errors import UnreadableRegionError
from gigamil.wsi.jpeg import strict_jpeg_check, strict_jpeg_decode
from gigamil.wsi.tiles import TiffLevel, pyramid_levels

__all__ = ["TileVerifier"]


class TileVerifier:
    """Checks the tiles under a region by a strict decode, for backends that decode a
    damaged tile to garbage without a word (cuCIM; openslide warns and goes on).

    Each tile is checked once (the result is kept); a sparse tile (no data) is fine.
    A region over a tile that fails raises :class:`UnreadableRegionError`, exactly
    where the ``tiles`` backend would.
    """

    def __init__(self, path: os.PathLike[str] | str, dims: list[tuple[int, int, float]]
                 ) -> None:
        import tifffile

        self.path = os.fspath(path)
        self.levels: dict[int, TiffLevel] = {}
        self._tif: Any = None
        self._fd = -1
        try:
            self._tif = tifffile.TiffFile(self.path)
            levels, _ = pyramid_levels(self._tif)
        except Exception:  # not a TIFF tifffile reads: nothing to check
            levels = []
        self.levels = {i: lv for i, lv in enumerate(levels[: len(dims)])
                       if (lv.width, lv.height) == dims[i][:2]}
        if self.levels:
            self._fd = os.open(self.path, os.O_RDONLY)
        self._seen: dict[tuple[int, int], bool] = {}
        self._lock = threading.Lock()

    def _ok(self, level: int, lv: TiffLevel, index: int) -> bool:
        key = (level, index)
        with self._lock:
            known = self._seen.get(key)
        if known is not None:
            return known
        page = lv.page
        off, n = int(page.dataoffsets[index]), int(page.databytecounts[index])
        ok = True
        if off > 0 and n > 0:
            data = os.pread(self._fd, n, off)
            try:
                if len(data) != n:
                    raise ValueError("truncated")
                strict = getattr(lv.jpeg, "func", None) is strict_jpeg_decode
                if strict:  # the same strict decode, at 1/8 scale
                    strict_jpeg_check(data, lv.jpeg.keywords.get("tables"))  # type: ignore[union-attr]
                elif lv.jpeg is not None:
                    lv.jpeg(data)
                else:
                    page.decode(data, index, jpegtables=page.jpegtables)
            except Exception:
                ok = False
        with self._lock:
            self._seen[key] = ok
        return ok

    def check(self, level: int, x: int, y: int, w: int, h: int) -> None:
        lv = self.levels.get(level)
        if lv is None:
            return
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lv.width), min(y + h, lv.height)
        for ty in range(y0 // lv.seg_h, (y1 - 1) // lv.seg_h + 1):
            for tx in range(x0 // lv.seg_w, (x1 - 1) // lv.seg_w + 1):
                if not self._ok(level, lv, ty * lv.across + tx):
                    raise UnreadableRegionError(
                        f"{os.path.basename(self.path)}: tile {ty * lv.across + tx} of level "
                        f"{level} cannot be decoded")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tif is not None:
            self._tif.close()
