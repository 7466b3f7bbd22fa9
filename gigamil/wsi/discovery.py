"""Finding the slide files that ``gigamil extract`` (and ``embed``, ``infer``) work on."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from gigamil.errors import UsageError
from gigamil.wsi.extract_config import SlideResult
from gigamil.wsi.metadata import SLIDE_EXTENSIONS, slide_id

__all__ = ["discover_slides", "duplicate_ids"]


def discover_slides(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Slide files named directly, or found (non-recursively) in directories; sorted, deduplicated."""
    found: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            candidates = sorted(c for c in p.iterdir()
                                if c.is_file() and c.suffix.lower() in SLIDE_EXTENSIONS)
        elif p.exists():
            candidates = [p]
        else:
            raise UsageError(f"{p} does not exist", "give a slide file or a directory of slides")
        for c in candidates:
            if c.resolve() not in seen:
                seen.add(c.resolve())
                found.append(c)
    return found


def duplicate_ids(paths: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[SlideResult]]:
    """``(path, slide_id)`` of the slides to extract, and a failed result for every slide
    whose id collides with another's (case-insensitively: macOS/Windows shares)."""
    by_id: dict[str, list[Path]] = {}
    for p in paths:
        by_id.setdefault(slide_id(p).casefold(), []).append(p)
    unique, failed = [], []
    for group in by_id.values():
        if len(group) == 1:
            unique.append((group[0], slide_id(group[0])))
            continue
        names = ", ".join(p.name for p in group)
        for p in group:
            failed.append(SlideResult(
                slide_id(p), p.name, "failed",
                error=f"slide id {slide_id(p)!r} is shared by {names} — rename all but one of them",
            ))
    return unique, failed
