"""The MIL cross-validation driver: k folds, each trained, tested and written out.

    cfg = TrainConfig(features="data/features/resnet50", labels="labels.csv", out="runs/crc1")
    result = train(cfg, checkpoints=lambda fold: CheckpointManager(...))

This module holds no process-group setup, signal handling or checkpoint file
format: the caller (``gigamil.cluster.launch``) initialises ``torch.distributed``
if it runs several ranks, passes a :class:`~gigamil.mil.fold.Checkpointer` per fold
and a :class:`~gigamil.mil.fold.StopRequest` that its signal handlers set. One fold's
loop is :class:`~gigamil.mil.fold.FoldTrainer`; the files of the run directory are
written by :mod:`gigamil.mil.run_outputs`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gigamil.errors import GigamilError, UsageError
from gigamil.io import write_csv, write_json, write_slide_vectors
from gigamil.layout import RunDir
from gigamil.mil.bags import bag_dim
from gigamil.mil.fold import Checkpointer, FoldTrainer, StopRequest
from gigamil.mil.labels import match_features, read_labels
from gigamil.mil.models import bag_layout
from gigamil.mil.run_outputs import (
    bootstrap_targets,
    calibration_report,
    prediction_fields,
    prediction_rows,
    write_metrics,
    write_summary,
)
from gigamil.mil.splits import make_folds, write_splits
from gigamil.mil.targets import build_targets, layout_targets, target_from_dict
from gigamil.mil.train_config import TrainConfig
from gigamil.versions import package_versions

__all__ = ["RUN_SCHEMA_VERSION", "feature_dim", "train"]

log = logging.getLogger(__name__)

RUN_SCHEMA_VERSION = 1

#: what a run made before targets existed did (its identity lacks these keys): resuming
#: it needs these settings (``--standardize off``)
BEFORE_TARGETS: dict[str, Any] = {
    "task": "classification", "target": None, "target_weights": None, "time_column": "time",
    "event_column": "event", "survival_loss": "nll", "time_bins": 4, "regression_loss": "mse",
    "standardize": "off", "calibrate": "off"}


def feature_dim(path: Path) -> int:
    """The feature dimension of a bag file (from its dataset shape; no data is read)."""
    return bag_dim(path)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _prepare_run(cfg: TrainConfig, out: Path, resume: bool, meta: dict[str, Any]) -> None:
    config_path = RunDir(out).config
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        if not resume:
            raise UsageError(f"{out} already holds a run",
                             "continue it with --resume auto, or choose another --out")
        old = {**BEFORE_TARGETS, **saved.get("identity", {})}  # a run from before targets
        new = cfg.identity()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise UsageError(f"the run in {out} was made with other settings ({', '.join(diff)})",
                             "resume with the original options, or choose another --out")
    write_json(config_path, {"schema_version": RUN_SCHEMA_VERSION, "config": cfg.to_dict(),
                             "identity": cfg.identity(), "versions": package_versions(), **meta})


def train(cfg: TrainConfig, checkpoints: Callable[[int], Checkpointer],
          device: torch.device | None = None, rank: int = 0, world_size: int = 1,
          resume: bool = False, stop: StopRequest | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train every fold (continuing finished work with ``resume``) and write the run directory.

    Returns the summary (also written to ``summary.json``).
    """
    device = device or torch.device("cpu")
    main = rank == 0
    out = Path(cfg.out)
    table = read_labels(cfg.labels, build_targets(cfg))
    table, paths = match_features(table, cfg.features)
    targets = table.targets
    folds = make_folds(table, cfg.folds, cfg.seed, cfg.val_frac, cfg.cv)
    in_dim = bag_dim(next(iter(paths.values())), bag_layout(cfg.model))
    classes = list(getattr(targets[0], "classes", []))
    meta = {"classes": classes, "targets": [t.to_dict() for t in targets], "in_dim": in_dim,
            "n_slides": len(table), "folds": len(folds)}
    if main:
        _prepare_run(cfg, out, resume, meta)
        write_splits(RunDir(out).splits, table, folds)
    _barrier(world_size)
    selected = [f for f in folds if cfg.only_folds is None or f.index in cfg.only_folds]
    results: dict[int, dict[str, Any]] = {}
    for fold in folds:  # results of folds finished earlier (this run or another job)
        done = checkpoints(fold.index).directory / "result.json"
        if done.exists():
            results[fold.index] = json.loads(done.read_text())
    for fold in selected:
        if fold.index in results:
            log.info("fold %d is already finished", fold.index)
            continue
        ckpt = checkpoints(fold.index)
        trainer = FoldTrainer(cfg, fold, table, paths, in_dim, ckpt, device, rank, world_size,
                              stop, on_epoch)
        where = trainer.resume() if resume else None
        if where:
            log.warning("fold %d resumes from %s (epoch %d, step %d)", fold.index, where,
                        trainer.progress.epoch, trainer.progress.step)
        trainer.fit()
        _barrier(world_size)
        best = ckpt.load_best(map_location=device)
        if best is None:
            raise GigamilError(f"fold {fold.index} has no usable best checkpoint in "
                               f"{ckpt.directory}", "rerun with --resume auto to retrain it")
        trainer.model.load_state_dict(best["model"])
        if best["meta"].get("targets"):  # calibrated on the inner validation split
            trainer.targets = layout_targets([target_from_dict(d)
                                              for d in best["meta"]["targets"]])
        result: dict[str, Any] = {"fold": fold.index, "best_epoch": best["epoch"],
                                  "history": trainer.progress.history,
                                  "n": {"train": len(fold.train), "val": len(fold.val),
                                        "test": len(fold.test)}}
        if trainer.test_set is not None:
            preds, _ = trainer.evaluate(trainer.test_set, embeddings=True)
            y = trainer.test_set.targets[preds.index]
            data = [(y[:, t.columns], t.scores(preds.logits[:, t.outputs]))
                    for t in trainer.targets]
            ci = bootstrap_targets(trainer.targets, data, cfg.bootstrap, cfg.seed)
            result["test_ci"] = {k: list(v) for k, v in ci.items()}
            result["calibration"] = calibration_report(trainer.targets, y, preds.logits)
            if main:
                ids = [fold.test[i] for i in preds.index]
                write_csv(RunDir(out).predictions(fold.index),
                          prediction_rows(table, trainer.targets, ids, preds.logits,
                                          preds.n_instances, fold.index, cfg.model),
                          prediction_fields(trainer.targets))
                if preds.embedding is not None:
                    write_slide_vectors(RunDir(out).embeddings(fold.index), ids,
                                        preds.embedding, {"model": cfg.model, "fold": fold.index})
        results[fold.index] = result
        if main:
            write_json(ckpt.directory / "result.json", result)
            write_metrics(out, results, targets)
        _barrier(world_size)

    summary: dict[str, Any] = {"classes": classes, "targets": [t.name for t in targets],
                               "model": cfg.model, "n_slides": len(table), "folds": {}}
    if not main:
        return summary
    complete = all(f.index in results for f in folds)
    return write_summary(out, summary, results, targets, cfg, complete)
