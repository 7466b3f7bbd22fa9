"""Slide metadata without a backend: pyramid levels, resolution parsing, level choice, ids.

The level-0 resolution (µm per pixel) is read from the backend first and, for
any backend, from TIFF resolution tags or an Aperio ImageDescription
(:func:`tiff_metadata`). :func:`choose_level` picks the pyramid level to read
for a target resolution; :func:`slide_id` turns a file name into a safe id.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gigamil.errors import UpsampleError, UsageError

__all__ = [
    "load_mpp_csv",
    "Level",
    "SLIDE_EXTENSIONS",
    "TILE_EXTENSIONS",
    "MPP_RTOL",
    "MPP_RANGE",
    "parse_aperio",
    "valid_mpp",
    "valid_power",
    "tiff_metadata",
    "choose_level",
    "slide_id",
]

#: File extensions treated as slides when a directory is scanned.
SLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm"}
)
#: TIFF-family extensions that ``auto`` reads tile by tile (:mod:`gigamil.wsi.tiles`).
TILE_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".btf", ".tf8", ".ndpi"})

#: Relative tolerance under which a level's mpp counts as equal to a target mpp.
MPP_RTOL = 1e-2
#: Plausible level-0 resolutions; outside (e.g. 352.8 from a 72-dpi TIFF) counts as missing.
MPP_RANGE = (0.02, 20.0)


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels, downsample from level 0 and resolution."""

    index: int
    width: int
    height: int
    downsample: float
    mpp: float


def parse_aperio(description: str) -> dict[str, str]:
    """Key/value pairs of an Aperio ImageDescription (``... |MPP = 0.25|AppMag = 40``)."""
    if not description.startswith("Aperio"):
        return {}
    out = {}
    for part in description.split("|")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _number_in(value: Any, lo: float, hi: float) -> float | None:
    """``value`` as a float if it parses and lies in (lo, hi); else None."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and lo < x < hi else None


def valid_mpp(value: Any) -> float | None:
    """``value`` as a level-0 resolution (µm/px) if it is a plausible one; else None."""
    return _number_in(value, *MPP_RANGE)


def valid_power(value: Any) -> float | None:
    """``value`` as an objective power (e.g. 20, 40) if it is a plausible one; else None."""
    return _number_in(value, 0.1, 400.0)


def tiff_metadata(path: Path) -> tuple[float | None, float | None]:
    """(mpp, objective power) from TIFF tags of the first page, for any backend."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            aperio = parse_aperio(str(page.description or ""))
            mpp = valid_mpp(aperio.get("MPP"))
            power = valid_power(aperio.get("AppMag"))
            if mpp is None:
                tags = page.tags
                unit = tags.get("ResolutionUnit")
                xres = tags.get("XResolution")
                if unit is not None and xres is not None:
                    num, den = xres.value
                    per_unit = num / den if den else 0.0
                    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
                    if per_unit > 0 and um_per_unit:
                        mpp = valid_mpp(um_per_unit / per_unit)
            return mpp, power
    except Exception:  # not a TIFF, or unreadable tags: the backend decides
        return None, None


def choose_level(
    levels: list[Level], target_mpp: float, allow_upsample: bool = False, name: str = "slide"
) -> tuple[int, float]:
    """See :meth:`SlideReader.level_for_mpp`."""
    if not target_mpp > 0:
        raise UsageError(f"target mpp must be positive, got {target_mpp}")
    best = None
    for level in levels:  # levels go from fine to coarse
        if level.mpp <= target_mpp * (1 + MPP_RTOL):
            best = level
    if best is None:
        if not allow_upsample:
            raise UpsampleError(
                f"{name} was scanned at {levels[0].mpp:.4g} µm/px, "
                f"coarser than the requested {target_mpp:g} µm/px",
                "ask for a coarser --mpp, or pass --allow-upsample to interpolate",
            )
        best = levels[0]
    scale = target_mpp / best.mpp
    if abs(scale - 1.0) <= MPP_RTOL:
        scale = 1.0
    return best.index, scale


_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def slide_id(path: str | os.PathLike[str]) -> str:
    """A filesystem-safe slide id from a file name (``TCGA-AB 12.svs`` → ``TCGA-AB_12``)."""
    stem = Path(path).name
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    return _SAFE_ID.sub("_", stem).strip("._") or "slide"


def load_mpp_csv(path: str | os.PathLike[str]) -> dict[str, float]:
    """``slide_id,mpp`` rows of ``--mpp-csv`` as {slide id: level-0 µm/px}."""
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise UsageError(f"cannot read --mpp-csv {p.name}: {exc.strerror}") from None
    if not rows or not {"slide_id", "mpp"} <= set(rows[0]):
        raise UsageError(f"--mpp-csv {p.name} needs the columns slide_id and mpp",
                         "e.g. a line `TCGA-01,0.2520` per slide")
    out: dict[str, float] = {}
    for i, row in enumerate(rows, 2):
        mpp = valid_mpp(row["mpp"])
        if mpp is None:
            raise UsageError(f"--mpp-csv {p.name} line {i}: mpp {row['mpp']!r} is not a "
                             "plausible resolution", "give level-0 µm per pixel, e.g. 0.25")
        out[row["slide_id"].strip()] = mpp
    return out
