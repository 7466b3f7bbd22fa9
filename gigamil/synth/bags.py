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

__all__ = ["make_feature_bags"]


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
