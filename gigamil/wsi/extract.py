"""Per-slide patch extraction and its batch driver.

``extract_slide`` runs one slide end to end — open, tissue mask, grid(s),
read, QC, stain normalization, encode, write the LMDB store — and never raises
for a bad slide: it returns a :class:`SlideResult` whose status is ``ok``,
``skipped`` or ``failed``. ``extract_slides`` runs many slides in worker
processes (one slide per process, threads within a slide), writes the
manifest ``extract.csv`` as slides finish, and survives a worker that crashes.

The hot path reads runs of neighbouring patches as one tile-aligned region,
shrinks the whole region at once when the scale factor is an integer (which is
bit-identical to shrinking each patch), and runs reading, QC, normalization
and encoding in a thread pool while the calling thread writes to LMDB.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import logging
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from gigamil.errors import GigamilError, StoreError, UsageError
from gigamil.io import write_csv, write_json
from gigamil.versions import gigamil_version, package_versions
from gigamil.wsi.features import trident_attrs
from gigamil.wsi.grid import GridSpec, PatchGrid, make_grid
from gigamil.wsi.preview import extraction_preview, save_png
from gigamil.wsi.qc import QC_REASONS, QCConfig, pen_mask
from gigamil.wsi.reader import SLIDE_EXTENSIONS, SlideReader, open_slide, resize_area, slide_id
from gigamil.wsi.stain import StainNormalizer, create_stain_normalizer
from gigamil.wsi.store import (
    Encoding,
    PatchStore,
    PatchStoreWriter,
    encode_patch,
    scale_key,
    write_coords_h5,
)
from gigamil.wsi.tissue import TissueMask, detect_tissue

__all__ = [
    "ExtractConfig",
    "SlideResult",
    "SlidePlan",
    "discover_slides",
    "plan_slide",
    "iter_patches",
    "process_grid",
    "extract_slide",
    "extract_slides",
    "preview_slide",
    "store_meta",
    "MANIFEST_FIELDS",
]

log = logging.getLogger("gigamil.extract")

Status = Literal["ok", "skipped", "failed"]
MANIFEST_FIELDS = ["slide_id", "file", "status", "n_patches", "seconds", "error", "note",
                   *(f"qc_{r}" for r in QC_REASONS)]
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ExtractConfig:
    """Every option of ``gigamil extract``; saved with the outputs.

    ``mpp`` may list several scales (``(0.5, 1.0, 2.0)``): aligned grids go into
    the same store, the first one is the primary scale.
    """

    mpp: float | tuple[float, ...] = 0.5
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
    qc: QCConfig = field(default_factory=QCConfig)
    stain_norm: str | None = None
    stain_reference: str | None = None
    coords_h5: bool = False
    previews: bool = False
    record_paths: bool = False
    read_block_px: int = 4096

    def __post_init__(self) -> None:
        if isinstance(self.mpp, (int, float)):
            object.__setattr__(self, "mpp", (float(self.mpp),))
        mpps = tuple(float(m) for m in self.mpp)  # type: ignore[union-attr]
        if not mpps or len(set(mpps)) != len(mpps):
            raise UsageError(f"--mpp {self.mpp} needs distinct values", "e.g. --mpp 0.5,1.0,2.0")
        object.__setattr__(self, "mpp", mpps)
        _ = self.grids  # validates the grid options early
        if self.encoding not in ("jpeg", "png", "raw"):
            raise UsageError(f"--format {self.encoding!r} is not supported", "use jpeg, png or raw")
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError(f"--jpeg-quality {self.jpeg_quality} must be in 1..100")
        if self.mpp_override is not None and not 0.02 < self.mpp_override < 20:
            raise UsageError(f"--mpp-override {self.mpp_override} is not a plausible resolution",
                             "give level-0 µm per pixel, e.g. 0.25 for 40x or 0.5 for 20x")
        if self.stain_norm is not None:
            create_stain_normalizer(self.stain_norm, self.stain_reference)  # fails early
        elif self.stain_reference is not None:
            raise UsageError("--stain-reference needs --stain-norm", "add --stain-norm macenko")

    @property
    def mpps(self) -> tuple[float, ...]:
        return self.mpp  # type: ignore[return-value]

    @property
    def grids(self) -> list[GridSpec]:
        return [GridSpec(m, self.patch_size, self.overlap, self.min_tissue, self.allow_upsample)
                for m in self.mpps]

    def output_params(self) -> dict[str, Any]:
        """The options that determine a store's content (a rerun with others redoes the slide)."""
        skip = {"backend", "coords_h5", "previews", "record_paths", "read_block_px",
                "stain_reference"}
        params = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        params["mpp"] = list(self.mpps)
        if self.stain_reference is not None:
            params["stain_reference_sha256"] = hashlib.sha256(
                Path(self.stain_reference).read_bytes()).hexdigest()
        return params


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
    qc: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id, "file": self.file, "status": self.status,
            "n_patches": self.n_patches, "seconds": round(self.seconds, 3),
            "error": self.error, "note": self.note,
            **{f"qc_{r}": self.qc.get(r, 0) for r in QC_REASONS},
        }


@dataclass
class SlidePlan:
    """What will be cut from one slide: the tissue mask, its thumbnail and a grid per scale."""

    tissue: TissueMask
    thumb: np.ndarray
    grids: list[PatchGrid]
    normalizer: StainNormalizer | None = None


@dataclass
class RunResult:
    """The outcome of one region read: per patch, its grid index, QC reason and bytes."""

    indices: list[int]
    reasons: list[str]
    encoded: list[bytes | None]
    patches: list[np.ndarray] | None = None  # the kept patches, when asked for (no encoding)

    @property
    def kept(self) -> list[int]:
        """Grid indices of the patches that passed QC (the order of ``patches``)."""
        return [i for i, r in zip(self.indices, self.reasons) if not r]

    def rejections(self) -> Counter[str]:
        """QC reason → patches of this run it dropped."""
        return Counter(r for r in self.reasons if r)


def rejection_summary(counts: Mapping[str, int]) -> str:
    """``blur=3;pen=1``: QC rejections by reason, as the manifests and bags record them."""
    return ";".join(f"{k}={v}" for k, v in sorted(counts.items()) if v)


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


# ---- planning -------------------------------------------------------------------


def plan_slide(slide: SlideReader, cfg: ExtractConfig, sid: str) -> SlidePlan:
    """Tissue mask, grids for every scale and (if asked) the slide's fitted stain normalizer."""
    _ = slide.mpp  # fails early, naming --mpp-override
    tissue, thumb = detect_tissue(slide, cfg.tissue_detector, cfg.tissue_mpp)
    grids = [make_grid(slide.levels, spec, tissue, sid) for spec in cfg.grids]
    if len(grids) > 1:
        _check_aligned(grids, sid)
    normalizer = None
    if cfg.stain_norm is not None and len(grids[0]):
        normalizer = create_stain_normalizer(cfg.stain_norm, cfg.stain_reference)
        normalizer.fit_slide(_stain_sample(slide, grids[0], cfg.qc))
    return SlidePlan(tissue, thumb, grids, normalizer)


def _check_aligned(grids: list[PatchGrid], sid: str) -> None:
    """Multi-scale grids must nest: each coarser patch covers whole finer patches."""
    fine = min(grids, key=lambda g: g.spec.mpp)
    for g in grids:
        ratio = g.size_level0 / fine.size_level0
        stride_ok = abs(ratio - round(ratio)) < 1e-6 and g.spec.overlap == 0
        if not stride_ok:
            raise UsageError(
                f"{sid}: --mpp {g.spec.mpp:g} is not an integer multiple of {fine.spec.mpp:g} "
                "(or --overlap is set)", "use scales like 0.5,1.0,2.0 and no overlap")


def _stain_sample(slide: SlideReader, grid: PatchGrid, qc: QCConfig, n: int = 64,
                  seed: int = 0) -> np.ndarray:
    """A mosaic of up to ``n`` of the slide's tissue patches (fixed seed) to fit the stain on.

    Patches that QC rejects are skipped and ink pixels are blanked to glass, so that
    marker ink never becomes a "stain" vector.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(grid))
    tiles: list[np.ndarray] = []
    for i in order[: 4 * n]:
        patch = _read_run(slide, grid, int(i), int(i) + 1)[0][0]
        if qc.reason(patch) == "":
            tiles.append(patch)
            if len(tiles) == n:
                break
    if not tiles:  # everything fails QC: fit on what there is rather than fail
        tiles = [_read_run(slide, grid, int(i), int(i) + 1)[0][0] for i in order[:n]]
    mosaic = np.concatenate(tiles, axis=0).copy()
    mosaic[pen_mask(mosaic)] = 255
    return mosaic


# ---- reading --------------------------------------------------------------------


def read_runs(grid: PatchGrid, max_block_px: int) -> list[tuple[int, int]]:
    """Index ranges [i, j) of the grid read as one region each.

    Runs are neighbours on one grid row. On a level whose downsample is not an
    integer, openslide resamples fractional positions differently for a wide
    region than for one patch, so each patch is then read on its own.
    """
    n = len(grid)
    rs = grid.read_size
    xy = grid.read_xy
    if abs(grid.downsample - round(grid.downsample)) > 1e-9:
        return [(i, i + 1) for i in range(n)]
    runs, i = [], 0
    while i < n:
        x0, y0 = xy[i]
        j = i + 1
        while (j < n and xy[j, 1] == y0 and xy[j, 0] + rs - x0 <= max(max_block_px, rs)
               and xy[j, 0] - xy[j - 1, 0] <= rs):
            j += 1
        runs.append((i, j))
        i = j
    return runs


def _read_run(slide: SlideReader, grid: PatchGrid, i: int, j: int
              ) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Patches i..j-1 of the grid, each exactly as a direct read + area resize would give.

    Also returns the shrunk region when the patches tile it side by side (no gaps,
    no overlap), so that QC can look at the whole strip at once; else None.
    """
    rs, ps = grid.read_size, grid.spec.patch_size
    xy = grid.read_xy
    x0, y0 = int(xy[i, 0]), int(xy[i, 1])
    width = int(xy[j - 1, 0]) + rs - x0
    region = slide.read_region(grid.level, x0, y0, width, rs)
    offsets = [int(xy[k, 0]) - x0 for k in range(i, j)]
    factor = rs / ps
    k = int(round(factor))
    if k >= 1 and abs(factor - k) < 1e-9 and width % k == 0 and all(o % k == 0 for o in offsets):
        # integer shrink factor and aligned offsets: shrinking the region at once is
        # bit-identical to shrinking each patch (area interpolation = k×k box mean)
        small = resize_area(region, (width // k, ps)) if k > 1 else region
        patches = [small[:, o // k : o // k + ps] for o in offsets]
        tiled = small.shape[1] == ps * len(offsets) and all(
            o // k == n * ps for n, o in enumerate(offsets))
        return patches, small if tiled else None
    return [np.ascontiguousarray(resize_area(region[:, o : o + rs], ps)) for o in offsets], None


def iter_patches(slide: SlideReader, grid: PatchGrid, max_block_px: int = 4096) -> Iterator[np.ndarray]:
    """Yield the grid's patches in order (RGB uint8), without QC or normalization."""
    for i, j in read_runs(grid, max_block_px):
        yield from _read_run(slide, grid, i, j)[0]


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """``map`` over a thread pool with bounded look-ahead, results in input order.

    Even with one thread the work runs beside the caller, so that reading and
    decoding overlap with the caller's writes (LMDB commits release the GIL).
    """
    with cf.ThreadPoolExecutor(max(1, threads), thread_name_prefix="gigamil-read") as pool:
        pending: deque[cf.Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * max(1, threads) + 1:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def process_grid(
    slide: SlideReader,
    grid: PatchGrid,
    cfg: ExtractConfig,
    normalizer: StainNormalizer | None = None,
    threads: int = 1,
    encode: bool = True,
    keep_patches: bool = False,
    runs: Sequence[tuple[int, int]] | None = None,
) -> Iterator[RunResult]:
    """Read, QC, normalize and encode the grid's patches (or only ``runs``, a part of
    :func:`read_runs`); results in grid order."""
    qc = cfg.qc

    def work(run: tuple[int, int]) -> RunResult:
        i, j = run
        patches, strip = _read_run(slide, grid, i, j)
        reasons = qc.check_strip(strip, len(patches)) if strip is not None else qc.check(patches)
        kept = [p for p, r in zip(patches, reasons) if not r]
        if normalizer is not None and kept:
            kept = list(normalizer.apply(np.stack(kept)))
        encoded: list[bytes | None] = []
        it = iter(kept)
        for r in reasons:
            if r:
                encoded.append(None)
            else:
                patch = next(it)
                encoded.append(encode_patch(patch, cfg.encoding, cfg.jpeg_quality) if encode else b"")
        return RunResult(list(range(i, j)), reasons, encoded, kept if keep_patches else None)

    todo = read_runs(grid, cfg.read_block_px) if runs is None else runs
    yield from _ordered_map(work, todo, threads)


# ---- one slide ------------------------------------------------------------------


def _current_store(store_path: Path, source: Path, cfg: ExtractConfig
                   ) -> tuple[dict[str, Any], np.ndarray] | None:
    """(meta, coords) if ``store_path`` is a complete store of ``source`` with ``cfg``; else None."""
    try:
        with PatchStore(store_path) as store:
            meta, coords = store.meta, store.coords
            st = source.stat()
            same = (
                meta.get("params") == json_roundtrip(cfg.output_params())
                and meta.get("source", {}).get("size") == st.st_size
                and meta.get("source", {}).get("mtime") == int(st.st_mtime)
                and len(coords) == len(store)
            )
            return (meta, coords) if same else None
    except (StoreError, OSError, ValueError, KeyError):
        return None


def json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists)."""
    import json

    return json.loads(json.dumps(obj))


def _safe_message(exc: BaseException, *paths: Path) -> str:
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


def extract_slide(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: ExtractConfig,
    sid: str | None = None,
    overwrite: bool = False,
    threads: int = 1,
    on_patches: Callable[[int], None] | None = None,
) -> SlideResult:
    """Extract one slide into ``out_dir/patches/<sid>.lmdb``. Never raises for a bad slide."""
    t0 = time.perf_counter()
    path = Path(path)
    sid = sid or slide_id(path)
    out = Path(out_dir)
    store_path = out / "patches" / f"{sid}.lmdb"
    h5_path = out / "coords" / f"{sid}.h5"
    result = SlideResult(sid, path.name, "failed")
    try:
        if store_path.exists() and not store_path.is_file():
            raise UsageError(f"output {store_path.name} exists and is not a file",
                             "remove it or choose another --out")
        if not overwrite and store_path.is_file():
            current = _current_store(store_path, path, cfg)
            if current is not None:
                meta, coords0 = current
                if cfg.coords_h5:  # rewritten from the store: never stale
                    write_coords_h5(h5_path, coords0, trident_attrs(meta))
                result.qc = dict(meta.get("qc_rejected_total", {}))
                result.status, result.n_patches = "skipped", len(coords0)
                result.note = "already extracted with the same parameters"
                return result
        h5_path.unlink(missing_ok=True)  # a store being redone invalidates its coords file
        with open_slide(path, cfg.backend, cfg.mpp_override) as slide:
            plan = plan_slide(slide, cfg, sid)
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
                meta = store_meta(sid, path, slide, plan, cfg, rejected)
                writer.finish(coords, meta)
            if cfg.coords_h5:
                write_coords_h5(h5_path, coords[""], trident_attrs(meta))
            if cfg.previews:
                g = plan.grids[0]
                scale = plan.thumb.shape[1] / slide.dimensions[0]
                image = extraction_preview(plan.thumb, plan.tissue.mask, g.coords, g.size_level0,
                                           scale, primary_reasons, title=sid)
                save_png(out / "previews" / f"{sid}.png", image)
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
        result.note = "; ".join(notes)
    except Exception as exc:  # one bad slide must never stop the batch
        result.error = _safe_message(exc, path, store_path)
        if isinstance(exc, GigamilError):
            log.warning("%s: %s", sid, result.error)
        else:
            log.warning("%s: unexpected error: %s", sid, result.error,
                        exc_info=log.isEnabledFor(logging.DEBUG))
    finally:
        result.seconds = time.perf_counter() - t0
    return result


def store_meta(
    sid: str, path: Path, slide: SlideReader, plan: SlidePlan, cfg: ExtractConfig,
    rejected: dict[str, dict[str, int]],
) -> dict[str, Any]:
    st = path.stat()
    source: dict[str, Any] = {"name": path.name, "size": st.st_size, "mtime": int(st.st_mtime)}
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
        "stain_norm": None if plan.normalizer is None else plan.normalizer.name,
        "backend": slide.backend,
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
        reasons: list[str] = []
        for run in process_grid(slide, grid, cfg, None, threads, encode=False):
            reasons.extend(run.reasons)
        scale = plan.thumb.shape[1] / slide.dimensions[0]
        image = extraction_preview(plan.thumb, plan.tissue.mask, grid.coords, grid.size_level0,
                                   scale, reasons, title=sid)
    counts = Counter(r or "kept" for r in reasons)
    return image, {"grid": grid.n_candidates, "tissue": len(grid), **counts}


# ---- many slides ----------------------------------------------------------------


def _duplicate_failures(paths: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[SlideResult]]:
    """Slides whose ids collide (case-insensitively: macOS/Windows shares) all fail."""
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


def extract_slides(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    cfg: ExtractConfig,
    workers: int = 1,
    overwrite: bool = False,
    on_result: Callable[[SlideResult], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_patches: Callable[[int], None] | None = None,
    shard: tuple[int, int] | None = None,
) -> list[SlideResult]:
    """Extract every slide in ``inputs`` into ``out_dir``; write ``out_dir/extract.csv``.

    ``shard=(k, n)`` takes every n-th slide from the k-th (one SLURM array task) and
    writes ``extract.shard<k>of<n>.csv``; ``gigamil.cluster.slurm`` merges the parts.

    Slides run in worker processes: ``min(workers, slides)`` at a time, each
    with ``workers // processes`` reading threads, so one large slide still
    uses every core. A process that dies (a crash inside a slide library, or
    out of memory) fails only the slide it was on, and the batch goes on.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", "give a directory for the outputs")
    paths = discover_slides(inputs)
    if not paths:
        raise UsageError("no slides found", f"slides need one of: {' '.join(sorted(SLIDE_EXTENSIONS))}")
    manifest = "extract.csv"
    if shard is not None:
        k, n = shard
        paths = paths[k::n]
        manifest = f"extract.shard{k}of{n}.csv"
    for name in ("patches", "coords", "previews"):
        sub = out / name
        if sub.exists() and not sub.is_dir():
            raise UsageError(f"{sub} is a file", "remove it or choose another --out")
    try:
        (out / "patches").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {out}: {exc.strerror}",
                         "give a directory you can write to") from None
    write_json(out / "extract_config.json", {
        "config": dataclasses.asdict(cfg), "versions": {"gigamil": gigamil_version(), **package_versions()},
    })
    jobs, duplicates = _duplicate_failures(paths)
    order = {p.name: i for i, p in enumerate(paths)}
    results: list[SlideResult] = []
    if on_start is not None:
        on_start(len(paths))
    last_write = [0.0]

    def write_manifest() -> None:
        results.sort(key=lambda r: order.get(r.file, 0))
        write_csv(out / manifest, [r.row() for r in results], MANIFEST_FIELDS)
        last_write[0] = time.monotonic()

    def record(res: SlideResult) -> None:
        results.append(res)
        if time.monotonic() - last_write[0] > 2.0:  # not once per slide: cheap on big cohorts
            write_manifest()
        if on_result is not None:
            on_result(res)

    try:
        for res in duplicates:
            record(res)
        processes = max(1, min(workers, len(jobs)))
        threads = max(1, workers // processes)
        _run_pool(jobs, out, cfg, processes, threads, overwrite, record, on_patches)
    finally:
        write_manifest()
    return results


_PROGRESS: Any = None  # in a worker: the queue that patch counts go to


def _worker_init(log_level: int, progress: Any = None, cv2_threads: int = 1) -> None:
    """In each worker: die with the parent (Linux), log like it, report progress to it,
    and let OpenCV use only this worker's share of the cores (no oversubscription)."""
    global _PROGRESS
    _PROGRESS = progress
    if progress is not None:
        # a worker killed while writing must not leave the next ones blocked on the pipe
        progress.cancel_join_thread()
    import cv2

    cv2.setNumThreads(cv2_threads)
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if log_level < logging.WARNING:
        logging.basicConfig(level=log_level, format="%(message)s")
    logging.getLogger("gigamil").setLevel(log_level)


def _extract_in_worker(path: Path, out: Path, cfg: ExtractConfig, sid: str, overwrite: bool,
                       threads: int) -> SlideResult:
    report = _PROGRESS.put if _PROGRESS is not None else None
    return extract_slide(path, out, cfg, sid, overwrite, threads, on_patches=report)


def _run_pool(
    jobs: list[tuple[Path, str]],
    out: Path,
    cfg: ExtractConfig,
    processes: int,
    threads: int,
    overwrite: bool,
    record: Callable[[SlideResult], None],
    on_patches: Callable[[int], None] | None = None,
) -> None:
    """Run ``jobs`` in a process pool; recover from workers that die.

    After a worker dies, the slides that were in flight are retried one at a
    time, so that a second death is that slide's own; such a slide fails.
    """
    queue = deque(jobs)
    crashes: dict[str, int] = {}
    ctx = mp.get_context("spawn")
    level = logging.getLogger("gigamil").getEffectiveLevel()
    progress: Any = None

    def drain() -> None:
        while progress is not None and on_patches is not None:
            try:
                on_patches(progress.get_nowait())
            except Exception:  # queue.Empty
                return

    while queue:
        progress = ctx.Queue() if on_patches is not None else None  # a fresh one per pool
        pool = cf.ProcessPoolExecutor(processes, mp_context=ctx, initializer=_worker_init,
                                      initargs=(level, progress, threads))
        inflight: dict[cf.Future[SlideResult], tuple[Path, str]] = {}
        broken = False
        try:
            while (queue or inflight) and not broken:
                while queue and len(inflight) < processes:
                    if any(crashes.get(j[1]) for j in inflight.values()):
                        break  # a suspect runs alone
                    if crashes.get(queue[0][1]) and inflight:
                        break
                    job = queue.popleft()
                    try:
                        fut = pool.submit(_extract_in_worker, job[0], out, cfg, job[1], overwrite,
                                          threads)
                    except cf.process.BrokenProcessPool:
                        queue.appendleft(job)
                        broken = True
                        break
                    inflight[fut] = job
                if broken or not inflight:
                    break
                done, _ = cf.wait(inflight, timeout=0.25, return_when=cf.FIRST_COMPLETED)
                drain()
                for fut in done:
                    try:
                        res = fut.result()
                    except cf.process.BrokenProcessPool:
                        broken = True
                        continue
                    record(res)
                    del inflight[fut]
            if broken:
                alone = len(inflight) == 1  # then the death was this slide's own
                for fut, job in inflight.items():
                    if fut.done() and fut.exception() is None:
                        record(fut.result())  # finished before the pool broke
                        continue
                    crashes[job[1]] = crashes.get(job[1], 0) + 1
                    if alone:
                        record(SlideResult(
                            job[1], job[0].name, "failed",
                            error="the worker process died on this slide (a crash in the slide "
                                  "library, or out of memory); check the file, or try "
                                  "--backend openslide",
                        ))
                    else:
                        queue.appendleft(job)  # a suspect: retried alone
        finally:
            pool.shutdown(wait=not broken, cancel_futures=True)
            drain()
