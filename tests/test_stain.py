from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from gigamil.errors import UsageError
from gigamil.wsi.extract import ExtractConfig, extract_slide
from gigamil.wsi.reader import open_slide, resize_area
from gigamil.wsi.stain import StainFitError, create_stain_normalizer
from gigamil.wsi.store import PatchStore


@pytest.fixture(scope="module")
def sample_and_batch(cohort: Path) -> tuple[np.ndarray, np.ndarray]:
    with open_slide(cohort / "s001.svs", "openslide") as slide:
        sample = slide.read_at_mpp(2.0)
        batch = np.stack([resize_area(slide.read_region(0, 2048 + 512 * i, 2048, 512, 512), 256)
                          for i in range(4)])
    return sample, batch


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalizes_batches_without_nan(method: str, sample_and_batch) -> None:
    sample, batch = sample_and_batch
    norm = create_stain_normalizer(method)
    norm.fit_slide(sample)
    out = norm.apply(batch)
    assert out.shape == batch.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - batch).mean() > 1  # it did something
    # white and near-white patches stay (near) white, never NaN or garbage
    white = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (235, 245, 255)])
    w = norm.apply(white)
    assert w.min() >= 225
    # a patch and the same patch inside a batch give the same result: no per-patch fitting
    np.testing.assert_array_equal(norm.apply(batch[:1])[0], out[0])


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_reference_image_moves_colours_towards_it(method: str, sample_and_batch,
                                                  tmp_path: Path) -> None:
    sample, batch = sample_and_batch
    ref = batch[0].copy()
    ref[..., 2] = np.clip(ref[..., 2].astype(int) - 60, 0, 255)  # a yellower stain
    cv2.imwrite(str(tmp_path / "ref.png"), ref[..., ::-1])
    norm = create_stain_normalizer(method, tmp_path / "ref.png")
    norm.fit_slide(sample)
    out = norm.apply(batch)
    tissue = (batch < 200).any(-1)
    assert out[..., 2][tissue].mean() < batch[..., 2][tissue].mean() - 10


def test_fit_on_blank_sample_is_a_clear_error() -> None:
    norm = create_stain_normalizer("macenko")
    with pytest.raises(StainFitError, match="stain"):
        norm.fit_slide(np.full((64, 64, 3), 250, np.uint8))


def test_stain_norm_in_extraction_is_fitted_once_and_recorded(cohort: Path, tmp_path: Path) -> None:
    res = extract_slide(cohort / "s000.svs", tmp_path, ExtractConfig(stain_norm="macenko"))
    assert res.status == "ok", res.error
    with PatchStore(tmp_path / "patches" / "s000.lmdb") as store:
        assert store.meta["stain_norm"] == "macenko"
        assert store.meta["params"]["stain_norm"] == "macenko"
        assert np.isfinite(store[0].astype(float)).all()


def test_reference_without_method_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--stain-norm"):
        ExtractConfig(stain_reference=str(tmp_path / "x.png"))
