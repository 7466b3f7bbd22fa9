"""Hamamatsu NDPI read directly (tifffile splits each level's JPEG strip at its restart
markers; the intervals are decoded strictly): the same pixels as openslide on every
level, damaged intervals left out and counted, the macro image never read."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from gigamil.synth.model import SynthConfig
from gigamil.synth.ndpi import write_ndpi
from gigamil.synth.slides import damage_tile
from gigamil.wsi.extract import extract_slide
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.reader import open_slide
from gigamil.wsi.store import PatchStore


@pytest.fixture(scope="module")
def ndpi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ndpi") / "case.ndpi"
    write_ndpi(out, SynthConfig(width=3100, height=2333, seed=5, tumor=True,
                                tissue_fraction=0.5))
    return out


def _openslide_level(path: Path, level: int) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        w, h = s.level_dimensions[level]
        return np.asarray(s.read_region((0, 0), level, (w, h)).convert("RGB"))


def test_ndpi_is_read_directly_with_openslides_pixels(ndpi: Path) -> None:
    with open_slide(ndpi) as slide:
        assert (slide.backend, slide.format) == ("tiles", "ndpi")
        assert slide.associated_names == ["macro"]
        assert slide.mpp == pytest.approx(0.25)
        assert [lv.downsample for lv in slide.levels] == [1.0, 2.0, 4.0, 8.0]
        w0, h0 = slide.dimensions
        assert (w0 % 128, h0 % 64) == (0, 0)  # whole MCUs on every level, as openslide needs
        for level in range(4):
            ref = _openslide_level(ndpi, level)
            h, w = ref.shape[:2]
            assert (w, h) == (slide.levels[level].width, slide.levels[level].height)
            np.testing.assert_array_equal(slide.read_region(level, 0, 0, w, h), ref,
                                          err_msg=f"level {level}")
            for x, y, rw, rh in [(37, 13, 300, 150), (w // 2 - 7, 3, w // 2, 29), (w - 90, h - 50, 90, 50)]:
                np.testing.assert_array_equal(slide.read_region(level, x, y, rw, rh),
                                              ref[y:y + rh, x:x + rw])
            edge = slide.read_region(level, w - 20, h - 10, 40, 30)  # white outside the level
            np.testing.assert_array_equal(edge[:10, :20], ref[h - 10:, w - 20:])
            assert (edge[10:] == 255).all() and (edge[:, 20:] == 255).all()


def test_ndpi_extraction_equals_openslides(ndpi: Path, tmp_path: Path) -> None:
    stores = {}
    for backend in ("auto", "openslide"):
        cfg = ExtractConfig(mpp=0.5, patch_size=128, encoding="raw",
                            backend=backend)  # type: ignore[arg-type]
        res = extract_slide(ndpi, tmp_path / backend, cfg)
        assert res.status == "ok", res.error
        with PatchStore(tmp_path / backend / "patches" / "case.lmdb") as store:
            stores[backend] = (store.coords.copy(), np.stack([store[i] for i in range(len(store))]))
            assert store.meta["backend"] == ("tiles" if backend == "auto" else "openslide")
    (c_auto, p_auto), (c_os, p_os) = stores["auto"], stores["openslide"]
    assert len(c_auto) > 20
    np.testing.assert_array_equal(c_auto, c_os)
    np.testing.assert_array_equal(p_auto, p_os)


def test_damaged_ndpi_interval_is_left_out_and_counted(ndpi: Path, tmp_path: Path) -> None:
    bad = tmp_path / "case.ndpi"
    shutil.copy(ndpi, bad)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[1]  # level 1 = 0.5 µm/px
        tw, th = int(page.tilewidth), int(page.tilelength)
        across = -(-int(page.imagewidth) // tw)
        ty, tx = int(page.imagelength) // th // 2, across // 2
    damage_tile(bad, 1, ty * across + tx, "garbage")
    cfg = dict(mpp=0.5, patch_size=128, encoding="raw")
    clean = extract_slide(ndpi, tmp_path / "clean", ExtractConfig(**cfg))  # type: ignore[arg-type]
    assert clean.status == "ok" and clean.qc.get("unreadable", 0) == 0
    with PatchStore(tmp_path / "clean" / "patches" / "case.lmdb") as store:
        good = {tuple(c): store[i] for i, c in enumerate(store.coords.tolist())}
    counts = {}
    for backend in ("tiles", "openslide"):
        res = extract_slide(bad, tmp_path / backend,
                            ExtractConfig(**cfg, backend=backend))  # type: ignore[arg-type]
        assert res.status == "ok", (backend, res.error)
        assert res.qc.get("unreadable", 0) > 0 and "cannot be decoded" in res.note
        counts[backend] = res.qc["unreadable"]
        with PatchStore(tmp_path / backend / "patches" / "case.lmdb") as store:
            assert store.meta["qc_unreadable"] == res.qc["unreadable"]
            coords = [tuple(c) for c in store.coords.tolist()]
            assert len(coords) == len(good) - res.qc["unreadable"]
            for i, (x, y) in enumerate(coords):  # level-0 coordinates; the interval at level 1
                lx, ly = x // 2, y // 2
                assert not (lx < (tx + 1) * tw and tx * tw < lx + 128
                            and ly < (ty + 1) * th and ty * th < ly + 128), (x, y)
                np.testing.assert_array_equal(store[i], good[(x, y)])  # no garbage pixel
    assert len(set(counts.values())) == 1, counts
