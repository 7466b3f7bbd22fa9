"""Finding the slides that ``gigamil extract`` (and ``embed``, ``infer``) work on.

Inputs are slide files, folders (searched recursively unless ``recursive=False``)
and slide lists (a ``.csv`` with a ``path`` column and an optional ``slide_id``
column, or a ``.txt``/``.lst`` file with one path a line). What counts as one
slide:

- a file with a slide extension (:data:`SLIDE_EXTENSIONS`);
- a DICOM WSI series: the folder that holds its ``.dcm`` instances (its id is the
  folder's name; label and overview instances are never opened as slides; a folder
  holding several series is reported);
- a MIRAX slide: the ``.mrxs`` file; its companion folder of the same stem is part
  of it and is not searched.

Hidden files and folders, partial downloads (``.part``, ``.crdownload``, …) and
gigamil's own output folders (``extract_config.json`` beside ``patches/``) met while
searching are ignored. Two inputs that resolve to the same
slide are kept once and reported; two slides with the same id are both failed
with a message, never extracted under one name.
"""

from __future__ import annotations

import csv
import hashlib
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gigamil.errors import UsageError
from gigamil.io import atomic_path
from gigamil.wsi.extract_config import SlideResult
from gigamil.wsi.metadata import SLIDE_EXTENSIONS, slide_id

__all__ = [
    "SlideSource",
    "Discovery",
    "find_slides",
    "discover_slides",
    "duplicate_ids",
    "slide_files",
    "LIST_SUFFIXES",
    "Pseudonyms",
]

#: Files read as slide lists rather than slides.
LIST_SUFFIXES = frozenset({".csv", ".txt", ".lst"})
#: Partial downloads and temporary files: never slides.
PARTIAL_SUFFIXES = frozenset({".part", ".partial", ".crdownload", ".download", ".tmp",
                              ".aria2", ".filepart"})


@dataclass(frozen=True)
class SlideSource:
    """One slide to work on: where it is, its id, and the name outputs may show."""

    path: Path
    slide_id: str
    name: str  # the file name in manifests and metadata (the id when pseudonymized)
    original_id: str = ""  # the id before pseudonymization (for --mpp-csv and --roi files)

    def __post_init__(self) -> None:
        if not self.original_id:
            object.__setattr__(self, "original_id", self.slide_id)


@dataclass
class Discovery:
    """What the inputs hold: the slides, failed rows for inputs that are not usable
    slides (a missing list entry, a MIRAX file without its folder, a shared id), and
    notes for the user (an input given twice)."""

    slides: list[SlideSource] = field(default_factory=list)
    failed: list[SlideResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _ignored(p: Path) -> bool:
    name = p.name
    return (name.startswith((".", "~$")) or name == "__MACOSX"
            or p.suffix.lower() in PARTIAL_SUFFIXES or name.endswith((".lmdb", ".h5")))


def _is_slide_file(p: Path) -> bool:
    return p.suffix.lower() in SLIDE_EXTENSIONS and p.suffix.lower() != ".dcm"


def _is_output_folder(folder: Path) -> bool:
    """One of gigamil's own ``--out`` folders (its stores are not slides)."""
    return (folder / "extract_config.json").is_file() and (folder / "patches").is_dir()


def _dicom_series(folder: Path) -> int:
    """How many DICOM WSI series have VOLUME instances directly in ``folder``."""
    from gigamil.wsi.dicom import is_dicom_series_folder

    if not is_dicom_series_folder(folder):
        return 0
    return max(1, len(_series_uids(folder)))


def _series_uids(folder: Path) -> set[str]:
    import pydicom

    uids: set[str] = set()
    for f in folder.iterdir():
        if f.suffix.lower() == ".dcm" and f.is_file():
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True,
                                     specific_tags=["SeriesInstanceUID", "ImageType"])
            except Exception:
                continue
            kinds = [str(t).upper() for t in (ds.get("ImageType") or [])]
            if "VOLUME" in kinds and ds.get("SeriesInstanceUID"):
                uids.add(str(ds.SeriesInstanceUID))
    return uids


def _walk(folder: Path, recursive: bool, root: bool = True,
          failed: list[SlideResult] | None = None,
          pseudonyms: Pseudonyms | None = None) -> Iterator[Path]:
    """Slides under ``folder``, in sorted order; folders holding several DICOM series
    go to ``failed`` (named by their pseudonym with ``pseudonyms``)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise UsageError(f"cannot list {folder.name}: {exc.strerror}",
                         "check the folder's permissions") from exc
    if not root and _is_output_folder(folder):
        return  # one of our own output folders
    entries = [e for e in entries if not _ignored(e)]
    files = [e for e in entries if e.is_file()]
    if any(f.suffix.lower() == ".dcm" for f in files):
        n = _dicom_series(folder)
        if n == 1:
            yield folder
        elif n > 1 and failed is not None:
            pid = None if pseudonyms is None else pseudonyms.id_for(folder)
            failed.append(SlideResult(
                pid or slide_id(folder), pid or folder.name, "failed",
                error=f"folder {pid or folder.name} holds {n} DICOM series — give each "
                      "series its own folder (a series folder is one slide)"))
    mirax = {f.stem for f in files if f.suffix.lower() == ".mrxs"}
    yield from (f for f in files if _is_slide_file(f))
    for d in entries:
        if d.is_dir() and d.name not in mirax:
            if recursive:
                yield from _walk(d, recursive, False, failed, pseudonyms)
            elif _dicom_series(d) == 1:  # a series folder directly inside an input counts
                yield d


def _read_list(path: Path) -> list[tuple[Path, str | None]]:
    """(path, slide_id or None) per entry of a slide list; relative paths are taken
    from the list's own folder."""
    base = path.parent
    rows: list[tuple[Path, str | None]] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the slide list {path.name}: {exc}",
                         "give a CSV with a `path` column, or one path a line") from exc
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        if "path" not in cols:
            raise UsageError(f"slide list {path.name} has no `path` column "
                             f"(columns: {', '.join(cols) or 'none'})",
                             "name the column of slide paths `path` (optional: `slide_id`)")
        for row in reader:
            p = (row.get(cols["path"]) or "").strip()
            if p:
                sid = (row.get(cols["slide_id"]) or "").strip() if "slide_id" in cols else ""
                rows.append((base / p, sid or None))
    else:
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                rows.append((base / line, None))
    return rows


def _slide_of(p: Path) -> Path:
    """A path as the slide it names: a DICOM instance names its series folder."""
    return p.parent if p.suffix.lower() == ".dcm" else p


def find_slides(inputs: Sequence[str | os.PathLike[str]], recursive: bool = True,
                pseudonyms: Pseudonyms | None = None) -> Discovery:
    """Every slide in ``inputs`` (files, folders, slide lists), each once, with its id."""
    found = Discovery()
    seen: dict[Path, str] = {}
    candidates: list[tuple[Path, str | None, str]] = []  # (path, id from a list, given as)
    for item in inputs:
        p = Path(item)
        if p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            for q, sid in _read_list(p):
                if not q.exists():
                    pid = None if pseudonyms is None else pseudonyms.id_for(q, sid)
                    found.failed.append(SlideResult(
                        pid or sid or slide_id(q), pid or q.name, "failed",
                        error=f"{pid or q.name} (listed in {p.name}) does not exist — "
                              "fix the path in the list (relative paths start at its folder)"))
                    continue
                candidates.append((_slide_of(q), sid, p.name))
        elif p.is_dir():
            candidates.extend((q, None, p.name)
                              for q in _walk(p, recursive, True, found.failed, pseudonyms))
        elif p.exists():
            candidates.append((_slide_of(p), None, p.name))
        else:
            raise UsageError(f"{p} does not exist",
                             "give slide files, folders of slides or a slide list (.csv/.txt)")
    for path, sid, given in candidates:
        key = path.resolve()
        if key in seen:
            shown = path.name if pseudonyms is None else pseudonyms.id_for(path, sid)
            found.notes.append(f"{shown} is given twice; extracted once")
            continue
        seen[key] = given
        if path.suffix.lower() == ".mrxs" and not (path.parent / path.stem).is_dir():
            pid = None if pseudonyms is None else pseudonyms.id_for(path, sid)
            found.failed.append(SlideResult(
                pid or sid or slide_id(path), pid or path.name, "failed",
                error=f"MIRAX slide {pid or path.name} has no companion folder beside it — "
                      "copy the .mrxs file together with its folder of the same name"))
            continue
        if pseudonyms is not None:
            pid = pseudonyms.id_for(path, sid)
            found.slides.append(SlideSource(path, pid, pid, sid or slide_id(path)))
        else:
            found.slides.append(SlideSource(path, sid or slide_id(path), path.name))
    unique, failed = duplicate_ids(found.slides)
    found.slides = unique
    found.failed.extend(failed)
    return found


def discover_slides(inputs: Sequence[str | os.PathLike[str]], recursive: bool = True
                    ) -> list[Path]:
    """The slide paths in ``inputs`` (files, folders, slide lists), each once, sorted as
    found; inputs that are not usable slides are left out (see :func:`find_slides`)."""
    import logging

    found = find_slides(inputs, recursive)
    for r in found.failed:
        logging.getLogger("gigamil").warning("%s: %s", r.slide_id, r.error)
    return [s.path for s in found.slides]


def duplicate_ids(sources: Sequence[SlideSource]) -> tuple[list[SlideSource], list[SlideResult]]:
    """The slides whose id is unique, and a failed result for every slide whose id
    collides with another's (case-insensitively: macOS/Windows shares)."""
    by_id: dict[str, list[SlideSource]] = {}
    for s in sources:
        by_id.setdefault(s.slide_id.casefold(), []).append(s)
    unique, failed = [], []
    for group in by_id.values():
        if len(group) == 1:
            unique.append(group[0])
            continue
        names = ", ".join(_shown(s) for s in group)
        for s in group:
            failed.append(SlideResult(
                s.slide_id, s.name, "failed",
                error=f"slide id {s.slide_id!r} is shared by {names} — rename all but one "
                      "of them (a DICOM series takes its folder's name)"))
    order = {id(s): i for i, s in enumerate(sources)}
    unique.sort(key=lambda s: order[id(s)])
    return unique, failed


def _shown(s: SlideSource) -> str:
    kind = "DICOM series " if s.path.is_dir() else ""
    return f"{kind}{s.name}"


def slide_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files and folders that make up the slide at ``path`` (copied side by side):
    a DICOM series folder, whole; a ``.mrxs`` file and its companion folder of the same
    stem; a ``.dcm`` file and the other ``.dcm`` files of its folder; else the file."""
    p = Path(path)
    if p.is_dir():
        return [p]
    suffix = p.suffix.lower()
    if suffix == ".mrxs":
        data = p.with_suffix("")
        return [p, data] if data.is_dir() else [p]
    if suffix == ".dcm" and p.parent.is_dir():
        siblings = sorted(c for c in p.parent.iterdir()
                          if c != p and c.is_file() and c.suffix.lower() == ".dcm")
        return [p, *siblings]
    return [p]


class Pseudonyms:
    """Salted-hash slide ids for ``--pseudonymize``, and the file that maps them back.

    The mapping (id → file, path, original id) and the salt live in one JSON file,
    mode 0600, written atomically; a rerun with the same file gives the same ids.
    Keep that file; share the outputs without it.
    """

    def __init__(self, mapping_file: Path) -> None:
        import json

        self.file = Path(mapping_file)
        self.entries: dict[str, dict[str, str]] = {}
        if self.file.is_file():
            data = json.loads(self.file.read_text())
            self.salt = str(data["salt"])
            self.entries = {e["slide_id"]: e for e in data.get("slides", [])}
        else:
            self.salt = secrets.token_hex(16)

    def id_for(self, path: Path, sid: str | None = None) -> str:
        original = sid or slide_id(path)
        digest = hashlib.sha256(f"{self.salt}:{original}".encode()).hexdigest()[:16]
        pid = f"p{digest}"
        self.entries[pid] = {"slide_id": pid, "original_id": original, "file": path.name,
                             "path": str(path.resolve())}
        return pid

    def save(self) -> None:
        import json

        self.file.parent.mkdir(parents=True, exist_ok=True)
        data = {"salt": self.salt, "slides": sorted(self.entries.values(),
                                                    key=lambda e: e["slide_id"])}
        with atomic_path(self.file) as tmp:
            os.chmod(tmp, 0o600)  # before it holds anything
            tmp.write_text(json.dumps(data, indent=1))
