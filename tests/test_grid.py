from __future__ import annotations

import numpy as np
import pytest

from gigamil.errors import SlideTooSmallError, UsageError
from gigamil.wsi.grid import GridSpec, make_grid
from gigamil.wsi.metadata import Level
from gigamil.wsi.tissue import TissueMask


def _levels(w: int, h: int, mpp0: float) -> list[Level]:
    return [Level(0, w, h, 1.0, mpp0), Level(1, w // 4, h // 4, 4.0, mpp0 * 4)]


def test_grid_at_half_resolution_reads_level0_and_halves() -> None:
    grid = make_grid(_levels(4096, 2048, 0.25), GridSpec(mpp=0.5, patch_size=256, min_tissue=0))
    assert (grid.level, grid.read_size) == (0, 512)
    assert len(grid) == 8 * 4 == grid.n_candidates
    assert grid.coords[:3].tolist() == [[0, 0], [512, 0], [1024, 0]]
    assert grid.size_level0 == 512


def test_grid_on_a_coarser_level_reports_level0_coords() -> None:
    grid = make_grid(_levels(8192, 8192, 0.25), GridSpec(mpp=2.0, patch_size=256, min_tissue=0))
    assert (grid.level, grid.read_size) == (1, 512)
    assert grid.coords[1].tolist() == [512 * 4, 0]
    np.testing.assert_array_equal(grid.coords, grid.read_xy * 4)


def test_overlap_shrinks_the_stride() -> None:
    grid = make_grid(_levels(2048, 1024, 0.5), GridSpec(mpp=0.5, patch_size=256, overlap=64,
                                                        min_tissue=0))
    xs = np.unique(grid.coords[:, 0])
    assert np.all(np.diff(xs) == 192) and xs[-1] + 256 <= 2048


def test_same_micrometres_at_two_scan_resolutions() -> None:
    a = make_grid(_levels(8000, 6000, 0.25), GridSpec(mpp=0.5, min_tissue=0))
    b = make_grid(_levels(4000, 3000, 0.5), GridSpec(mpp=0.5, min_tissue=0))
    np.testing.assert_array_equal(a.coords * 0.25, b.coords * 0.5)
    assert a.size_level0 * 0.25 == b.size_level0 * 0.5 == 128.0


def test_min_tissue_filters_patches() -> None:
    mask = np.zeros((256, 256), bool)
    mask[:, :64] = True  # left quarter of a 8192-px slide at 0.25 µm/px
    tissue = TissueMask(mask, mpp=8.0)
    grid = make_grid(_levels(8192, 8192, 0.25), GridSpec(mpp=0.5, min_tissue=0.5), tissue)
    assert len(grid) == 4 * 16 and grid.coords[:, 0].max() < 2048
    assert (grid.tissue >= 0.5).all()


def test_slide_smaller_than_a_patch() -> None:
    with pytest.raises(SlideTooSmallError, match="--patch-size"):
        make_grid(_levels(300, 300, 0.25), GridSpec(mpp=0.5))


@pytest.mark.parametrize("kwargs", [{"overlap": 256}, {"min_tissue": 1.5}, {"patch_size": 2},
                                    {"mpp": 0.0}])
def test_bad_grid_options(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        GridSpec(**kwargs)
