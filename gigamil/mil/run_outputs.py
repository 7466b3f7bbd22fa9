"""What a training run writes besides checkpoints: prediction CSVs, metrics, summary.

``evaluate`` writes and reads the same prediction CSVs for another cohort.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gigamil.io import write_csv, write_json
from gigamil.layout import RunDir
from gigamil.mil.labels import LabelTable
from gigamil.mil.metrics import (
    SCALAR_METRICS,
    bootstrap_metrics,
    confusion_matrix,
    reliability_diagram,
)
from gigamil.mil.train_config import TrainConfig

__all__ = ["prediction_rows", "prediction_fields", "read_predictions", "metric_row", "summarize",
           "write_metrics", "write_summary"]


def prediction_rows(table: LabelTable, ids: Sequence[str], probs: np.ndarray,
                    uncertainty: np.ndarray, n_instances: np.ndarray, fold: int | str,
                    model: str) -> list[dict[str, Any]]:
    """Rows of a predictions CSV (see :func:`prediction_fields`), one per slide in ``ids``."""
    by_id = table.by_id()
    rows = []
    for k, sid in enumerate(ids):
        s = by_id[sid]
        row = {"slide_id": sid, "patient_id": s.patient_id, "fold": fold, "label": s.label,
               "target": table.target(s), "pred": table.classes[int(probs[k].argmax())],
               "uncertainty": f"{uncertainty[k]:.6g}", "n_instances": int(n_instances[k]),
               "model": model}
        row.update({f"prob_{c}": f"{probs[k, j]:.8g}" for j, c in enumerate(table.classes)})
        rows.append(row)
    return rows


def read_predictions(path: Path, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(targets (n,), probabilities (n, C)) from a predictions CSV."""
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    y = np.array([int(r["target"]) for r in rows], np.int64)
    p = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows]).reshape(len(rows), -1)
    return y, p


def prediction_fields(classes: Sequence[str]) -> list[str]:
    """The columns of a predictions CSV, in order."""
    return (["slide_id", "patient_id", "fold", "label", "target", "pred"]
            + [f"prob_{c}" for c in classes] + ["uncertainty", "n_instances", "model"])


def metric_row(name: str, ci: dict[str, tuple[float, float, float]]) -> dict[str, Any]:
    """A ``metrics.csv`` row of test metrics with their CIs (``name``: a fold or pooled)."""
    row: dict[str, Any] = {"fold": name, "split": "test"}
    for k, (est, lo, hi) in ci.items():
        row[k], row[f"{k}_lo"], row[f"{k}_hi"] = est, lo, hi
    return row


def summarize(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], n_boot: int,
              seed: int) -> dict[str, Any]:
    """Metrics with bootstrap CIs and the confusion matrix, JSON-ready."""
    ci = bootstrap_metrics(y, probs, n_boot=n_boot, seed=seed, classes=classes)
    return {"n": int(len(y)),
            "metrics": {k: {"value": v[0], "ci95": [v[1], v[2]]} for k, v in ci.items()},
            "confusion_matrix": confusion_matrix(y, probs.argmax(1), len(classes)).tolist()}


def _history_rows(results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for k in sorted(results):
        for h in results[k]["history"]:
            rows.append({"fold": k, "split": "epoch", **h})
        if "test_ci" in results[k]:
            rows.append({**metric_row(str(k), results[k]["test_ci"]),
                         "epoch": results[k]["best_epoch"]})
    return rows


def write_metrics(out: Path, results: dict[int, dict[str, Any]], classes: Sequence[str],
                  pooled: dict[str, tuple[float, float, float]] | None = None) -> None:
    """``metrics.csv``: every fold's epoch history and test CIs (and the pooled CIs)."""
    rows = _history_rows(results)
    if pooled is not None:
        rows.append(metric_row("pooled", pooled))
    metric_names = [*SCALAR_METRICS, *(f"f1_{c}" for c in classes)]
    fields = ["fold", "split", "epoch", "step", "train_loss", "lr",
              *(f"val_{k}" for k in ("loss", *metric_names)),
              *(f"{k}{s}" for k in metric_names for s in ("", "_lo", "_hi"))]
    write_csv(RunDir(out).metrics, rows, fields)


def write_summary(out: Path, summary: dict[str, Any], results: dict[int, dict[str, Any]],
                  classes: Sequence[str], cfg: TrainConfig, complete: bool) -> dict[str, Any]:
    """Per-fold and pooled test metrics (from the prediction CSVs) into ``summary``, then
    ``reliability.png``, ``metrics.csv`` and ``summary.json`` into ``out``; ``summary``."""
    from gigamil.wsi.preview import save_png

    ys, ps = [], []
    for k in sorted(results):
        summary["folds"][str(k)] = {"best_epoch": results[k]["best_epoch"],
                                    "n": results[k]["n"]}
        pred_file = RunDir(out).predictions(k)
        if "test_ci" not in results[k] or not pred_file.exists():
            continue
        y, p = read_predictions(pred_file, classes)
        summary["folds"][str(k)]["test"] = summarize(y, p, classes, cfg.bootstrap, cfg.seed)
        ys.append(y)
        ps.append(p)
    pooled = None
    if ys:
        y, p = np.concatenate(ys), np.concatenate(ps)
        summary["pooled"] = summarize(y, p, classes, cfg.bootstrap, cfg.seed)
        pooled = bootstrap_metrics(y, p, cfg.bootstrap, seed=cfg.seed, classes=classes)
        save_png(RunDir(out).reliability,
                 reliability_diagram(y, p, title=f"{cfg.model}, {len(ys)} folds pooled"))
    write_metrics(out, results, classes, pooled)
    summary["complete"] = complete
    write_json(RunDir(out).summary, summary)
    return summary
