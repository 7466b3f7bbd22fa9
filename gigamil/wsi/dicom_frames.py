"""Direct frame access for DICOM pyramid levels that allow it.

wsidicom finds each frame of a level (its Basic or Extended Offset Table, or a scan of
the encapsulated items) once; :class:`FrameTable` then reads frame (tx, ty) straight
from the file with ``os.pread``, lock-free and without wsidicom's per-frame lookups,
caches and stream seeks. That holds for the common layout: one file per level, fully
tiled (``TILED_FULL``), one focal plane and optical path, frames in row-major order.
Anything else (sparse tiling, several files or planes) returns no table and is read
through wsidicom as before. A table is checked against wsidicom's own bytes for its
first and last frame before it is used.
"""

from __future__ import annotations

import os
import threading
from typing import Any

__all__ = ["FrameTable", "frame_table"]


class FrameTable:
    """(position, length) of every frame of one level in one file, row-major."""

    def __init__(self, path: str, frames: list[tuple[int, int]], across: int) -> None:
        self.path = path
        self.frames = frames
        self.across = across
        self._fd = -1
        self._lock = threading.Lock()

    def _descriptor(self) -> int:
        if self._fd < 0:
            with self._lock:
                if self._fd < 0:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, tx: int, ty: int) -> bytes:
        """The encoded frame (tx, ty); raises ``OSError`` if the file is cut short there."""
        pos, length = self.frames[ty * self.across + tx]
        data = os.pread(self._descriptor(), length, pos)
        if len(data) != length:
            raise OSError(f"frame ({tx},{ty}) is cut short (the file is truncated)")
        return data

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def frame_table(wsi: Any, level: Any) -> FrameTable | None:
    """A :class:`FrameTable` for a wsidicom pyramid level, or None where its layout needs
    wsidicom (or the library's internals are not as expected)."""
    try:
        image_data = level.default_instance.image_data
        readers = list(getattr(image_data, "_readers", []))
        if (len(readers) != 1 or type(image_data.tiles).__name__ != "FullTileIndex"
                or len(image_data.focal_planes) != 1 or len(image_data.optical_paths) != 1):
            return None
        reader = readers[0]
        across, down = int(image_data.tiled_size.width), int(image_data.tiled_size.height)
        frames = [(int(p), int(n)) for p, n in reader.frame_index]
        if reader.filepath is None or int(reader.frame_offset) != 0 or len(frames) != across * down:
            return None
        table = FrameTable(str(reader.filepath), frames, across)
        for tx, ty in ((0, 0), (across - 1, down - 1)):
            expected = wsi.read_encoded_tile(int(level.level), (tx, ty),
                                             crop_to_image_boundary=False)
            if table.read(tx, ty) != expected:
                table.close()
                return None
        return table
    except Exception:
        return None
