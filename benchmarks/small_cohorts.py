"""Training defaults on small cohorts of unnormalized, hand-crafted-looking features.

    .venv/bin/python benchmarks/small_cohorts.py [--seeds 3] [--cohorts musk-like image-like]
        [--configs defaults epochs100 val25 wd1e-2 lr1e-3 auroc no-early-stop] [--folds 5]

Cohorts are synthetic stand-ins for the classic MIL benchmarks (``make_feature_bags``):
``musk-like`` (92 bags of 2-40 instances, 166-d, like Musk1) and ``image-like`` (200
bags of 2-13 instances, 230-d, like Fox/Tiger/Elephant). Every feature dimension is then
multiplied by a log-uniform factor in [1, 1000] and shifted by an offset in [-500, 500],
so that the bags look like unnormalized hand-crafted descriptors (``standardize="auto"``
has to find that out). Each cohort seed draws new bags, a new rescaling and new folds
(``TrainConfig.seed`` = the cohort seed).

Each config is ``TrainConfig``'s defaults with one change (abmil, 5-fold CV, preloaded
bags, one torch thread). Prints, per cohort and config, the pooled test AUROC and
accuracy as mean ± sd over the seeds, their deltas against the defaults (with the sd of
the paired per-seed differences), the mean number of epochs trained per fold, the wall
time per run, and at the end the peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from gigamil.cluster.launch import run_training
from gigamil.mil.train_config import TrainConfig
from gigamil.synth.bags import make_feature_bags

#: name -> make_feature_bags options (the real benchmark it stands in for)
COHORTS: dict[str, dict[str, Any]] = {
    "musk-like": dict(n_slides=92, dim=166, bag_size=(2, 40), witness_frac=(0.1, 0.5),
                      signal=0.8),
    "image-like": dict(n_slides=200, dim=230, bag_size=(2, 13), witness_frac=(0.1, 0.5),
                       signal=0.8),
}

#: name -> the TrainConfig fields that differ from the defaults
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "epochs100": dict(epochs=100, early_stop=20),
    "val25": dict(val_frac=0.25),
    "wd1e-2": dict(weight_decay=1e-2),
    "lr1e-3": dict(lr=1e-3),
    "auroc": dict(monitor="auroc"),
    "no-early-stop": dict(early_stop=None),
}


def unnormalize(bags: Path, seed: int) -> None:
    """Rescale every dimension of every bag by the same random factor and offset."""
    files = sorted(bags.glob("*.h5"))
    with h5py.File(files[0], "r") as f:
        dim = f["features"].shape[1]
    rng = np.random.default_rng(10_000 + seed)
    scale = 10 ** rng.uniform(0, 3, dim)  # log-uniform in [1, 1000]
    offset = rng.uniform(-500, 500, dim)
    for path in files:
        with h5py.File(path, "r+") as f:
            f["features"][...] = (f["features"][...] * scale + offset).astype(np.float32)


def one_run(bags: Path, out: Path, folds: int, bootstrap: int, seed: int,
            changes: dict[str, Any]) -> dict[str, float]:
    cfg = TrainConfig(features=str(bags), labels=str(bags / "labels.csv"), out=str(out),
                      folds=folds, bootstrap=bootstrap, preload=True, seed=seed, **changes)
    epochs: dict[int, int] = defaultdict(int)

    def count(row: dict[str, Any]) -> None:  # called once per epoch trained
        epochs[row["fold"]] += 1

    t = time.perf_counter()
    metrics = run_training(cfg, on_epoch=count)["pooled"]["metrics"]
    return {"auroc": metrics["auroc"]["value"], "acc": metrics["acc"]["value"],
            "epochs": float(np.mean(list(epochs.values()))), "s": time.perf_counter() - t}


def _ms(x: np.ndarray) -> str:
    return f"{x.mean():.3f} ± {x.std(ddof=1) if len(x) > 1 else 0.0:.3f}"


def _delta(x: np.ndarray, base: np.ndarray) -> str:
    d = x - base
    return f"{d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0.0:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="cohort and training seeds 0..N-1")
    ap.add_argument("--cohorts", nargs="+", choices=list(COHORTS), default=list(COHORTS))
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=50)
    ap.add_argument("--signal", type=float, default=None,
                    help="planted signal of every cohort (default: each cohort's own)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = ["defaults"] + [c for c in args.configs if c != "defaults"]
    res: dict[str, dict[str, list[dict[str, float]]]] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gigamil-bench-small-") as tmp:
        for cohort in args.cohorts:
            opts = dict(COHORTS[cohort])
            if args.signal is not None:
                opts["signal"] = args.signal
            res[cohort] = {c: [] for c in configs}
            for seed in range(args.seeds):
                bags = Path(tmp) / f"{cohort}-{seed}"
                make_feature_bags(bags, seed=seed, **opts)
                unnormalize(bags, seed)
                for c in configs:
                    r = one_run(bags, Path(tmp) / f"{cohort}-{seed}-{c}", args.folds,
                                args.bootstrap, seed, CONFIGS[c])
                    res[cohort][c].append(r)
                    print(f"  {cohort} seed {seed} {c:14s} AUROC {r['auroc']:.3f} "
                          f"acc {r['acc']:.3f} epochs/fold {r['epochs']:5.1f} {r['s']:6.1f} s",
                          flush=True)
    print(f"\n{args.seeds} seed(s), {args.folds}-fold CV, abmil, pooled test metrics, "
          f"{args.threads} thread(s); Δ: paired per-seed difference to the defaults")
    head = (f"{'cohort':10s} {'config':14s} {'AUROC':>13s} {'ΔAUROC':>14s} {'acc':>13s} "
            f"{'Δacc':>14s} {'ep/fold':>7s} {'s/run':>6s}")
    print(head)
    print("-" * len(head))
    for cohort, by_cfg in res.items():
        base_auc = np.array([r["auroc"] for r in by_cfg["defaults"]])
        base_acc = np.array([r["acc"] for r in by_cfg["defaults"]])
        for c, runs in by_cfg.items():
            auc = np.array([r["auroc"] for r in runs])
            acc = np.array([r["acc"] for r in runs])
            ep = np.mean([r["epochs"] for r in runs])
            s = np.mean([r["s"] for r in runs])
            d_auc = _delta(auc, base_auc) if c != "defaults" else ""
            d_acc = _delta(acc, base_acc) if c != "defaults" else ""
            print(f"{cohort:10s} {c:14s} {_ms(auc):>13s} {d_auc:>14s} {_ms(acc):>13s} "
                  f"{d_acc:>14s} {ep:7.1f} {s:6.1f}")
    print(f"total {time.perf_counter() - t_all:.0f} s, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
