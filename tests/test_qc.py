from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gigamil.synth.model import SynthConfig
from gigamil.synth.slides import load_masks, save_masks, write_synthetic_slide
from gigamil.wsi.extract import extract_slide
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.planning import plan_slide, process_grid
from gigamil.wsi.qc import QCConfig, laplacian_variance
from gigamil.wsi.reader import open_slide
from gigamil.wsi.slide import resize_area
from gigamil.wsi.store import PatchStore


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
    t = {k: float(masks[k][sl].mean()) for k in ("pen_blue", "pen_green", "pen_black", "blur",
                                                  "tissue")}
    pen = masks["pen_blue"][sl] | masks["pen_green"][sl] | masks["pen_black"][sl]
    return {**t, "pen": float(pen.mean())}


def _precision_recall(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = (pred & truth).sum()
    return tp / max(pred.sum(), 1), tp / max(truth.sum(), 1)


def test_each_filter_against_the_planted_masks(marked_slide: Path, capsys) -> None:
    """Every patch of the full grid is classified by the extraction path (strip QC) and
    compared to the planted masks.

    A patch is a positive for a filter when the planted region covers more than a share of
    it (pen 25 %: ink matters even on part of a patch; blur and background 75 %: a patch that
    is mostly sharp tissue is a good patch) and a negative when it covers < 2 %; patches in
    between are ambiguous and not scored. Each ink colour is scored on its own too.
    """
    masks, mpp_mask = load_masks(marked_slide / "marked")
    cfg = ExtractConfig(min_tissue=0.0, backend="openslide")
    rows = []
    with open_slide(marked_slide / "marked.svs", "openslide") as slide:
        grid = plan_slide(slide, cfg, "marked").grids[0]
        for run in process_grid(slide, grid, cfg, encode=False):
            for i, reason in zip(run.indices, run.reasons):
                x, y = grid.coords[i]
                rows.append((reason, _truth(masks, mpp_mask, int(x), int(y), 512, 0.25)))
    report = []
    for name, reason, share, truth_of in [
        ("pen", "pen", 0.25, lambda t: t["pen"]),
        ("blue ink", "pen", 0.25, lambda t: t["pen_blue"] if t["pen"] - t["pen_blue"] < 0.02 else -1),
        ("green ink", "pen", 0.25, lambda t: t["pen_green"] if t["pen"] - t["pen_green"] < 0.02 else -1),
        ("black ink", "pen", 0.25, lambda t: t["pen_black"] if t["pen"] - t["pen_black"] < 0.02 else -1),
        ("blur", "blur", 0.75, lambda t: t["blur"] if t["pen"] < 0.02 and t["tissue"] > 0.9 else -1),
        ("background", "background", 0.75, lambda t: 1 - t["tissue"] if t["pen"] < 0.02 else -1),
    ]:
        scored = [(r, truth_of(t)) for r, t in rows if truth_of(t) >= 0]
        scored = [(r, v) for r, v in scored if v > share or v < 0.02]
        pred = np.array([r == reason for r, _ in scored])
        truth = np.array([v > share for _, v in scored])
        p, r = _precision_recall(pred, truth)
        report.append(f"{name}: precision {p:.2f} recall {r:.2f} (n+={truth.sum()}, n={len(truth)})")
        assert truth.sum() >= 3, name
        assert r >= 0.8, report[-1]
        if name in ("pen", "blur", "background"):
            assert p >= 0.9, report[-1]
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


@pytest.mark.parametrize("side", [256, 250, 100])
def test_odd_patch_sizes(side: int) -> None:
    rng = np.random.default_rng(side)
    strip = rng.integers(0, 255, (side, 3 * side, 3), dtype=np.uint8)
    strip[:, side : 2 * side] = 245  # a glass patch in the middle
    qc = QCConfig()
    assert qc.check_strip(strip, 3) == qc.check([strip[:, i * side : (i + 1) * side]
                                                 for i in range(3)])
    assert qc.check_strip(strip, 3)[1] == "background"


def test_strip_qc_equals_patch_by_patch(marked_slide: Path) -> None:
    """The fast path (one conversion per region strip) decides exactly like the per-patch path."""
    qc = QCConfig()
    with open_slide(marked_slide / "marked.svs", "openslide") as slide:
        differ = total = 0
        for y in range(0, 10240 - 512 + 1, 1024):
            region = resize_area(slide.read_region(0, 0, y, 12288, 512), (6144, 256))
            strip_reasons = qc.check_strip(region, 24)
            single = qc.check([region[:, i * 256 : (i + 1) * 256] for i in range(24)])
            differ += sum(a != b for a, b in zip(strip_reasons, single))
            total += 24
    assert differ == 0 and total == 24 * 10, (differ, total)


@pytest.mark.parametrize("side", [64, 96, 256])
def test_focus_score_is_the_median_laplacian_variance_of_tissue_blocks(side: int) -> None:
    """The score, computed directly: per 32-px block (a patch's own edge pixels and the
    strip's top and bottom rows zeroed), the variance of the 3×3 Laplacian of the grey
    image; the median over blocks that are mostly tissue (an even count averages the two
    middle ones)."""
    import cv2

    from gigamil.wsi.qc import _focus_scores, _glass, _hsv, _step

    rng = np.random.default_rng(side)
    n = 5
    strip = rng.integers(0, 200, (side, n * side, 3), dtype=np.uint8)
    strip[: side // 3, : 2 * side] = 250  # glass over part of the first two patches
    step = _step(side)
    glass = _glass(_hsv(strip, step))
    grey = cv2.cvtColor(strip, cv2.COLOR_RGB2GRAY).astype(np.float64)
    lap = cv2.Laplacian(grey, cv2.CV_64F, ksize=3)
    lap[0], lap[-1] = 0, 0
    for k in range(n):
        lap[:, k * side], lap[:, k * side + side - 1] = 0, 0
    block, nb = min(32, side), side // min(32, side)
    expected = []
    for k in range(n):
        values = []
        for by in range(nb):
            for bx in range(nb):
                y, x = by * block, k * side + bx * block
                g = glass[y // step:(y + block) // step, x // step:(x + block) // step]
                if g.mean() < 0.5:
                    values.append(lap[y:y + block, x:x + block].var())
        expected.append(np.median(values) if values else 0.0)
    np.testing.assert_allclose(_focus_scores(strip, n, glass, step), expected, rtol=1e-4)
