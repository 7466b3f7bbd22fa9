"""Strict JPEG decoding: corrupt data raises instead of decoding to garbage.

libjpeg-turbo only *warns* about much damaged scan data ("Corrupt JPEG data: …
extraneous bytes before marker 0xd9") and returns garbage pixels; imagecodecs,
openslide and cuCIM pass that on silently. simplejpeg's ``strict`` mode turns those
warnings into errors, at the same speed. :func:`strict_jpeg_check` finds the same
damage at about 60 % of the cost: it decodes at 1/8 scale, which still entropy-decodes
every coefficient (where corruption shows) but skips most of the IDCT, upsampling and
colour conversion.
"""

from __future__ import annotations

import numpy as np

__all__ = ["strict_jpeg_decode", "strict_jpeg_check"]


def strict_jpeg_decode(data: bytes, tables: bytes | None = None,
                       out: np.ndarray | None = None) -> np.ndarray:
    """Decode a (YCbCr) JPEG tile to RGB, raising on any corrupt data libjpeg reports."""
    import simplejpeg

    if tables:  # abbreviated stream: the tables segments go right after SOI
        data = data[:2] + tables[2:-2] + data[2:]
    return np.asarray(simplejpeg.decode_jpeg(data, colorspace="rgb", strict=True, buffer=out))


def strict_jpeg_check(data: bytes, tables: bytes | None = None) -> None:
    """Raise where :func:`strict_jpeg_decode` would, without making the full-size pixels."""
    import simplejpeg

    if tables:
        data = data[:2] + tables[2:-2] + data[2:]
    simplejpeg.decode_jpeg(data, colorspace="rgb", strict=True, min_height=1, min_width=1,
                           min_factor=8)
