"""Metrics of a finished run, and its fold models applied to another cohort.

    report = evaluate_run("runs/crc1")                          # from predictions_fold*.csv
    report = evaluate_run("runs/crc1", features="ext/features/resnet50", labels="ext.csv",
                          out="runs/crc1/eval/ext")             # every fold model + their ensemble
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigamil.errors import UsageError
from gigamil.io import write_csv, write_json
from gigamil.layout import RunDir
from gigamil.mil.bags import BagDataset
from gigamil.mil.labels import match_features, read_labels
from gigamil.mil.metrics import reliability_diagram
from gigamil.mil.predict import load_model, predict
from gigamil.mil.run_outputs import (
    prediction_fields,
    prediction_rows,
    read_predictions,
    summarize,
)

__all__ = ["evaluate_run"]


def evaluate_run(run: str | os.PathLike[str], features: str | os.PathLike[str] | None = None,
                 labels: str | os.PathLike[str] | None = None,
                 out: str | os.PathLike[str] | None = None, n_boot: int = 1000, seed: int = 0,
                 device: torch.device | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Per-fold and pooled metrics with 95 % bootstrap CIs.

    Without ``features`` the run's own test predictions are scored. With ``features`` and
    ``labels`` each fold's best model predicts that cohort; the folds' mean probability is
    the ensemble. Results go to ``out`` (default ``<run>/eval/<features dir name>``).
    """
    layout = RunDir(run)
    config = layout.load_config()
    classes: list[str] = config["classes"]
    report: dict[str, Any] = {"run": layout.name, "classes": classes, "folds": {}}
    if features is None:
        ys, ps = [], []
        for fold, path in layout.prediction_files().items():
            y, p = read_predictions(path, classes)
            report["folds"][fold] = summarize(y, p, classes, n_boot, seed)
            ys.append(y)
            ps.append(p)
        if not ys:
            raise UsageError(f"{layout.root} has no predictions_fold*.csv",
                             "the run has no test folds yet; finish training first")
        report["pooled"] = summarize(np.concatenate(ys), np.concatenate(ps), classes, n_boot, seed)
        return report
    if labels is None:
        raise UsageError("--features needs --labels", "give the labels CSV of that cohort")
    device = device or torch.device("cpu")
    table = read_labels(labels, config["config"]["label_column"], classes)
    table, paths = match_features(table, features)
    ids = [s.slide_id for s in table.slides]
    dataset = BagDataset([paths[i] for i in ids], [table.target(s) for s in table.slides])
    eval_dir = RunDir(out) if out else RunDir(layout.eval_dir(Path(features).name))
    y = np.asarray(dataset.targets)
    mean = np.zeros((len(ids), len(classes)))
    models = layout.fold_models()
    for path in models:
        state = torch.load(path, map_location=device, weights_only=True)
        model, meta = load_model(state, device)
        if meta["classes"] != classes:
            raise UsageError(f"{path} was trained on classes {meta['classes']}, not {classes}")
        preds = predict(model, dataset, device, batch_size, evidential=meta["evidential"])
        mean += preds.probs
        report["folds"][str(meta["fold"])] = summarize(y, preds.probs, classes, n_boot, seed)
        write_csv(eval_dir.predictions(meta["fold"]),
                  prediction_rows(table, ids, preds.probs, preds.uncertainty, preds.n_instances,
                                  meta["fold"], meta["model"]), prediction_fields(classes))
    mean /= len(models)
    ent = -(mean * np.log(np.clip(mean, 1e-12, None))).sum(1) / np.log(len(classes))
    write_csv(eval_dir.ensemble_predictions,
              prediction_rows(table, ids, mean, ent, preds.n_instances, "ensemble",
                              config["config"]["model"]), prediction_fields(classes))
    report["pooled"] = summarize(y, mean, classes, n_boot, seed)
    report["pooled"]["what"] = f"mean probability of {len(models)} fold models"
    from gigamil.wsi.preview import save_png

    save_png(eval_dir.reliability, reliability_diagram(y, mean, title="fold ensemble"))
    write_json(eval_dir.summary, report)
    return report

