from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from gigamil.errors import StainFitError, UsageError
from gigamil.wsi.extract import extract_slide
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.reader import open_slide
from gigamil.wsi.slide import resize_area
from gigamil.wsi.stain import create_stain_normalizer
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
    np.testing.assert_array_equal(norm.apply(white), white)  # glass stays exactly glass
    mixed = batch[:2].copy()
    mixed[:, :64] = 250  # half glass, half tissue
    out_mixed = norm.apply(mixed)
    assert (out_mixed[:, :64] == 250).all() and np.isfinite(out_mixed.astype(float)).all()
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


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_fit_on_blank_sample_is_a_clear_error(method: str) -> None:
    norm = create_stain_normalizer(method)
    with pytest.raises(StainFitError, match="stain"):
        norm.fit_slide(np.full((64, 64, 3), 250, np.uint8))


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stain_norm_in_extraction_is_fitted_once_and_recorded(
        method: str, cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gigamil.wsi import stain
    from gigamil.wsi.planning import plan_slide

    cls = stain.STAIN_NORMALIZERS.get(method)
    fits = []
    real_fit = cls.fit_slide
    monkeypatch.setattr(cls, "fit_slide", lambda self, s: (fits.append(1), real_fit(self, s))[1])
    cfg = ExtractConfig(stain_norm=method, encoding="raw", backend="openslide")
    res = extract_slide(cohort / "s000.svs", tmp_path, cfg)
    assert res.status == "ok", res.error
    assert len(fits) == 1  # once per slide, not per patch or batch
    with PatchStore(tmp_path / "patches" / "s000.lmdb") as store, \
            open_slide(cohort / "s000.svs", "openslide") as slide:
        assert store.meta["stain_norm"] == method
        assert store.meta["params"]["stain_norm"] == method
        norm = plan_slide(slide, cfg, "s000").normalizer  # the same deterministic fit
        for i in (0, len(store) // 2):
            x, y = store.coords[i]
            direct = resize_area(slide.read_region(0, int(x), int(y), 512, 512), 256)
            np.testing.assert_array_equal(store[i], norm.apply(direct[None])[0])


def test_reference_without_method_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--stain-norm"):
        ExtractConfig(stain_reference=str(tmp_path / "x.png"))
