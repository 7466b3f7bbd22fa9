"""Process-wide memory settings for the hot loops (encoders on CPU, patch reading).

glibc's malloc hands every freed block above its mmap threshold (at most 32 MB) straight
back to the kernel, and trims the heap when its top is freed. An encoder's activations
are such blocks, so each batch page-faults its working memory in again: measured on a
CPU encoder, a fifth of the time went to faults and the cache misses that follow.
:func:`retain_freed_memory` lets the process keep what it freed; peak RSS is unchanged,
it just stays at its peak.

The opposite holds between the phases of extracting one slide: tissue detection on a
large slide frees tens of MB of thumbnails and masks, which glibc keeps in its heap
(its mmap threshold has risen to the size of the blocks freed).
:func:`release_freed_memory` hands them back, so that reading and writing patches
starts from what the slide's size needs, not from detection's peak; and
:func:`mmap_threshold` pins the mmap threshold: low while a slide is planned, so that
large arrays (thumbnails, masks, labels) go back to the kernel as soon as they are freed,
and high while its patches are read, so that region buffers are reused from the heap
instead of being mapped and faulted in afresh for every run.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["retain_freed_memory", "release_freed_memory", "mmap_threshold", "drop_mapped_pages"]

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


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the kernel now (glibc ``malloc_trim``); returns
    whether anything was released. A no-op elsewhere, or once
    :func:`retain_freed_memory` has been asked for."""
    if _DONE and _DONE[0] or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def mmap_threshold(threshold: int) -> bool:
    """Map every block of ``threshold`` bytes or more on its own (freeing it returns it to
    the kernel at once), serve smaller ones from the heap and trim the heap past twice
    that; glibc's threshold otherwise moves up to the largest block freed, up to 32 MB. A no-op once
    :func:`retain_freed_memory` has been asked for, or off glibc."""
    if _DONE and _DONE[0] or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # glibc's own rule for a moved threshold: trim the heap only past twice it (a
        # pinned threshold would otherwise leave trimming at 128 kB, every few frees)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold))
    except (OSError, AttributeError):
        return False


_MADV_DONTNEED = 4


def drop_mapped_pages(path: str) -> int:
    """Unmap the resident pages of this process's mappings of ``path`` (Linux
    ``madvise(MADV_DONTNEED)``); returns the bytes of mappings advised.

    LMDB maps the whole store it writes; each page it touches there maps its neighbours
    too (the kernel's fault-around), so RSS would grow with the store. The file's pages
    stay in the page cache and the mapping stays valid: a later access maps them back.
    """
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        done = 0
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == path:
                    start, end = (int(v, 16) for v in fields[0].split("-"))
                    if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
                        done += end - start
        return done
    except (OSError, AttributeError, ValueError):
        return 0
