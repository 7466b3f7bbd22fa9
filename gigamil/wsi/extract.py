"""Per-slide patch extraction and its batch driver.

``extract_slide`` runs one slide end to end — open, tissue mask, grid(s),
read, QC, stain normalization, encode, write the LMDB store — and never raises
for a bad slide: it returns a :class:`SlideResult` whose status is ``ok``,
``skipped`` or ``failed``. Many slides are run by the extract stage
(:mod:`gigamil.cluster.extract_cohort`), in a crash-tolerant process pool or as SLURM jobs.

Options and results are in :mod:`gigamil.wsi.extract_config`; planning and the
threaded read/QC/encode path in :mod:`gigamil.wsi.planning`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gigamil.errors import (
    DiskFullError,
    GigamilError,
    SlideOpenError,
    StoreError,
    UsageError,
    is_disk_full,
)
from gigamil.io import work_lock
from gigamil.layout import ExtractDir
from gigamil.memory import mmap_threshold
from gigamil.versions import gigamil_version, package_versions
from gigamil.wsi.extract_config import ExtractConfig, SlidePlan, SlideResult
from gigamil.wsi.features import trident_attrs
from gigamil.wsi.metadata import slide_id
from gigamil.wsi.planning import UNREADABLE, plan_slide, process_grid
from gigamil.wsi.preview import extraction_preview, save_png
from gigamil.wsi.reader import open_slide, open_slide_for
from gigamil.wsi.slide import SlideReader

if TYPE_CHECKING:
    from gigamil.wsi.qupath import Roi
from gigamil.wsi.store import PatchStore
from gigamil.wsi.store_format import scale_key, write_coords_h5
from gigamil.wsi.store_writer import PatchStoreWriter

__all__ = [
    "extract_slide",
    "ELSEWHERE",
    "preview_slide",
    "store_meta",
    "json_roundtrip",
    "safe_message",
]

log = logging.getLogger("gigamil.extract")


def source_signature(path: Path) -> tuple[int, int]:
    """(bytes, mtime) of a slide: of its file, or summed over a DICOM series folder's
    files (newest mtime), or over a MIRAX file and its companion folder."""
    from gigamil.wsi.discovery import slide_files

    size, mtime = 0, 0
    for part in slide_files(path):
        files = [f for f in part.rglob("*") if f.is_file()] if part.is_dir() else [part]
        for f in files:
            st = f.stat()
            size, mtime = size + st.st_size, max(mtime, int(st.st_mtime))
    return size, mtime


def roi_sha256(cfg: ExtractConfig, roi_key: str) -> str | None:
    """SHA-256 of a slide's ROI file under ``--roi`` (None without --roi or file)."""
    import hashlib

    if cfg.roi_dir is None:
        return None
    from gigamil.wsi.qupath import roi_path

    p = roi_path(cfg.roi_dir, roi_key)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def _current_store(store_path: Path, source: Path, cfg: ExtractConfig, roi_key: str
                   ) -> tuple[dict[str, Any], np.ndarray] | None:
    """(meta, coords) if ``store_path`` is a complete store of ``source`` with ``cfg``; else None."""
    try:
        with PatchStore(store_path) as store:
            meta, coords = store.meta, store.coords
            size, mtime = source_signature(source)
            same = (
                meta.get("params") == json_roundtrip(cfg.output_params())
                and meta.get("source", {}).get("size") == size
                and meta.get("source", {}).get("mtime") == mtime
                and meta.get("roi_sha256") == roi_sha256(cfg, roi_key)
                and len(coords) == len(store)
            )
            return (meta, coords) if same else None
    except (StoreError, OSError, ValueError, KeyError):
        return None


def json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists)."""
    import json

    return json.loads(json.dumps(obj))


def safe_message(exc: BaseException, *paths: Path) -> str:
    """An error message without directory paths (they may hold patient data)."""
    if isinstance(exc, GigamilError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        name = Path(exc.filename).name if exc.filename else ""
        text = f"{type(exc).__name__}: {exc.strerror}" + (f" ({name})" if name else "")
    else:
        text = f"{type(exc).__name__}: {exc}"
    for p in paths:
        for d in {str(p.parent.resolve()), str(p.parent)}:
            if d not in ("", "."):
                text = text.replace(d + os.sep, "").replace(d, "")
    return text


#: The note of a slide skipped because another process holds its claim.
ELSEWHERE = "being extracted by another process at this moment"


def extract_slide(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: ExtractConfig,
    sid: str | None = None,
    overwrite: bool = False,
    threads: int = 1,
    on_patches: Callable[[int], None] | None = None,
    name: str | None = None,
    roi_key: str | None = None,
    wait_claim: bool = False,
) -> SlideResult:
    """Extract one slide into ``out_dir/patches/<sid>.lmdb``. Never raises for a bad slide.

    ``name`` is what outputs call the source (its file name; the id when pseudonymized);
    ``roi_key`` the name of its ``--roi`` file (its original id). A slide another process
    is extracting right now is ``skipped`` with the note :data:`ELSEWHERE`; with
    ``wait_claim``, this waits for that process instead and then does what is left.
    """
    t0 = time.perf_counter()
    path = Path(path)
    sid = sid or slide_id(path)
    name = name or path.name
    roi_key = roi_key or sid
    out = Path(out_dir)
    layout = ExtractDir(out)
    store_path, h5_path = layout.store(sid), layout.coords_h5(sid)
    result = SlideResult(sid, name, "failed")
    claim = contextlib.ExitStack()
    try:
        if store_path.exists() and not store_path.is_file():
            raise UsageError(f"output {store_path.name} exists and is not a file",
                             "remove it or choose another --out")
        if not claim.enter_context(work_lock(store_path, wait=wait_claim)):  # two runs at once
            result.status = "skipped"
            result.note = ELSEWHERE
            return result
        wanted = [p for p, on in ((layout.geojson(sid), cfg.geojson),
                                  (layout.preview(sid), cfg.previews)) if on]
        if not overwrite and store_path.is_file() and all(p.is_file() for p in wanted):
            current = _current_store(store_path, path, cfg, roi_key)
            if current is not None:
                meta, coords0 = current
                if cfg.coords_h5:  # rewritten from the store: never stale
                    write_coords_h5(h5_path, coords0, trident_attrs(meta))
                result.qc = dict(meta.get("qc_rejected_total", {}))
                result.status, result.n_patches = "skipped", len(coords0)
                result.note = "already extracted with the same parameters"
                return result
        h5_path.unlink(missing_ok=True)  # a store being redone invalidates its coords file
        with open_slide_for(path, cfg) as slide:
            roi = _load_roi(cfg, roi_key, slide)
            mmap_threshold(4 << 20)  # a large slide's thumbnail and masks leave when freed
            plan = plan_slide(slide, cfg, sid, roi, keep_thumb=cfg.previews)
            mmap_threshold(32 << 20)  # region buffers are reused, not faulted in per run
            n_total = sum(len(g) for g in plan.grids)
            log.info("%s: %s grid patches with tissue (level %d, %d px read → %d px)", sid,
                     "+".join(str(len(g)) for g in plan.grids), plan.grids[0].level,
                     plan.grids[0].read_size, cfg.patch_size)
            coords: dict[str, np.ndarray] = {}
            rejected: dict[str, dict[str, int]] = {}
            primary_reasons: list[str] = []
            with PatchStoreWriter(store_path, n_total, cfg.patch_size, cfg.encoding,
                                  cfg.jpeg_quality) as writer:
                for k, grid in enumerate(plan.grids):
                    key = "" if k == 0 else scale_key(grid.spec.mpp)
                    kept: list[int] = []
                    counts: Counter[str] = Counter()
                    for run in process_grid(slide, grid, cfg, plan.normalizer, threads):
                        for i, reason, data in zip(run.indices, run.reasons, run.encoded):
                            if k == 0:
                                primary_reasons.append(reason)
                            if reason:
                                counts[reason] += 1
                            else:
                                writer.add_encoded(data, key)  # type: ignore[arg-type]
                                kept.append(i)
                        if on_patches is not None:
                            on_patches(len(run.indices))
                    coords[key] = grid.coords[kept]
                    rejected[f"{grid.spec.mpp:g}"] = dict(counts)
                    if len(grid) and counts[UNREADABLE] == len(grid):
                        raise SlideOpenError(
                            f"no patch of level {grid.level} ({grid.spec.mpp:g} µm/px) can be "
                            "decoded", "the file is damaged; copy it again from the source, or "
                            "try another --backend")
                meta = store_meta(sid, path, slide, plan, cfg, rejected, name)
                meta["roi_sha256"] = roi_sha256(cfg, roi_key)
                writer.finish(coords, meta)
            if cfg.coords_h5:
                write_coords_h5(h5_path, coords[""], trident_attrs(meta))
            if cfg.geojson:
                _write_geojson(layout.geojson(sid), plan, slide.mpp, coords[""])
            if cfg.previews and plan.thumb is not None:
                g = plan.grids[0]
                scale = plan.thumb.shape[1] / slide.dimensions[0]
                image = extraction_preview(plan.thumb, plan.tissue.mask, g.coords, g.size_level0,
                                           scale, primary_reasons, title=sid)
                save_png(layout.preview(sid), image)
        total: Counter[str] = Counter()
        for c in rejected.values():
            total.update(c)
        result.status, result.n_patches, result.qc = "ok", len(coords[""]), dict(total)
        notes = []
        if len(plan.grids[0]) == 0:
            notes.append("no tissue detected: the slide may be blank; check its thumbnail, "
                         "or lower --min-tissue")
        if slide.mpp_source == "override":
            notes.append(f"mpp {slide.mpp:g} from --mpp-override")
        notes.extend(slide.notes)
        if total[UNREADABLE]:
            notes.append(f"{total[UNREADABLE]} patches left out: their tiles cannot be decoded")
        result.note = "; ".join(notes)
    except Exception as exc:  # one bad slide must never stop the batch ...
        if is_disk_full(exc, out):  # ... but a full disk would fail every one after it
            raise DiskFullError(out) from exc
        result.error = safe_message(exc, path, store_path)
        if name != path.name:  # pseudonymized: before it is logged
            result.error = _scrub(result.error, path, name, roi_key, cfg)
        if isinstance(exc, GigamilError):
            log.warning("%s: %s", sid, result.error)
        else:
            log.warning("%s: unexpected error: %s", sid, result.error,
                        exc_info=log.isEnabledFor(logging.DEBUG))
    finally:
        claim.close()
        result.seconds = time.perf_counter() - t0
        if name != path.name:  # pseudonymized: no file, folder or ROI name in any output
            result.note = _scrub(result.note, path, name, roi_key, cfg)
    return result


def _scrub(text: str, path: Path, name: str, roi_key: str, cfg: ExtractConfig) -> str:
    """``text`` with the slide's path, file name, stem and ROI file replaced by ``name``."""
    words = [str(path.resolve()), str(path), path.name, path.stem, roi_key]
    if cfg.roi_dir is not None:
        words = [str(Path(cfg.roi_dir).resolve()), str(cfg.roi_dir), *words]
    for w in sorted(set(words), key=len, reverse=True):
        if w:
            text = text.replace(w, name)
    return text


def _load_roi(cfg: ExtractConfig, roi_key: str, slide: SlideReader) -> Roi | None:
    if cfg.roi_dir is None:
        return None
    from gigamil.wsi.qupath import load_roi, roi_path

    w, h = slide.dimensions
    return load_roi(roi_path(cfg.roi_dir, roi_key), w, h, cfg.roi_classes or None)


def _write_geojson(path: Path, plan: SlidePlan, level0_mpp: float, kept: np.ndarray) -> None:
    """Tissue contours and the kept patches of the primary grid, for QuPath."""
    from gigamil.wsi.qupath import patch_features, tissue_features, write_geojson

    grid = plan.grids[0]
    index = {tuple(c): i for i, c in enumerate(grid.coords.tolist())}
    tissue = np.array([grid.tissue[index[tuple(c)]] for c in kept.tolist()], np.float32)
    write_geojson(path, tissue_features(plan.tissue, level0_mpp)
                  + patch_features(kept, grid.size_level0, {"tissue_fraction": tissue}))


def store_meta(
    sid: str, path: Path, slide: SlideReader, plan: SlidePlan, cfg: ExtractConfig,
    rejected: dict[str, dict[str, int]], name: str | None = None,
) -> dict[str, Any]:
    """The ``__meta__`` record of a slide's store: source, resolution, grid, QC, parameters."""
    size, mtime = source_signature(path)
    source: dict[str, Any] = {"name": name or path.name, "size": size, "mtime": mtime}
    if cfg.record_paths:
        source["path"] = str(path.resolve())
    grid = plan.grids[0]
    total: Counter[str] = Counter()
    for c in rejected.values():
        total.update(c)
    return {
        "slide_id": sid,
        "source": source,
        "level0_mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "level0_width": slide.dimensions[0],
        "level0_height": slide.dimensions[1],
        "objective_power": slide.objective_power,
        "target_mpp": grid.spec.mpp,
        "patch_size": grid.spec.patch_size,
        "scales": [g.spec.mpp for g in plan.grids],
        "read_level": grid.level,
        "read_size": grid.read_size,
        "patch_size_level0": grid.size_level0,
        "n_grid": grid.n_candidates,
        "n_tissue_patches": len(grid),
        "tissue_fraction": round(plan.tissue.fraction, 5),
        "qc_rejected": rejected,
        "qc_rejected_total": dict(total),
        "qc_unreadable": total[UNREADABLE],
        "stain_norm": None if plan.normalizer is None else plan.normalizer.name,
        "backend": slide.backend,
        "format": slide.format,
        "params": cfg.output_params(),
        "versions": {"gigamil": gigamil_version(), **package_versions()},
    }


def preview_slide(
    path: str | os.PathLike[str], cfg: ExtractConfig, backend: str | None = None, threads: int = 1
) -> tuple[np.ndarray, dict[str, int]]:
    """What ``extract`` would do to one slide, as a picture and counts, without writing a store."""
    path = Path(path)
    sid = slide_id(path)
    with open_slide(path, backend or cfg.backend, cfg.mpp_override) as slide:
        plan = plan_slide(slide, dataclasses.replace(cfg, stain_norm=None, stain_reference=None),
                          sid)
        grid = plan.grids[0]
        assert plan.thumb is not None
        reasons: list[str] = []
        for run in process_grid(slide, grid, cfg, None, threads, encode=False):
            reasons.extend(run.reasons)
        scale = plan.thumb.shape[1] / slide.dimensions[0]
        image = extraction_preview(plan.thumb, plan.tissue.mask, grid.coords, grid.size_level0,
                                   scale, reasons, title=sid)
    counts = Counter(r or "kept" for r in reasons)
    return image, {"grid": grid.n_candidates, "tissue": len(grid), **counts}
