from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from gigamil.synth.model import MASK_MPP, SynthConfig, SyntheticSlideModel
from gigamil.synth.slides import load_masks, make_cohort
from gigamil.wsi.reader import open_slide


def test_cohort_layout(cohort: Path) -> None:
    rows = list(csv.DictReader(open(cohort / "labels.csv")))
    assert [r["slide_id"] for r in rows] == ["s000", "s001", "s002", "s003"]
    assert sorted(r["label"] for r in rows) == ["normal", "normal", "tumor", "tumor"]
    assert rows[0]["patient_id"] == rows[1]["patient_id"] != rows[2]["patient_id"]
    for r in rows:
        masks, mpp = load_masks(cohort / "masks" / r["slide_id"])
        assert mpp == MASK_MPP
        assert masks["tumor"].any() == (r["label"] == "tumor")
        assert not (masks["tumor"] & ~masks["tissue"]).any()  # tumour lies inside tissue
        assert 0.2 < masks["tissue"].mean() < 0.7
        assert (cohort / "masks" / f"{r['slide_id']}.png").exists()


def test_same_seed_same_pixels_and_rerun_keeps_slides(tmp_path: Path) -> None:
    a = make_cohort(tmp_path / "a", n=1, width=1024, height=768, seed=3)[0]
    b = make_cohort(tmp_path / "b", n=1, width=1024, height=768, seed=3)[0]
    with open_slide(a, "openslide") as sa, open_slide(b, "openslide") as sb:
        np.testing.assert_array_equal(sa.read_region(0, 0, 0, 1024, 768),
                                      sb.read_region(0, 0, 0, 1024, 768))
    mtime = a.stat().st_mtime_ns
    make_cohort(tmp_path / "a", n=1, width=1024, height=768, seed=3)
    assert a.stat().st_mtime_ns == mtime  # already complete: not rewritten


def test_tumor_nuclei_are_darker_and_denser() -> None:
    model = SyntheticSlideModel(SynthConfig(width=2048, height=2048, tumor=True, seed=1))
    normal, tumor, *_ = model.textures(0.5)
    assert tumor.mean() < normal.mean() - 10  # more purple, darker


def test_pen_and_blur_are_planted() -> None:
    model = SyntheticSlideModel(SynthConfig(width=8192, height=8192, seed=2, pen_marks=True,
                                            blur=True))
    assert model.masks["pen_blue"].max() > 0.9 and model.masks["blur"].max() > 0.9


def test_tiles_are_rendered_independently_of_region_size() -> None:
    """Rendering tile by tile equals rendering the whole region: slides stream, never sit in memory."""
    model = SyntheticSlideModel(SynthConfig(width=2048, height=2048, tumor=True, seed=5))
    whole = model.render(0.25, 0, 0, 512, 512)
    tiles = np.vstack([np.hstack([model.render(0.25, x, y, 256, 256) for x in (0, 256)])
                       for y in (0, 256)])
    assert np.abs(whole.astype(int) - tiles).max() <= 1


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_resolution_is_recorded(tmp_path: Path, mpp: float) -> None:
    path = make_cohort(tmp_path, n=1, width=1024, height=1024, mpp=mpp)[0]
    with open_slide(path, "openslide") as slide:
        assert slide.mpp == pytest.approx(mpp)
        assert slide.objective_power == pytest.approx(10 / mpp)
