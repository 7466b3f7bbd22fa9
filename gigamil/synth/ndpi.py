"""Synthetic Hamamatsu NDPI slides, written in NDPI's own TIFF layout, for tests and
benchmarks.

An NDPI file is a classic little-endian TIFF whose IFDs end with a 64-bit next-IFD
offset followed by the high 32 bits of every entry's value; each pyramid level (2×
steps) is one JPEG strip with restart markers every few MCUs, and the private tag
``McuStarts`` (65426) lists where each restart interval begins, so a reader can
decode one interval (an MCU-row-high tile) at a time. Levels carry ``SourceLens``
(65421): the objective power, or -1 for the macro image. The macro image here holds
made-up "PHI" text, to check that it never reaches an output.

Each level is encoded in bands (bounded memory) with the same quality and restart
interval; the bands' entropy-coded intervals are joined with renumbered restart
markers into one JPEG, byte for byte what one encoder pass writes.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
from pathlib import Path

import numpy as np

from gigamil.io import atomic_path
from gigamil.synth.model import SynthConfig, SyntheticSlideModel, pyramid_depth

__all__ = ["write_ndpi"]

#: Hamamatsu's private tags.
NDPI_FORMAT_FLAG, SOURCE_LENS, X_OFFSET, Y_OFFSET, FOCAL_PLANE, MCU_STARTS = (
    65420, 65421, 65422, 65423, 65424, 65426)
_SUBSAMPLING = "4:2:2"  # as Hamamatsu scanners write: 16×8 px MCUs
_MCU_W, _MCU_H = 16, 8
_BAND_ROWS = 64  # MCU rows encoded per band


def _segments(img: np.ndarray, quality: int, interval: int) -> tuple[bytes, list[bytes]]:
    """(header up to and including SOS, entropy-coded restart intervals without their
    markers) of ``img`` encoded with a restart marker every ``interval`` MCUs."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=_SUBSAMPLING,
                              restart_marker_blocks=interval)
    data = buf.getvalue()
    i = 2
    while True:  # find the end of the SOS header
        marker, length = struct.unpack(">HH", data[i:i + 4])
        i += 2 + length
        if marker == 0xFFDA:
            break
    header, segs, start, j = data[:i], [], i, i
    while True:
        j = data.index(b"\xff", j)
        nxt = data[j + 1]
        if 0xD0 <= nxt <= 0xD7 or nxt == 0xD9:
            segs.append(data[start:j])
            if nxt == 0xD9:
                return header, segs
            start = j + 2
        j += 2


def _level_jpeg(model: SyntheticSlideModel, mpp: float, w: int, h: int,
                quality: int) -> tuple[bytes, list[int]]:
    """One level as a JPEG with restart markers, and the offsets of its intervals."""
    mcus = -(-w // _MCU_W)
    interval = max(d for d in range(1, 33) if mcus % d == 0)
    header = b""
    segs: list[bytes] = []
    band = _BAND_ROWS * _MCU_H
    for y in range(0, h, band):
        bh = min(band, h - y)
        head, part = _segments(model.render(mpp, 0, y, w, bh), quality, interval)
        header = header or head
        segs.extend(part)
    sof = header.index(b"\xff\xc0")  # the first band's frame header: give it the full height
    header = header[:sof + 5] + struct.pack(">H", h) + header[sof + 7:]
    out, starts = bytearray(header), []
    for k, seg in enumerate(segs):
        if k:
            out += bytes((0xFF, 0xD0 + (k - 1) % 8))
        starts.append(len(out))
        out += seg
    out += b"\xff\xd9"
    return bytes(out), starts


def _ifd(entries: list[tuple[int, int, int, bytes]], at: int) -> tuple[bytes, bytes, int]:
    """(out-of-line values, the IFD, the offset of the IFD) in NDPI layout, with the
    values written at ``at``; ``entries`` are (tag, type, count, packed value)."""
    extra = bytearray()
    packed = []
    for tag, typ, count, value in sorted(entries):
        if len(value) <= 4:
            field = value.ljust(4, b"\0")
        else:
            field = struct.pack("<I", at + len(extra))
            extra += value + (b"\0" if len(value) % 2 else b"")
        packed.append(struct.pack("<HHI", tag, typ, count) + field)
    ifd_at = at + len(extra)
    ifd = (struct.pack("<H", len(packed)) + b"".join(packed) + bytes(8)
           + bytes(4 * len(packed)))  # next-IFD offset (64 bits), then the high words
    return bytes(extra), ifd, ifd_at


def _ascii(text: str) -> tuple[int, int, bytes]:
    raw = text.encode() + b"\0"
    return 2, len(raw), raw


def write_ndpi(path: str | os.PathLike[str], cfg: SynthConfig, levels: int | None = None,
               quality: int = 90) -> dict[str, np.ndarray]:
    """Write a synthetic NDPI slide (``levels`` pyramid levels in 2× steps, by default
    down to about 512 px; a macro image) to ``path`` atomically and return its
    ground-truth masks.

    ``cfg.width`` and ``cfg.height`` are rounded down to whole MCUs (16×8 px) on every
    level, as in a real NDPI (openslide leaves out a partial last row of MCUs).
    """
    from gigamil.synth.slides import fake_label

    path = Path(path)
    levels = levels or pyramid_depth(cfg.width, cfg.height)
    width = cfg.width // (_MCU_W << (levels - 1)) * (_MCU_W << (levels - 1))
    height = cfg.height // (_MCU_H << (levels - 1)) * (_MCU_H << (levels - 1))
    cfg = dataclasses.replace(cfg, width=width, height=height)
    model = SyntheticSlideModel(cfg)
    power = 10.0 / cfg.mpp
    images: list[tuple[bytes, list[int] | None, int, int, float, float]] = []
    for k in range(levels):
        ds = 2**k
        w, h = width // ds, height // ds
        data, level_starts = _level_jpeg(model, cfg.mpp * ds, w, h, quality)
        images.append((data, level_starts, w, h, power, cfg.mpp * ds))
    macro = fake_label(600, 240)
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(macro).save(buf, "JPEG", quality=90)
    images.append((buf.getvalue(), None, 600, 240, -1.0, cfg.mpp * 64))

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(b"II*\0" + bytes(8))  # the first IFD offset: 64 bits, as in NDPI
        last_next = 4  # where the previous IFD's next offset lives (the header at first)
        for data, starts, w, h, lens, mpp in images:
            if fh.tell() % 2:
                fh.write(b"\0")
            strip_at = fh.tell()
            fh.write(data)
            res = 1e4 / mpp  # pixels per centimetre
            entries = [
                (256, 4, 1, struct.pack("<I", w)), (257, 4, 1, struct.pack("<I", h)),
                (258, 3, 3, struct.pack("<3H", 8, 8, 8)), (259, 3, 1, struct.pack("<H", 7)),
                (262, 3, 1, struct.pack("<H", 2)), (271, *_ascii("Hamamatsu")),
                (272, *_ascii("C13220")), (273, 4, 1, struct.pack("<I", strip_at)),
                (277, 3, 1, struct.pack("<H", 3)), (278, 4, 1, struct.pack("<I", h)),
                (279, 4, 1, struct.pack("<I", len(data))),
                (282, 5, 1, struct.pack("<II", round(res * 1000), 1000)),
                (283, 5, 1, struct.pack("<II", round(res * 1000), 1000)),
                (296, 3, 1, struct.pack("<H", 3)),
                (NDPI_FORMAT_FLAG, 4, 1, struct.pack("<I", 1)),
                (SOURCE_LENS, 11, 1, struct.pack("<f", lens)),
                (X_OFFSET, 9, 1, struct.pack("<i", 0)), (Y_OFFSET, 9, 1, struct.pack("<i", 0)),
                (FOCAL_PLANE, 9, 1, struct.pack("<i", 0)),
            ]
            if starts is not None:
                entries.append((MCU_STARTS, 4, len(starts), struct.pack(f"<{len(starts)}I",
                                                                         *starts)))
            if fh.tell() % 2:
                fh.write(b"\0")
            extra, ifd, ifd_at = _ifd(entries, fh.tell())
            fh.write(extra)
            assert fh.tell() == ifd_at
            fh.write(ifd)
            end = fh.tell()
            fh.seek(last_next)
            fh.write(struct.pack("<Q", ifd_at))
            fh.seek(end)
            last_next = ifd_at + 2 + 12 * len(entries)
    return model.masks
