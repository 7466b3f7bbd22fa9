"""The direct TIFF tile reader, exact reads on fractional levels, and unreadable tiles.

Every backend is checked against the level's own pixels as tifffile decodes them (the
reference), and a damaged tile must be left out and counted the same way by all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gigamil.errors import UnreadableRegionError
from gigamil.synth.slides import damage_tile
from gigamil.wsi.extract import extract_slide
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.jpeg import strict_jpeg_check, strict_jpeg_decode
from gigamil.wsi.planning import plan_slide, read_runs
from gigamil.wsi.reader import cucim_available, open_slide
from gigamil.wsi.slide import resize_area
from gigamil.wsi.store import PatchStore

BACKENDS = ["tiles", "openslide"] + (["cucim"] if cucim_available() else [])
EXACT = ["tiles"] + (["cucim"] if cucim_available() else [])


def reference_levels(path: Path) -> list[np.ndarray]:
    """Each pyramid level decoded whole by tifffile (small test slides only)."""
    with tifffile.TiffFile(path) as tif:
        return [p.asarray() for p in tif.pages if p.is_tiled]


def crop(level: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    out = np.full((h, w, 3), 255, np.uint8)
    part = level[max(y, 0): y + h, max(x, 0): x + w]
    out[max(-y, 0): max(-y, 0) + part.shape[0], max(-x, 0): max(-x, 0) + part.shape[1]] = part
    return out


def test_levels_are_fractional(odd_slide: Path) -> None:
    with open_slide(odd_slide, "tiles") as slide:
        ds = [lv.downsample for lv in slide.levels]
        assert len(ds) >= 2 and all(abs(d - round(d)) > 1e-4 for d in ds[1:]), ds
        assert slide.format == "aperio" and slide.associated_names == ["label", "thumbnail"]
        slide.read_region(1, 100, 100, 300, 300)
        assert slide._cache_bytes > 0  # edge tiles kept for the next region…
        slide.read_at_mpp(8.0)
        assert slide._cache_bytes == 0 and not slide._cache  # …but not a coarse level's


@pytest.mark.parametrize("backend", EXACT)
def test_exact_backends_return_each_levels_own_pixels(odd_slide: Path, backend: str) -> None:
    refs = reference_levels(odd_slide)
    with open_slide(odd_slide, backend) as slide:
        assert slide.exact_levels
        for level, ref in enumerate(refs):
            h, w = ref.shape[:2]
            for x, y, rw, rh in [(0, 0, 300, 200), (123, 77, 517, 259), (w - 100, h - 60, 100, 60),
                                 (256, 256, 768, 520), (250, 0, 1030, 600)]:  # whole tiles inside
                np.testing.assert_array_equal(slide.read_region(level, x, y, rw, rh),
                                              crop(ref, x, y, rw, rh), err_msg=f"level {level}")
            if backend == "tiles":  # white outside the level
                np.testing.assert_array_equal(slide.read_region(level, w - 50, h - 20, 100, 70),
                                              crop(ref, w - 50, h - 20, 100, 70))


def test_fractional_level_is_read_as_regions_exact_to_its_pixels(odd_slide: Path) -> None:
    cfg = ExtractConfig(mpp=2.0, patch_size=64, encoding="raw", qc=ExtractConfig().qc)
    ref = reference_levels(odd_slide)
    with open_slide(odd_slide, "tiles") as slide:
        plan = plan_slide(slide, cfg, "odd")
        grid = plan.grids[0]
        assert grid.level == 1 and abs(grid.downsample - round(grid.downsample)) > 1e-4
        runs = read_runs(grid, cfg.read_block_px, slide.exact_levels)
        assert max(j - i for i, j in runs) > 1  # never one read per patch
        assert len(runs) < len(grid) / 2
    out = odd_slide.parent / "frac_out"
    res = extract_slide(odd_slide, out, cfg, overwrite=True)
    assert res.status == "ok", res.error
    with PatchStore(out / "patches" / "odd.lmdb") as store:
        assert store.meta["read_level"] == 1
        xy = np.round(store.coords / grid.downsample).astype(int)  # the recorded mapping
        rs = int(store.meta["read_size"])
        for k in range(0, len(store), max(1, len(store) // 25)):
            x, y = xy[k]
            expect = resize_area(crop(ref[1], x, y, rs, rs), 64)
            np.testing.assert_array_equal(store[k], expect)


def _damage_scan_tail(path: Path, index: int, seed: int) -> None:
    """Random bytes (never 0xFF) over the last part of a tile's scan data: libjpeg only
    *warns* about this ("Corrupt JPEG data: … extraneous bytes") and decodes garbage."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        off, n = int(page.dataoffsets[index]), int(page.databytecounts[index])
    junk = np.random.default_rng(seed).integers(0, 0xFF, max(8, n // 16), dtype=np.uint8)
    with open(path, "r+b") as fh:
        fh.seek(off + n - n // 6)
        fh.write(junk.tobytes())


def test_strict_decode_finds_damage_libjpeg_only_warns_about(odd_slide: Path,
                                                              tmp_path: Path) -> None:
    import imagecodecs

    path = tmp_path / "g.svs"
    shutil.copy(odd_slide, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        index = (page.imagelength // 512) * across + across // 2 - 2  # inside the tissue
    _damage_scan_tail(path, index, seed=1)
    with tifffile.TiffFile(path) as tif, open(path, "rb") as fh:
        page = tif.pages[0]
        bad: list[int] = []
        checked_bad: list[int] = []
        for i, (o, n) in enumerate(zip(page.dataoffsets, page.databytecounts)):
            fh.seek(o)
            data = fh.read(n)
            try:
                strict_jpeg_decode(data, page.jpegtables)
            except Exception:
                bad.append(i)
                imagecodecs.jpeg8_decode(data, tables=page.jpegtables)  # lenient: no error
            try:  # the 1/8-scale check (cuCIM, openslide) finds exactly the same tiles
                strict_jpeg_check(data, page.jpegtables)
            except Exception:
                checked_bad.append(i)
    assert bad == checked_bad == [index]


def test_sparse_tiles_are_background_as_openslide_draws_them(odd_slide: Path,
                                                             tmp_path: Path) -> None:
    path = tmp_path / "sparse.svs"
    shutil.copy(odd_slide, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tag = page.tags["TileByteCounts"]
        offset, count = tag.valueoffset, len(page.databytecounts)
        dtype = "<u4" if tag.dtype == 4 else "<u8"
    counts = np.fromfile(path, dtype, count, offset=offset)
    counts[0] = 0  # the top-left tile: no data
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(counts.tobytes())
    with open_slide(path, "tiles") as a, open_slide(path, "openslide") as b:
        np.testing.assert_array_equal(a.read_region(0, 0, 0, 100, 100), np.full((100, 100, 3),
                                                                                 255, np.uint8))
        np.testing.assert_array_equal(a.read_region(0, 0, 0, 100, 100),
                                      b.read_region(0, 0, 0, 100, 100))
    res = extract_slide(path, tmp_path / "o", ExtractConfig(mpp=1.0, patch_size=64))
    assert res.status == "ok" and "unreadable" not in res.qc, (res.error, res.qc)


def test_openslide_reading_from_threads_over_a_damaged_tile_does_not_crash(
        odd_slide: Path, tmp_path: Path) -> None:
    bad = tmp_path / "odd.svs"
    damaged_copy(odd_slide, bad, "zero")
    cfg = ExtractConfig(mpp=0.5, patch_size=128, encoding="raw", backend="openslide")
    one = extract_slide(bad, tmp_path / "a", cfg, threads=1)
    four = extract_slide(bad, tmp_path / "b", cfg, threads=4)
    assert one.status == four.status == "ok", (one.error, four.error)
    assert one.qc == four.qc and one.n_patches == four.n_patches


def damaged_copy(src: Path, dst: Path, mode: str) -> tuple[int, int]:
    """Copy ``src`` and damage the level-0 tile under the middle of its tissue."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tif:
        page = tif.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        ty, tx = page.imagelength // page.tilelength // 2, across // 2
    if mode == "tail":  # decodes with a warning only
        _damage_scan_tail(dst, ty * across + tx, seed=1)
    else:
        damage_tile(dst, 0, ty * across + tx, mode)
    return tx * 256, ty * 256


@pytest.mark.parametrize("mode", ["zero", "garbage", "tail"])
def test_unreadable_tile_is_left_out_and_counted_by_every_backend(
        odd_slide: Path, tmp_path: Path, mode: str) -> None:
    bad = tmp_path / "odd.svs"
    tx, ty = damaged_copy(odd_slide, bad, mode)
    cfg = ExtractConfig(mpp=0.5, patch_size=128, encoding="raw")
    clean = extract_slide(odd_slide, tmp_path / "clean", cfg)
    assert clean.status == "ok"
    with PatchStore(tmp_path / "clean" / "patches" / "odd.lmdb") as store:
        good = {tuple(c): store[i] for i, c in enumerate(store.coords.tolist())}
    counts = {}
    for backend in BACKENDS:
        out = tmp_path / backend
        res = extract_slide(bad, out, ExtractConfig(mpp=0.5, patch_size=128, encoding="raw",
                                                    backend=backend))  # type: ignore[arg-type]
        assert res.status == "ok", (backend, res.error)
        assert res.qc.get("unreadable", 0) > 0, backend
        assert res.row()["qc_unreadable"] == res.qc["unreadable"]
        assert "cannot be decoded" in res.note
        counts[backend] = res.qc["unreadable"]
        with PatchStore(out / "patches" / "odd.lmdb") as store:
            assert store.meta["qc_unreadable"] == res.qc["unreadable"]
            coords = [tuple(c) for c in store.coords.tolist()]
            assert len(coords) == len(good) - res.qc["unreadable"]
            for i, c in enumerate(coords):  # no garbage pixel stored
                if backend != "openslide":
                    np.testing.assert_array_equal(store[i], good[c])
                x, y = c
                assert not (x < tx + 256 and tx < x + 256 and y < ty + 256 and ty < y + 256)
    assert len(set(counts.values())) == 1, counts  # every backend leaves out the same patches


def test_region_over_a_bad_tile_raises_only_there(odd_slide: Path, tmp_path: Path) -> None:
    bad = tmp_path / "z.svs"
    tx, ty = damaged_copy(odd_slide, bad, "zero")
    for backend in BACKENDS:
        with open_slide(bad, backend) as slide:
            with pytest.raises(UnreadableRegionError):
                slide.read_region(0, tx + 10, ty + 10, 64, 64)
            assert slide.read_region(0, tx - 300, ty, 200, 200).shape == (200, 200, 3), backend


def test_slide_whose_level_cannot_be_decoded_fails_with_a_message(
        odd_slide: Path, tmp_path: Path) -> None:
    bad = tmp_path / "odd.svs"
    shutil.copy(odd_slide, bad)
    with tifffile.TiffFile(bad) as tif:
        n = len(tif.pages[2].dataoffsets)
    for k in range(n):
        damage_tile(bad, 2, k, "zero")  # level 1: 1 µm/px
    res = extract_slide(bad, tmp_path / "o", ExtractConfig(mpp=1.0, patch_size=64,
                                                           backend="tiles"))
    # tissue detection falls back to level 0; the patches of level 1 cannot be read at all
    assert res.status == "failed"
    assert "no patch of level 1" in res.error and "copy it again" in res.error
    with open_slide(bad, "tiles") as slide:
        thumb = slide.read_at_mpp(8.0)
        assert thumb.shape[1] == round(slide.dimensions[0] * 0.25 / 8.0)
        assert "level 1 cannot be decoded" in slide.notes[0] and "level 0 instead" in slide.notes[0]
