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
from gigamil.wsi.features import write_bag

__all__ = ["make_feature_bags", "make_outcome_bags"]


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
