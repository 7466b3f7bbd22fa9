"""Vendor TIFFs read directly by the ``tiles`` backend: Hamamatsu NDPI (tifffile splits
each level's JPEG strip at its restart markers; the intervals are decoded strictly)
and Philips TIFF (padded reduced levels trimmed to their true size). The same pixels
as openslide on every level, damaged tiles left out and counted, label and macro
never read."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from gigamil.synth.model import SynthConfig
from gigamil.synth.ndpi import write_ndpi
from gigamil.synth.philips import PHILIPS_BARCODE, write_philips_tiff
from gigamil.synth.slides import damage_tile
from gigamil.wsi.extract import extract_slide
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.reader import open_slide
from gigamil.wsi.store import PatchStore

FORMATS = {"ndpi": (".ndpi", write_ndpi, ["macro"]),
           "philips": (".tiff", write_philips_tiff, ["label", "macro"])}


@pytest.fixture(scope="module", params=sorted(FORMATS))
def vendor(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[str, Path]:
    suffix, write, _ = FORMATS[request.param]
    out = tmp_path_factory.mktemp(request.param) / f"case{suffix}"
    write(out, SynthConfig(width=3100, height=2333, seed=5, tumor=True, tissue_fraction=0.5))
    return request.param, out


def _openslide_level(path: Path, level: int) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        w, h = s.level_dimensions[level]
        return np.asarray(s.read_region((0, 0), level, (w, h)).convert("RGB"))


def test_vendor_tiff_is_read_directly_with_openslides_pixels(vendor: tuple[str, Path]) -> None:
    fmt, ndpi = vendor
    with open_slide(ndpi) as slide:
        assert (slide.backend, slide.format) == ("tiles", fmt)
        assert slide.associated_names == FORMATS[fmt][2]
        assert slide.mpp == pytest.approx(0.25)
        assert [lv.downsample for lv in slide.levels] == [1.0, 2.0, 4.0]  # until ~512 px
        w0, h0 = slide.dimensions
        assert (w0 % 64, h0 % 32) == (0, 0)  # whole MCUs (NDPI) or tiles (Philips) per level
        for level in range(3):
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


def test_vendor_tiff_extraction_equals_openslides(vendor: tuple[str, Path],
                                                   tmp_path: Path) -> None:
    fmt, ndpi = vendor
    stores = {}
    for backend in ("auto", "openslide"):
        cfg = ExtractConfig(mpp=0.5, patch_size=128, encoding="raw",
                            backend=backend)  # type: ignore[arg-type]
        res = extract_slide(ndpi, tmp_path / backend, cfg)
        assert res.status == "ok", res.error
        with PatchStore(tmp_path / backend / "patches" / f"{ndpi.stem}.lmdb") as store:
            stores[backend] = (store.coords.copy(), np.stack([store[i] for i in range(len(store))]))
            assert store.meta["backend"] == ("tiles" if backend == "auto" else "openslide")
    (c_auto, p_auto), (c_os, p_os) = stores["auto"], stores["openslide"]
    assert len(c_auto) > 20
    np.testing.assert_array_equal(c_auto, c_os)
    np.testing.assert_array_equal(p_auto, p_os)


def test_damaged_tile_is_left_out_and_counted(vendor: tuple[str, Path], tmp_path: Path) -> None:
    fmt, ndpi = vendor
    bad = tmp_path / ndpi.name
    shutil.copy(ndpi, bad)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[1]  # level 1 = 0.5 µm/px (for NDPI, its tiles are restart intervals)
        tw, th = int(page.tilewidth), int(page.tilelength)
        across = -(-int(page.imagewidth) // tw)
        ty, tx = int(page.imagelength) // th // 2, across // 2
    damage_tile(bad, 1, ty * across + tx, "garbage")
    cfg = dict(mpp=0.5, patch_size=128, encoding="raw")
    clean = extract_slide(ndpi, tmp_path / "clean", ExtractConfig(**cfg))  # type: ignore[arg-type]
    assert clean.status == "ok" and clean.qc.get("unreadable", 0) == 0
    with PatchStore(tmp_path / "clean" / "patches" / f"{ndpi.stem}.lmdb") as store:
        good = {tuple(c): store[i] for i, c in enumerate(store.coords.tolist())}
    counts = {}
    for backend in ("tiles", "openslide"):
        res = extract_slide(bad, tmp_path / backend,
                            ExtractConfig(**cfg, backend=backend))  # type: ignore[arg-type]
        assert res.status == "ok", (backend, res.error)
        assert res.qc.get("unreadable", 0) > 0 and "cannot be decoded" in res.note
        counts[backend] = res.qc["unreadable"]
        with PatchStore(tmp_path / backend / "patches" / f"{ndpi.stem}.lmdb") as store:
            assert store.meta["qc_unreadable"] == res.qc["unreadable"]
            coords = [tuple(c) for c in store.coords.tolist()]
            assert len(coords) == len(good) - res.qc["unreadable"]
            for i, (x, y) in enumerate(coords):  # level-0 coordinates; the interval at level 1
                lx, ly = x // 2, y // 2
                assert not (lx < (tx + 1) * tw and tx * tw < lx + 128
                            and ly < (ty + 1) * th and ty * th < ly + 128), (x, y)
                np.testing.assert_array_equal(store[i], good[(x, y)])  # no garbage pixel
    assert len(set(counts.values())) == 1, counts


def test_philips_barcode_label_and_macro_stay_out_of_outputs(tmp_path: Path) -> None:
    path = tmp_path / "case.tiff"  # the Philips XML carries the barcode and the label
    write_philips_tiff(path, SynthConfig(width=2000, height=1600, seed=6, tissue_fraction=0.5))
    res = extract_slide(path, tmp_path / "out", ExtractConfig(mpp=0.5, patch_size=128,
                                                              previews=True))
    assert res.status == "ok", res.error
    secrets = [PHILIPS_BARCODE.encode(), base64.b64encode(PHILIPS_BARCODE.encode()),
               b"PIM_DP", b"DPUfsImport"]
    files = [f for f in (tmp_path / "out").rglob("*") if f.is_file()]
    assert files
    for f in files:
        data = f.read_bytes()
        for secret in secrets:
            assert secret not in data, (f, secret)
