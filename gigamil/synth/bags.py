"""Synthetic feature bags with a planted signal, for tests, benchmarks and quick trials.

    paths = make_feature_bags("feats/", n_slides=40, dim=64, seed=0)   # + feats/labels.csv

Each bag holds Gaussian instances; in a positive ("tumor") bag a fraction of the
instances is shifted along a fixed direction, so attention models can find them.
Files are real feature h5 files (``write_bag``), read by the same code as real ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gigamil.io import write_csv
from gigamil.wsi.features import ScaleBag, write_bag

__all__ = ["make_feature_bags", "make_outcome_bags", "make_multiscale_bags"]


def make_feature_bags(out: str | os.PathLike[str], n_slides: int = 40, dim: int = 64,
                      bag_size: tuple[int, int] = (20, 200), positive_frac: float = 0.5,
                      witness_frac: tuple[float, float] = (0.05, 0.3), signal: float = 1.0,
                      n_classes: int = 2, patients_per_slide: float = 1.0, sites: int = 0,
                      seed: int = 0) -> list[Path]:
    """Write ``n_slides`` bags ``b000.h5``… and ``labels.csv`` (slide_id,label,patient_id[,site]).

    ``n_classes > 2`` plants one direction per non-normal class. Classes are
    ``normal``, ``tumor`` (binary) or ``normal``, ``class1``, … ``classK``.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(max(1, n_classes - 1), dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    names = ["normal", "tumor"] if n_classes == 2 else ["normal"] + [
        f"class{c}" for c in range(1, n_classes)]
    n_patients = max(1, round(n_slides / patients_per_slide))
    rows, paths = [], []
    for i in range(n_slides):
        if n_classes == 2:
            target = int(i < round(n_slides * positive_frac))
        else:
            target = i % n_classes
        n = int(rng.integers(bag_size[0], bag_size[1] + 1))
        feats = rng.normal(size=(n, dim)).astype(np.float32)
        if target > 0:
            k = max(1, int(n * rng.uniform(*witness_frac)))
            feats[rng.choice(n, k, replace=False)] += signal * 3 * directions[target - 1]
        coords = np.stack([np.arange(n) % 32, np.arange(n) // 32], 1) * 256
        sid = f"b{i:03d}"
        paths.append(write_bag(out / f"{sid}.h5", feats, coords, {"mpp": 0.5, "patch_size": 256,
                                                                  "encoder": "synthetic"}))
        row = {"slide_id": sid, "label": names[target], "patient_id": f"p{i % n_patients:03d}"}
        if sites:
            row["site"] = f"site{(i % n_patients) % sites}"
        rows.append(row)
    fields = ["slide_id", "label", "patient_id"] + (["site"] if sites else [])
    write_csv(out / "labels.csv", rows, fields)
    return paths


def make_outcome_bags(out: str | os.PathLike[str], n_slides: int = 60, dim: int = 32,
                      bag_size: tuple[int, int] = (20, 120), signal: float = 1.0,
                      missing: float = 0.1, seed: int = 0) -> list[Path]:
    """Bags whose outcomes depend on planted fractions, and ``labels.csv`` with them.

    Each bag plants ``f_k / 2`` of its instances along direction k (``f_k`` ~ U(0, 0.4),
    as recorded). Columns: ``time,event`` (hazard exp(12 f_0 - 2.4), about 30 % censored),
    ``score`` (= 40 f_1 + noise, a TMB-like count), ``msi`` (``high`` when f_2 > 0.2),
    ``cms`` (CMS1…CMS3 by tertile of f_3), ``braf`` (``mut`` when f_0 + f_2 > 0.4; a
    ``missing`` share of its cells left empty), ``patient_id``, and the planted
    fractions ``frac0``…``frac3`` (what an oracle would score with).
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(4, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rows, paths = [], []
    fracs = rng.uniform(0, 0.4, size=(n_slides, 4))
    tertiles = np.quantile(fracs[:, 3], [1 / 3, 2 / 3])
    for i in range(n_slides):
        n = int(rng.integers(bag_size[0], bag_size[1] + 1))
        feats = rng.normal(size=(n, dim)).astype(np.float32)
        order = rng.permutation(n)
        start = 0
        for k in range(4):
            m = int(round(fracs[i, k] * n / 2))  # the four plants share the bag
            feats[order[start:start + m]] += signal * 3 * directions[k]
            start += m
        fracs[i] = [min(1.0, 2 * round(fracs[i, k] * n / 2) / n) for k in range(4)]
        hazard = np.exp(12 * fracs[i, 0] - 2.4)
        time, censor = rng.exponential(1 / hazard), rng.exponential(2.5)
        coords = np.stack([np.arange(n) % 32, np.arange(n) // 32], 1) * 256
        sid = f"o{i:03d}"
        paths.append(write_bag(out / f"{sid}.h5", feats, coords, {"mpp": 0.5, "patch_size": 256,
                                                                  "encoder": "synthetic"}))
        braf = "mut" if fracs[i, 0] + fracs[i, 2] > 0.4 else "wt"
        rows.append({
            "slide_id": sid, "patient_id": f"p{i:03d}",
            "time": f"{min(time, censor) * 365:.1f}", "event": int(time <= censor),
            "score": f"{40 * fracs[i, 1] + rng.normal(0, 0.5):.3f}",
            "msi": "high" if fracs[i, 2] > 0.2 else "low",
            "cms": f"CMS{1 + int(np.searchsorted(tertiles, fracs[i, 3]))}",
            "braf": "" if rng.random() < missing else braf,
            **{f"frac{k}": f"{fracs[i, k]:.5f}" for k in range(4)}})
    write_csv(out / "labels.csv", rows, list(rows[0]))
    return paths


def make_multiscale_bags(out: str | os.PathLike[str], n_slides: int = 60, dim: int = 16,
                         regions: tuple[int, int] = (8, 16), per_region: int = 16,
                         signal: float = 1.0, seed: int = 0) -> list[Path]:
    """Two-scale bags (fine patches at 0.5 µm/px nested 4 × 4 in coarse regions at 2.0)
    whose label lives only in the fine detail of small regions, and ``labels.csv``.

    A third of the regions are of a "tumour" type (a direction in their coarse
    feature). In every slide, two to three small regions hold a focus: 4 to 8 fine
    patches shifted along a fine direction. In a ``tumor`` slide the foci lie in
    tumour regions, in a ``normal`` slide outside them; so the fine patches alone look
    alike in both classes (the same foci), the coarse features alone too (the same
    regions), and only a focus seen together with its region tells them apart.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    d_fine, d_coarse = rng.normal(size=(2, dim))
    d_fine /= np.linalg.norm(d_fine)
    d_coarse /= np.linalg.norm(d_coarse)
    side0 = 256.0  # fine patch side in level-0 px (0.5 µm/px at level 0 = 0.5 µm/px)
    rows, paths = [], []
    for i in range(n_slides):
        target = i % 2
        n_regions = int(rng.integers(regions[0], regions[1] + 1))
        tumour = rng.permutation(n_regions) < max(2, n_regions // 3)
        pool = np.flatnonzero(tumour if target else ~tumour)
        foci = rng.choice(pool, min(len(pool), int(rng.integers(2, 4))), replace=False)
        coarse = rng.normal(size=(n_regions, dim)).astype(np.float32)
        coarse[tumour] += 3 * signal * d_coarse
        fine, fine_xy, parent = [], [], []
        for r in range(n_regions):
            rx, ry = (r % 8) * 4, (r // 8) * 4  # the region's fine-lattice origin
            f = rng.normal(size=(per_region, dim)).astype(np.float32)
            if r in foci:
                f[rng.choice(per_region, int(rng.integers(4, 9)), replace=False)] += \
                    3 * signal * d_fine
            fine.append(f)
            cells = np.arange(per_region)
            fine_xy.append(np.stack([rx + cells % 4, ry + cells // 4], 1) * side0)
            parent.append(np.full(per_region, r))
        coords = np.concatenate(fine_xy).astype(np.int64)
        region_xy = np.stack([(np.arange(n_regions) % 8) * 4,
                              (np.arange(n_regions) // 8) * 4], 1) * side0
        sid = f"m{i:03d}"
        paths.append(write_bag(
            out / f"{sid}.h5", np.concatenate(fine), coords,
            {"mpp": 0.5, "patch_size": 256, "encoder": "synthetic"},
            [ScaleBag(2.0, coarse, region_xy.astype(np.int64), 4 * side0,
                      np.concatenate(parent).astype(np.int64))]))
        rows.append({"slide_id": sid, "label": ["normal", "tumor"][target],
                     "patient_id": f"p{i:03d}"})
    write_csv(out / "labels.csv", rows, ["slide_id", "label", "patient_id"])
    return paths
