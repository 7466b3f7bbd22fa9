from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gigamil.errors import MissingMppError, SlideOpenError, UpsampleError, UsageError
from gigamil.wsi.metadata import Level, choose_level, slide_id
from gigamil.wsi.reader import CuCIMReader, OpenSlideReader, cucim_available, open_slide
from gigamil.wsi.slide import resize_area
from tests.conftest import H, W, tiff_tile

BACKENDS = ["openslide", pytest.param("cucim", marks=pytest.mark.skipif(
    not cucim_available(), reason="cucim not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata(cohort: Path, backend: str) -> None:
    with open_slide(cohort / "s000.svs", backend) as slide:
        assert slide.backend == backend
        assert slide.dimensions == (W, H)
        assert slide.mpp == pytest.approx(0.25)
        assert slide.objective_power == pytest.approx(40)
        assert slide.vendor == "aperio"
        assert [lv.downsample for lv in slide.levels] == [1.0, 4.0]
        assert slide.levels[1].mpp == pytest.approx(1.0)
        # associated images are listed by name; the fake-PHI label is there but never read
        assert "label" in slide.associated_names
        info = slide.describe()
        assert info["file"] == "s000.svs" and str(cohort) not in str(info)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_region_matches_raw_tiff_decode(cohort: Path, backend: str) -> None:
    path = cohort / "s001.svs"
    with open_slide(path, backend) as slide:
        region = slide.read_region(0, 1536, 1024, 300, 300)
    assert region.dtype == np.uint8 and region.shape == (300, 300, 3)
    np.testing.assert_array_equal(region, tiff_tile(path, 1536, 1024, 300))


@pytest.mark.skipif(not cucim_available(), reason="cucim not installed")
def test_cucim_matches_openslide_on_every_level(cohort: Path) -> None:
    path = cohort / "s002.svs"
    with OpenSlideReader(path) as a, CuCIMReader(path) as b:
        for level in range(len(a.levels)):
            np.testing.assert_array_equal(
                a.read_region(level, 100, 60, 257, 129), b.read_region(level, 100, 60, 257, 129)
            )


def test_auto_backend_reads_tiff_tiles_directly(cohort: Path) -> None:
    with open_slide(cohort / "s000.svs", "auto") as slide:
        assert slide.backend == "tiles"
        assert slide.format == "aperio"
        assert slide.describe()["format"] == "aperio"


def test_missing_mpp_names_the_override(bad_slides: Path) -> None:
    with open_slide(bad_slides / "nompp.tiff", "openslide") as slide:
        with pytest.raises(MissingMppError, match="--mpp-override"):
            _ = slide.mpp
    with open_slide(bad_slides / "nompp.tiff", "openslide", mpp_override=0.5) as slide:
        assert slide.mpp == 0.5
        assert slide.levels[1].mpp == pytest.approx(2.0)


def test_not_a_slide_is_a_clear_error(bad_slides: Path) -> None:
    with pytest.raises(SlideOpenError, match="not a readable slide"):
        open_slide(bad_slides / "notaslide.svs", "openslide")
    with pytest.raises(SlideOpenError):
        open_slide(bad_slides / "notaslide.svs", "auto")


def test_unknown_backend(cohort: Path) -> None:
    with pytest.raises(UsageError, match="--backend"):
        open_slide(cohort / "s000.svs", "bioformats")


def _levels(mpp0: float, downsamples: list[float]) -> list[Level]:
    return [Level(i, int(10000 / d), int(8000 / d), d, mpp0 * d) for i, d in enumerate(downsamples)]


@pytest.mark.parametrize(
    ("target", "expect_level", "expect_scale"),
    [(0.25, 0, 1.0), (0.5, 0, 2.0), (1.0, 1, 1.0), (2.0, 1, 2.0), (4.0, 2, 1.0), (16.0, 2, 4.0),
     (0.252, 0, 1.0)],  # within 1 %: read as is
)
def test_choose_level_picks_coarsest_not_coarser(target: float, expect_level: int,
                                                 expect_scale: float) -> None:
    level, scale = choose_level(_levels(0.25, [1, 4, 16]), target)
    assert (level, scale) == (expect_level, pytest.approx(expect_scale))


def test_upsampling_is_refused_unless_allowed() -> None:
    levels = _levels(0.5, [1, 4])
    with pytest.raises(UpsampleError, match="--allow-upsample"):
        choose_level(levels, 0.25)
    assert choose_level(levels, 0.25, allow_upsample=True) == (0, pytest.approx(0.5))


def test_read_at_mpp_is_whole_slide_thumbnail(cohort: Path) -> None:
    with open_slide(cohort / "s000.svs", "openslide") as slide:
        thumb = slide.read_at_mpp(8.0, block=512)  # small blocks: exercises block seams
        full = slide.read_at_mpp(8.0, block=1 << 20)
    assert thumb.shape == (round(H * 0.25 / 8), round(W * 0.25 / 8), 3)
    assert np.abs(thumb.astype(int) - full).mean() < 1.0


def test_resize_area_shrinks_by_averaging() -> None:
    img = np.zeros((4, 4, 3), np.uint8)
    img[:2, :2] = 200
    out = resize_area(img, 2)
    assert out[0, 0, 0] == 200 and out[1, 1, 0] == 0


@pytest.mark.parametrize(("name", "expected"), [
    ("TCGA-AB-1234.svs", "TCGA-AB-1234"), ("a b;rm -rf x.tiff", "a_b_rm_-rf_x"),
    ("slide.ome.tif", "slide.ome"), ("x.NDPI", "x"),
])
def test_slide_id_is_filesystem_safe(name: str, expected: str) -> None:
    assert slide_id(name) == expected
