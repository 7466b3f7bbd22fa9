"""Training throughput of survival and multi-target runs against classification, same bags.

    .venv/bin/python benchmarks/targets.py [--bags 120] [--dim 512] [--epochs 4] [--device cpu]

One fold, preloaded bags, padded batches of 16, the same ABMIL model; only the heads and
losses differ: classification (msi), survival (nll over 4 time bins; Cox over the
batch), and four targets at once (msi, cms, braf, score:regression). Prints the mean
epoch time after the first epoch, each run's ratio to classification (goal ≤ 1.10), its
test metric, and peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigamil.cluster.checkpoint import CheckpointManager
from gigamil.mil.fold import FoldTrainer
from gigamil.mil.labels import match_features, read_labels
from gigamil.mil.splits import make_folds
from gigamil.mil.targets import build_targets
from gigamil.mil.train import feature_dim
from gigamil.mil.train_config import TrainConfig
from gigamil.synth.bags import make_outcome_bags

RUNS: dict[str, dict[str, Any]] = {
    "classification (msi)": dict(target=("msi",), monitor="auroc"),
    "survival nll": dict(task="survival", survival_loss="nll"),
    "survival cox": dict(task="survival", survival_loss="cox"),
    "4 targets": dict(target=("msi", "cms", "braf", "score:regression")),
}


def epoch_time(feats: Path, out: Path, epochs: int, device: torch.device, precision: str,
               batch: int, **kw: Any) -> tuple[float, dict[str, float]]:
    cfg = TrainConfig(features=str(feats), labels=str(feats / "labels.csv"), out=str(out),
                      epochs=epochs, batch_size=batch, lr=1e-3, preload=True,
                      precision=precision, max_instances=None, early_stop=None, val_frac=0.0,
                      **kw)
    table, paths = match_features(read_labels(cfg.labels, build_targets(cfg)), cfg.features)
    fold = make_folds(table, 4, seed=0, val_frac=0.0)[0]
    trainer = FoldTrainer(cfg, fold, table, paths, feature_dim(next(iter(paths.values()))),
                          CheckpointManager(out), device)
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        trainer.train_epoch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        trainer.progress.epoch += 1
        trainer.progress.batch = 0
    assert trainer.test_set is not None
    _, metrics = trainer.evaluate(trainer.test_set)
    return float(np.mean(times[1:])), metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bags", type=int, default=120)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    device = torch.device(args.device)
    results = {}
    with tempfile.TemporaryDirectory(prefix="gigamil-bench-targets-") as tmp:
        feats = Path(tmp) / "feats"
        make_outcome_bags(feats, n_slides=args.bags, dim=args.dim, bag_size=(200, 1000),
                          signal=1.0, seed=0)
        print(f"{args.bags} bags (200-1000 instances, dim {args.dim}), one fold, "
              f"{args.epochs} epochs, batch {args.batch_size}, {device} {args.precision}, "
              f"{torch.get_num_threads()} threads")
        for i, (name, kw) in enumerate(RUNS.items()):
            results[name] = epoch_time(feats, Path(tmp) / f"r{i}", args.epochs, device,
                                       args.precision, args.batch_size, **kw)
    base = results["classification (msi)"][0]
    print(f"{'run':24s} {'s/epoch':>8s} {'vs class.':>9s}  test metric")
    worst = 0.0
    for name, (t, m) in results.items():
        key = next((k for k in ("auroc", "msi_auroc", "c_index") if k in m), "loss")
        worst = max(worst, t / base)
        print(f"{name:24s} {t:8.3f} {t / base:8.2f}x  {key} {m[key]:.3f}")
    print(f"target: survival and multi-target within 10% of classification -> "
          f"{'ok' if worst <= 1.10 else 'SHORT'} (worst {worst:.2f}x)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MB" + (f", peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()
