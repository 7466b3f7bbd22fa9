"""Training throughput: padded batches of bags against the batch-size-1 loop (CLAM's).

    .venv/bin/python benchmarks/train.py [--bags 240] [--dim 1024] [--epochs 6] [--device cpu]

Same synthetic bags (in memory for both, on the GPU when it runs on one), same ABMIL model:

- CLAM-style loop: one bag per forward/backward/optimizer step;
- gigamil: ``FoldTrainer`` with padded batches of 16 and a mask, plain and with
  ``--bucket`` (bags of similar length batched together).

Prints the mean epoch time after the first epoch, the ratio (target ≥ 3×), each run's
test AUROC, and peak RSS. With ``--device cuda --precision bf16`` it reports bags/s on a GPU.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gigamil.cluster.checkpoint import CheckpointManager
from gigamil.mil.fold import FoldTrainer
from gigamil.mil.labels import match_features, read_labels
from gigamil.mil.metrics import binary_auroc
from gigamil.mil.models import create_model
from gigamil.mil.splits import make_folds
from gigamil.mil.train import feature_dim
from gigamil.mil.train_config import TrainConfig, autocast_dtype
from gigamil.synth.bags import make_feature_bags


def clam_loop(train_bags: list[tuple[torch.Tensor, int]], test_bags: list[tuple[torch.Tensor, int]],
              dim: int, epochs: int, device: torch.device, precision: str) -> tuple[float, float]:
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=dim, n_classes=2).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    dtype = autocast_dtype(precision)
    train_bags = [(x.to(device), y) for x, y in train_bags]  # the fastest bs-1 loop: data on device
    times = []
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(train_bags))
        model.train()
        t = time.perf_counter()
        for i in order:
            x, y = train_bags[i]
            x = x[None]
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
            loss = F.cross_entropy(out.logits.float(), torch.tensor([y], device=device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    model.eval()
    with torch.no_grad():
        scores = [torch.softmax(model(x.to(device)[None]).logits.float(), -1)[0, 1].item()
                  for x, _ in test_bags]
    auc = binary_auroc(np.array([y for _, y in test_bags]) == 1, np.array(scores))
    return float(np.mean(times[1:])), auc


def gigamil_loop(feats: Path, out: Path, epochs: int, bucket: bool, device: torch.device,
                 precision: str, batch: int) -> tuple[float, float]:
    cfg = TrainConfig(features=str(feats), labels=str(feats / "labels.csv"), out=str(out),
                      epochs=epochs, batch_size=batch, lr=1e-3, bucket=bucket, preload=True,
                      precision=precision, max_instances=None, early_stop=None, val_frac=0.0)
    table, paths = match_features(read_labels(cfg.labels), cfg.features)
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
    return float(np.mean(times[1:])), metrics["auroc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bags", type=int, default=240)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--min-len", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="gigamil-bench-train-") as tmp:
        feats = Path(tmp) / "feats"
        make_feature_bags(feats, n_slides=args.bags, dim=args.dim,
                          bag_size=(args.min_len, args.max_len), signal=0.5, seed=0)
        cfg = TrainConfig(features=str(feats), labels=str(feats / "labels.csv"), out=tmp)
        table, paths = match_features(read_labels(cfg.labels), cfg.features)
        fold = make_folds(table, 4, seed=0, val_frac=0.0)[0]
        from gigamil.wsi.features import read_bag

        def load(ids: tuple[str, ...]) -> list[tuple[torch.Tensor, int]]:
            by_id = table.by_id()
            return [(torch.from_numpy(read_bag(paths[i]).features), table.target(by_id[i]))
                    for i in ids]

        train_bags, test_bags = load(fold.train), load(fold.test)
        n_inst = sum(len(x) for x, _ in train_bags)
        print(f"{len(train_bags)} training bags ({n_inst} instances, {args.min_len}-{args.max_len} "
              f"per bag, dim {args.dim}), {len(test_bags)} test bags, {args.epochs} epochs, "
              f"{device} {args.precision}, {torch.get_num_threads()} threads")
        t1, auc1 = clam_loop(train_bags, test_bags, args.dim, args.epochs, device, args.precision)
        tb, aucb = gigamil_loop(feats, Path(tmp) / "a", args.epochs, False, device,
                                args.precision, args.batch_size)
        tk, auck = gigamil_loop(feats, Path(tmp) / "b", args.epochs, True, device,
                                args.precision, args.batch_size)
    n = len(train_bags)
    print(f"{'path':34s} {'s/epoch':>8s} {'bags/s':>8s} {'vs bs1':>7s} {'test AUROC':>10s}")
    for name, t, auc in [("batch size 1 (CLAM loop)", t1, auc1),
                         (f"gigamil batch {args.batch_size} padded", tb, aucb),
                         (f"gigamil batch {args.batch_size} bucketed", tk, auck)]:
        print(f"{name:34s} {t:8.3f} {n / t:8.1f} {t1 / t:6.2f}x {auc:10.3f}")
    print(f"target: padded batch ≥ 3× the batch-size-1 loop -> "
          f"{'ok' if t1 / tb >= 3 else 'SHORT'} ({t1 / tb:.2f}x; bucketed {t1 / tk:.2f}x)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MB" + (f", peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()
