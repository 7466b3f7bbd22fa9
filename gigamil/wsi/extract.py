"""Per-slide patch extraction and its batch driver.

``extract_slide`` runs one slide end to end — open, tissue mask, grid, read,
encode, write the LMDB store — and never raises for a bad slide: it returns a
:class:`SlideResult` whose status is ``ok``, ``skipped`` or ``failed``.
``extract_slides`` runs many slides in parallel worker processes, writes the
manifest ``extract.csv`` after every slide, and survives a worker that crashes.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gigamil.errors import GigamilError, StoreError, UsageError
from gigamil.io import write_csv, write_json
from gigamil.versions import gigamil_version, package_versions
from gigamil.wsi.grid import GridSpec, PatchGrid, make_grid
from gigamil.wsi.reader import SLIDE_EXTENSIONS, SlideReader, open_slide, resize_area, slide_id
from gigamil.wsi.store import Encoding, PatchStore, PatchStoreWriter, write_coords_h5
from gigamil.wsi.tissue import detect_tissue

__all__ = [
    "ExtractConfig",
    "SlideResult",
    "discover_slides",
    "iter_patches",
    "extract_slide",
    "extract_slides",
    "MANIFEST_FIELDS",
]

log = logging.getLogger("gigamil.extract")

Status = Literal["ok", "skipped", "failed"]
MANIFEST_FIELDS = ["slide_id", "file", "status", "n_patches", "seconds", "error", "note"]


@dataclass(frozen=True)
class ExtractConfig:
    """Every option of ``gigamil extract``; saved with the outputs."""

    mpp: float = 0.5
    patch_size: int = 256
    overlap: int = 0
    min_tissue: float = 0.5
    allow_upsample: bool = False
    encoding: Encoding = "jpeg"
    jpeg_quality: int = 90
    backend: str = "auto"
    mpp_override: float | None = None
    tissue_detector: str = "otsu"
    tissue_mpp: float = 8.0
    coords_h5: bool = False
    record_paths: bool = False
    read_block_px: int = 4096

    def __post_init__(self) -> None:
        self.grid  # validates the grid options early
        if self.encoding not in ("jpeg", "png", "raw"):
            raise UsageError(f"--format {self.encoding!r} is not supported", "use jpeg, png or raw")
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError(f"--jpeg-quality {self.jpeg_quality} must be in 1..100")

    @property
    def grid(self) -> GridSpec:
        return GridSpec(self.mpp, self.patch_size, self.overlap, self.min_tissue, self.allow_upsample)

    def output_params(self) -> dict[str, Any]:
        """The options that determine a store's content (a rerun with others redoes the slide)."""
        skip = {"backend", "coords_h5", "record_paths", "read_block_px"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class SlideResult:
    """One manifest row."""

    slide_id: str
    file: str
    status: Status
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id, "file": self.file, "status": self.status,
            "n_patches": self.n_patches, "seconds": round(self.seconds, 3),
            "error": self.error, "note": self.note,
        }


def discover_slides(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Slide files named directly, or found (non-recursively) in directories, sorted."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(
                sorted(c for c in p.iterdir() if c.is_file() and c.suffix.lower() in SLIDE_EXTENSIONS)
            )
        elif p.exists():
            found.append(p)
        else:
            raise UsageError(f"{p} does not exist", "give a slide file or a directory of slides")
    return found


def iter_patches(slide: SlideReader, grid: PatchGrid, max_block_px: int = 4096) -> Iterator[np.ndarray]:
    """Yield the grid's patches in order, reading runs of neighbours as one region.

    Each patch is cut from the region and resized exactly as a direct
    ``slide.read_region(level, x, y, read_size, read_size)`` would be.
    """
    rs, ps = grid.read_size, grid.spec.patch_size
    xy = grid.read_xy
    n = len(xy)
    i = 0
    while i < n:
        x0, y0 = int(xy[i, 0]), int(xy[i, 1])
        j = i
        while (
            j + 1 < n
            and xy[j + 1, 1] == y0
            and xy[j + 1, 0] + rs - x0 <= max(max_block_px, rs)
            and xy[j + 1, 0] - xy[j, 0] <= rs
        ):
            j += 1
        width = int(xy[j, 0]) + rs - x0
        region = slide.read_region(grid.level, x0, y0, width, rs)
        for k in range(i, j + 1):
            off = int(xy[k, 0]) - x0
            patch = region[:, off : off + rs]
            yield np.ascontiguousarray(resize_area(patch, ps))
        i = j + 1


def _store_is_current(store_path: Path, source: Path, cfg: ExtractConfig) -> int | None:
    """Patch count if ``store_path`` is a complete store of ``source`` with ``cfg``; else None."""
    try:
        with PatchStore(store_path) as store:
            meta = store.meta
            st = source.stat()
            same = (
                meta.get("params") == cfg.output_params()
                and meta.get("source", {}).get("size") == st.st_size
                and meta.get("source", {}).get("mtime") == int(st.st_mtime)
                and len(store.coords) == len(store)
            )
            return len(store) if same else None
    except (StoreError, OSError, ValueError, KeyError):
        return None


def _coords_h5_attrs(grid: PatchGrid, slide: SlideReader, sid: str) -> dict[str, Any]:
    power = slide.objective_power or 10.0 / slide.mpp
    return {
        # TRIDENT
        "patch_size": grid.spec.patch_size,
        "patch_size_level0": int(round(grid.size_level0)),
        "level0_magnification": float(power),
        "target_magnification": float(power * slide.mpp / grid.spec.mpp),
        "overlap": grid.spec.overlap,
        "name": sid,
        "level0_width": slide.dimensions[0],
        "level0_height": slide.dimensions[1],
        # CLAM
        "patch_level": grid.level,
        "downsample": np.array([grid.downsample, grid.downsample]),
        # gigamil
        "mpp": grid.spec.mpp,
        "level0_mpp": slide.mpp,
        "patch_size_um": grid.spec.patch_size * grid.spec.mpp,
        "schema_version": 1,
    }


def extract_slide(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: ExtractConfig,
    sid: str | None = None,
    overwrite: bool = False,
    on_patches: Callable[[int], None] | None = None,
) -> SlideResult:
    """Extract one slide into ``out_dir/patches/<sid>.lmdb``. Never raises for a bad slide."""
    t0 = time.perf_counter()
    path = Path(path)
    sid = sid or slide_id(path)
    out = Path(out_dir)
    store_path = out / "patches" / f"{sid}.lmdb"
    result = SlideResult(sid, path.name, "failed")
    try:
        if store_path.exists() and not store_path.is_file():
            raise UsageError(f"output {store_path.name} exists and is not a file",
                             "remove it or choose another --out")
        if not overwrite and store_path.is_file():
            n = _store_is_current(store_path, path, cfg)
            if n is not None:
                if cfg.coords_h5 and not (out / "coords" / f"{sid}.h5").exists():
                    with open_slide(path, cfg.backend, cfg.mpp_override) as slide:
                        grid = make_grid(slide.levels, cfg.grid, None, sid)
                        with PatchStore(store_path) as store:
                            write_coords_h5(out / "coords" / f"{sid}.h5", store.coords,
                                            _coords_h5_attrs(grid, slide, sid))
                result.status, result.n_patches = "skipped", n
                result.note = "already extracted with the same parameters"
                return result
        with open_slide(path, cfg.backend, cfg.mpp_override) as slide:
            _ = slide.mpp  # fails early, naming --mpp-override
            tissue, _thumb = detect_tissue(slide, cfg.tissue_detector, cfg.tissue_mpp)
            grid = make_grid(slide.levels, cfg.grid, tissue, sid)
            log.info("%s: %d of %d grid patches have tissue (level %d, %d px read → %d px)",
                     sid, len(grid), grid.n_candidates, grid.level, grid.read_size,
                     cfg.patch_size)
            with PatchStoreWriter(store_path, len(grid), cfg.patch_size, cfg.encoding,
                                  cfg.jpeg_quality) as writer:
                for k, patch in enumerate(iter_patches(slide, grid, cfg.read_block_px), 1):
                    writer.add(patch)
                    if on_patches is not None and k % 64 == 0:
                        on_patches(64)
                if on_patches is not None and len(grid) % 64:
                    on_patches(len(grid) % 64)
                writer.finish(grid.coords, _store_meta(sid, path, slide, grid, cfg, tissue.fraction))
            if cfg.coords_h5:
                write_coords_h5(out / "coords" / f"{sid}.h5", grid.coords,
                                _coords_h5_attrs(grid, slide, sid))
        result.status, result.n_patches = "ok", len(grid)
        if len(grid) == 0:
            result.note = ("no tissue detected: the slide may be blank; check its thumbnail, "
                           "or lower --min-tissue")
    except GigamilError as exc:
        result.error = str(exc)
        log.warning("%s: %s", sid, exc)
    except Exception as exc:  # a library failure on one slide must not stop the batch
        result.error = f"{type(exc).__name__}: {exc}"
        log.warning("%s: unexpected error: %s", sid, result.error, exc_info=log.isEnabledFor(10))
    finally:
        result.seconds = time.perf_counter() - t0
    return result


def _store_meta(
    sid: str, path: Path, slide: SlideReader, grid: PatchGrid, cfg: ExtractConfig, tissue: float
) -> dict[str, Any]:
    st = path.stat()
    source: dict[str, Any] = {"name": path.name, "size": st.st_size, "mtime": int(st.st_mtime)}
    if cfg.record_paths:
        source["path"] = str(path.resolve())
    return {
        "slide_id": sid,
        "source": source,
        "level0_mpp": slide.mpp,
        "level0_width": slide.dimensions[0],
        "level0_height": slide.dimensions[1],
        "objective_power": slide.objective_power,
        "target_mpp": grid.spec.mpp,
        "read_level": grid.level,
        "read_size": grid.read_size,
        "patch_size_level0": grid.size_level0,
        "n_grid": grid.n_candidates,
        "tissue_fraction": round(tissue, 5),
        "backend": slide.backend,
        "params": cfg.output_params(),
        "versions": {"gigamil": gigamil_version(), **package_versions()},
    }


def _duplicate_failures(paths: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[SlideResult]]:
    by_id: dict[str, list[Path]] = {}
    for p in paths:
        by_id.setdefault(slide_id(p), []).append(p)
    unique, failed = [], []
    for sid, group in by_id.items():
        if len(group) == 1:
            unique.append((group[0], sid))
            continue
        names = ", ".join(p.name for p in group)
        for p in group:
            failed.append(SlideResult(
                sid, p.name, "failed",
                error=f"slide id {sid!r} is shared by {names} — rename all but one of them",
            ))
    return unique, failed


def extract_slides(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    cfg: ExtractConfig,
    workers: int = 1,
    overwrite: bool = False,
    on_result: Callable[[SlideResult], None] | None = None,
    on_patches: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> list[SlideResult]:
    """Extract every slide in ``inputs`` into ``out_dir``; write ``out_dir/extract.csv``.

    ``workers > 1`` runs slides in parallel processes (at most ``workers`` in
    flight). A worker that dies (e.g. a segfault inside a slide library) fails
    the slide it was on after one retry, and the batch goes on.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", "give a directory for the outputs")
    paths = discover_slides(inputs)
    if not paths:
        raise UsageError("no slides found", f"slides need one of: {' '.join(sorted(SLIDE_EXTENSIONS))}")
    for name in ("patches", "coords"):
        sub = out / name
        if sub.exists() and not sub.is_dir():
            raise UsageError(f"{sub} is a file", "remove it or choose another --out")
    (out / "patches").mkdir(parents=True, exist_ok=True)
    write_json(out / "extract_config.json", {
        "config": dataclasses.asdict(cfg), "versions": {"gigamil": gigamil_version(), **package_versions()},
    })
    jobs, duplicates = _duplicate_failures(paths)
    results: list[SlideResult] = []
    order = {p.name: i for i, p in enumerate(paths)}
    if on_start is not None:
        on_start(len(paths))

    def record(res: SlideResult) -> None:
        results.append(res)
        results.sort(key=lambda r: order.get(r.file, 0))
        write_csv(out / "extract.csv", [r.row() for r in results], MANIFEST_FIELDS)
        if on_result is not None:
            on_result(res)

    for res in duplicates:
        record(res)
    if workers <= 1:
        for path, sid in jobs:
            record(extract_slide(path, out, cfg, sid, overwrite, on_patches))
    else:
        _run_pool(jobs, out, cfg, workers, overwrite, record)
    write_csv(out / "extract.csv", [r.row() for r in results], MANIFEST_FIELDS)
    return results


def _run_pool(
    jobs: list[tuple[Path, str]],
    out: Path,
    cfg: ExtractConfig,
    workers: int,
    overwrite: bool,
    record: Callable[[SlideResult], None],
) -> None:
    queue = list(jobs)
    crashes: dict[str, int] = {}
    ctx = mp.get_context("spawn")
    while queue:
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        inflight: dict[cf.Future[SlideResult], tuple[Path, str]] = {}
        broken = False
        try:
            while (queue or inflight) and not broken:
                while queue and len(inflight) < workers:
                    # a slide that was in flight when a worker died runs alone, so that
                    # a second death is its own and not a neighbour's
                    if any(crashes.get(j[1]) for j in inflight.values()):
                        break
                    if crashes.get(queue[0][1]) and inflight:
                        break
                    job = queue.pop(0)
                    inflight[pool.submit(extract_slide, job[0], out, cfg, job[1], overwrite)] = job
                done, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    job = inflight.pop(fut)
                    try:
                        record(fut.result())
                    except cf.process.BrokenProcessPool:
                        broken = True
                        inflight[fut] = job  # handled below with the others in flight
            if broken:
                for job in inflight.values():
                    crashes[job[1]] = crashes.get(job[1], 0) + 1
                    if crashes[job[1]] >= 2:
                        record(SlideResult(
                            job[1], job[0].name, "failed",
                            error="the worker process died twice on this slide (a crash in the "
                                  "slide library or out of memory); check the file, or try "
                                  "--backend openslide / --workers 1",
                        ))
                    else:
                        queue.insert(0, job)
        finally:
            pool.shutdown(wait=not broken, cancel_futures=True)
