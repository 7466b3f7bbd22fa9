"""Planning and reading one slide's patches: grids, stain fit, region runs, the thread map.

:func:`plan_slide` computes the tissue mask, a grid per scale and (if asked)
the slide's fitted stain normalizer. The hot path reads runs of neighbouring
patches as one region (:func:`read_runs`) on every level whose reader returns the
level's own pixels (fractional downsamples included), shrinks the whole region at
once when the scale factor is an integer (which is bit-identical to shrinking each
patch), and :func:`process_grid` runs reading, QC, normalization and encoding in a
thread pool, results in grid order.

A region over a tile that cannot be decoded is read again patch by patch; the
patches that still fail are left out with the reason ``unreadable``, so that no
garbage pixel is ever stored.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from gigamil.errors import UnreadableRegionError, UsageError
from gigamil.memory import release_freed_memory
from gigamil.wsi.extract_config import ExtractConfig, RunResult, SlidePlan
from gigamil.wsi.grid import PatchGrid, make_grid
from gigamil.wsi.qc import QCConfig, pen_mask
from gigamil.wsi.slide import SlideReader, resize_area
from gigamil.wsi.stain import StainNormalizer, create_stain_normalizer
from gigamil.wsi.store_format import encode_patch
from gigamil.wsi.tissue import detect_tissue

if TYPE_CHECKING:
    from gigamil.wsi.qupath import Roi

__all__ = ["UNREADABLE", "plan_slide", "read_runs", "iter_patches", "process_grid"]

T = TypeVar("T")
R = TypeVar("R")


def plan_slide(slide: SlideReader, cfg: ExtractConfig, sid: str, roi: Roi | None = None,
               keep_thumb: bool = True) -> SlidePlan:
    """Tissue mask, grids for every scale (only patches inside ``roi`` when given) and
    (if asked) the slide's fitted stain normalizer. ``keep_thumb``: keep the thumbnail
    tissue was detected on (for previews); without it, its memory is freed at once."""
    _ = slide.mpp  # fails early, naming --mpp-override
    tissue, detected_on = detect_tissue(slide, cfg.tissue_detector, cfg.tissue_mpp,
                                        **cfg.tissue_params)
    thumb = detected_on if keep_thumb else None
    del detected_on
    grids = [make_grid(slide.levels, spec, tissue, sid) for spec in cfg.grids]
    if roi is not None:
        grids = [g.subset(roi.keep(g.coords, g.size_level0, cfg.roi_min_fraction))
                 for g in grids]
    if len(grids) > 1:
        _check_aligned(grids, sid)
    normalizer = None
    if cfg.stain_norm is not None and len(grids[0]):
        normalizer = create_stain_normalizer(cfg.stain_norm, cfg.stain_reference)
        normalizer.fit_slide(_stain_sample(slide, grids[0], cfg.qc))
    release_freed_memory()  # planning's working memory, before the patches are read
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
    readable: list[np.ndarray] = []
    for i in order[: 4 * n]:
        patch = _read_run(slide, grid, int(i), int(i) + 1)[0][0]
        if patch is None:
            continue
        if len(readable) < n:
            readable.append(patch)
        if qc.reason(patch) == "":
            tiles.append(patch)
            if len(tiles) == n:
                break
    if not tiles:  # everything fails QC: fit on what there is rather than fail
        tiles = readable
    if not tiles:
        raise UnreadableRegionError(
            f"none of {min(len(order), 4 * n)} tissue patches sampled to fit the stain on "
            "can be decoded", "the file is damaged; copy it again from the source")
    mosaic = np.concatenate(tiles, axis=0).copy()
    mosaic[pen_mask(mosaic)] = 255
    return mosaic


# ---- reading --------------------------------------------------------------------


#: The QC-like reason of a patch whose pixels cannot be decoded.
UNREADABLE = "unreadable"


def read_runs(grid: PatchGrid, max_block_px: int, exact: bool = True) -> list[tuple[int, int]]:
    """Index ranges [i, j) of the grid read as one region each.

    Runs are neighbours on one grid row. ``exact`` says that the reader returns a
    level's own pixels (:attr:`SlideReader.exact_levels`); where it does not
    (openslide resamples fractional positions differently for a wide region than for
    one patch), each patch of a level with a fractional downsample is read alone.
    """
    n = len(grid)
    rs = grid.read_size
    xy = grid.read_xy
    if not exact and abs(grid.downsample - round(grid.downsample)) > 1e-9:
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
              ) -> tuple[list[np.ndarray | None], np.ndarray | None]:
    """Patches i..j-1 of the grid, each exactly as a direct read + area resize would give;
    None for a patch whose pixels cannot be decoded.

    Also returns the shrunk region when the patches tile it side by side (no gaps,
    no overlap), so that QC can look at the whole strip at once; else None.
    """
    rs, ps = grid.read_size, grid.spec.patch_size
    xy = grid.read_xy
    x0, y0 = int(xy[i, 0]), int(xy[i, 1])
    width = int(xy[j - 1, 0]) + rs - x0
    try:
        region = slide.read_region(grid.level, x0, y0, width, rs)
    except UnreadableRegionError:
        if j - i == 1:
            return [None], None
        return [_read_run(slide, grid, k, k + 1)[0][0] for k in range(i, j)], None
    offsets = [int(xy[k, 0]) - x0 for k in range(i, j)]
    factor = rs / ps
    k = int(round(factor))
    if k >= 1 and abs(factor - k) < 1e-9 and width % k == 0 and all(o % k == 0 for o in offsets):
        # integer shrink factor and aligned offsets: shrinking the region at once is
        # bit-identical to shrinking each patch (area interpolation = k×k box mean)
        small = resize_area(region, (width // k, ps)) if k > 1 else region
        patches: list[np.ndarray | None] = [small[:, o // k : o // k + ps] for o in offsets]
        tiled = small.shape[1] == ps * len(offsets) and all(
            o // k == n * ps for n, o in enumerate(offsets))
        return patches, small if tiled else None
    return [np.ascontiguousarray(resize_area(region[:, o : o + rs], ps)) for o in offsets], None


def iter_patches(slide: SlideReader, grid: PatchGrid, max_block_px: int = 4096
                 ) -> Iterator[np.ndarray | None]:
    """Yield the grid's patches in order (RGB uint8; None where unreadable), without QC
    or normalization."""
    for i, j in read_runs(grid, max_block_px, slide.exact_levels):
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
        read, strip = _read_run(slide, grid, i, j)
        readable = [p for p in read if p is not None]
        checked = iter(qc.check_strip(strip, len(read)) if strip is not None
                       else qc.check(readable) if readable else [])
        reasons = [UNREADABLE if p is None else next(checked) for p in read]
        kept = [p for p, r in zip(read, reasons) if not r and p is not None]
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

    todo = read_runs(grid, cfg.read_block_px, slide.exact_levels) if runs is None else runs
    yield from _ordered_map(work, todo, threads)
