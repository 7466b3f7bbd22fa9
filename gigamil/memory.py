"""Process-wide memory settings for the hot loops (encoders on CPU, patch reading).

glibc's malloc hands every freed block above its mmap threshold (at most 32 MB) straight
back to the kernel, and trims the heap when its top is freed. An encoder's activations
are such blocks, so each batch page-faults its working memory in again: measured on a
CPU encoder, a fifth of the time went to faults and the cache misses that follow.
:func:`retain_freed_memory` lets the process keep what it freed; peak RSS is unchanged,
it just stays at its peak.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DONE: list[bool] = []


def retain_freed_memory(threshold: int = 1 << 30) -> bool:
    """Serve blocks below ``threshold`` bytes from the heap and never trim it (glibc only);
    returns whether the setting took. Calling it again does nothing."""
    if _DONE:
        return _DONE[0]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            value = min(threshold, 2**31 - 1)
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, value)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, value))
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
            ok = False
    _DONE.append(ok)
    return ok
