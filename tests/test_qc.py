from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gigamil.wsi.extract import ExtractConfig, extract_slide
from gigamil.wsi.qc import QCConfig, laplacian_variance
from gigamil.wsi.reader import open_slide, resize_area
from gigamil.wsi.store import PatchStore
from gigamil.wsi.synthetic import SynthConfig, load_masks, save_masks, write_synthetic_slide


@pytest.fixture(scope="module")
def marked_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("marked")
    masks = write_synthetic_slide(out / "marked.svs", SynthConfig(
        width=12288, height=10240, seed=21, tumor=True, pen_marks=True, blur=True))
    save_masks(out / "marked", masks)
    return out


def _truth(masks: dict, mpp_mask: float, x: int, y: int, size0: int, mpp0: float) -> dict:
    f = mpp0 / mpp_mask
    sl = (slice(int(y * f), int((y + size0) * f)), slice(int(x * f), int((x + size0) * f)))
    pen = masks["pen_blue"][sl] | masks["pen_green"][sl] | masks["pen_black"][sl]
    return {"pen": pen.mean(), "blur": masks["blur"][sl].mean(), "tissue": masks["tissue"][sl].mean()}


def _precision_recall(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = (pred & truth).sum()
    return tp / max(pred.sum(), 1), tp / max(truth.sum(), 1)


def test_each_filter_against_the_planted_masks(marked_slide: Path, capsys) -> None:
    """Every patch of the full grid is classified by QC and compared to the planted masks.

    A patch is a positive for a filter when the planted region covers more than a share of
    it (pen 25 %: ink matters even on part of a patch; blur and background 75 %: a patch that
    is mostly sharp tissue is a good patch) and a negative when it covers < 2 %; patches in
    between are ambiguous and not scored.
    """
    masks, mpp_mask = load_masks(marked_slide / "marked")
    qc = QCConfig()
    rows = []
    with open_slide(marked_slide / "marked.svs", "openslide") as slide:
        for y in range(0, 10240 - 512 + 1, 512):
            for x in range(0, 12288 - 512 + 1, 512):
                patch = resize_area(slide.read_region(0, x, y, 512, 512), 256)
                t = _truth(masks, mpp_mask, x, y, 512, 0.25)
                rows.append((qc.reason(patch), t))
    report = []
    for reason, share, truth_of in [
        ("pen", 0.25, lambda t: t["pen"]),
        ("blur", 0.75, lambda t: t["blur"] if t["pen"] < 0.02 and t["tissue"] > 0.9 else -1),
        ("background", 0.75, lambda t: 1 - t["tissue"] if t["pen"] < 0.02 else -1),
    ]:
        scored = [(r, truth_of(t)) for r, t in rows if truth_of(t) >= 0]
        scored = [(r, v) for r, v in scored if v > share or v < 0.02]
        pred = np.array([r == reason for r, _ in scored])
        truth = np.array([v > share for _, v in scored])
        p, r = _precision_recall(pred, truth)
        report.append(f"{reason}: precision {p:.2f} recall {r:.2f} (n+={truth.sum()}, n={len(truth)})")
        assert truth.sum() >= 5, reason
        assert p >= 0.9 and r >= 0.8, report[-1]
    with capsys.disabled():
        print("\nQC against planted masks: " + "; ".join(report))


def test_rejections_are_counted_in_manifest_and_meta(marked_slide: Path, tmp_path: Path) -> None:
    res = extract_slide(marked_slide / "marked.svs", tmp_path, ExtractConfig(previews=True))
    assert res.status == "ok" and res.qc.get("pen", 0) > 0 and res.qc.get("blur", 0) > 0
    with PatchStore(tmp_path / "patches" / "marked.lmdb") as store:
        assert store.meta["qc_rejected"]["0.5"] == res.qc
        assert store.meta["n_tissue_patches"] == len(store) + sum(res.qc.values())
        qc = QCConfig()
        assert all(qc.reason(store[i]) == "" for i in range(0, len(store), 7))
    assert (tmp_path / "previews" / "marked.png").stat().st_size > 10_000
    row = res.row()
    assert row["qc_pen"] == res.qc["pen"] and row["qc_blur"] == res.qc["blur"]


def test_filters_can_be_switched_off(marked_slide: Path, tmp_path: Path) -> None:
    off = QCConfig(background_max=None, pen_max=None, blur_min=None)
    res = extract_slide(marked_slide / "marked.svs", tmp_path, ExtractConfig(qc=off))
    assert res.qc == {} and res.n_patches > 0


def test_blank_and_flat_patches() -> None:
    white = np.full((64, 64, 3), 245, np.uint8)
    assert QCConfig().reason(white) == "background"
    assert laplacian_variance(white) == 0.0
    flat_pink = np.full((64, 64, 3), (230, 160, 200), np.uint8)
    assert QCConfig().reason(flat_pink) == "blur"


def test_strip_qc_equals_patch_by_patch(marked_slide: Path) -> None:
    """The fast path (one conversion per region strip) decides like the per-patch path."""
    qc = QCConfig()
    with open_slide(marked_slide / "marked.svs", "openslide") as slide:
        differ = total = 0
        for y in range(0, 10240 - 512 + 1, 1024):
            region = resize_area(slide.read_region(0, 0, y, 12288, 512), (6144, 256))
            strip_reasons = qc.check_strip(region, 24)
            single = qc.check([region[:, i * 256 : (i + 1) * 256] for i in range(24)])
            differ += sum(a != b for a, b in zip(strip_reasons, single))
            total += 24
    assert differ <= total * 0.01, (differ, total)
