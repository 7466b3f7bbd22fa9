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
from gigamil.mil.models import bag_layout
from gigamil.mil.predict import load_model, predict
from gigamil.mil.run_outputs import (
    calibration_report,
    ece_of,
    pool_folds,
    prediction_fields,
    prediction_rows,
    read_predictions,
    summarize,
    target_plots,
)
from gigamil.mil.targets import (
    Classification,
    Target,
    layout_targets,
    target_from_dict,
    targets_of_run,
)

__all__ = ["evaluate_run"]


def evaluate_run(run: str | os.PathLike[str], features: str | os.PathLike[str] | None = None,
                 labels: str | os.PathLike[str] | None = None,
                 out: str | os.PathLike[str] | None = None, n_boot: int = 1000, seed: int = 0,
                 device: torch.device | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Per-fold and pooled metrics with 95 % bootstrap CIs, and their pictures
    (reliability diagrams; Kaplan–Meier plots of the low- and high-risk halves).

    Without ``features`` the run's own test predictions are scored (pictures go to
    ``<run>/eval/``). With ``features`` and ``labels`` each fold's best model predicts
    that cohort; the folds' mean score is the ensemble. Results go to ``out`` (default
    ``<run>/eval/<features dir name>``).
    """
    from gigamil.wsi.preview import save_png

    layout = RunDir(run)
    config = layout.load_config()
    targets = targets_of_run(config)
    report: dict[str, Any] = {"run": layout.name, "classes": config["classes"],
                              "targets": [t.name for t in targets], "folds": {}}
    if features is None:
        parts = []
        for fold, path in layout.prediction_files().items():
            data = read_predictions(path, targets)
            report["folds"][fold] = summarize(targets, data, n_boot, seed)
            parts.append(data)
        if not parts:
            raise UsageError(f"{layout.root} has no predictions_fold*.csv",
                             "the run has no test folds yet; finish training first")
        pooled = pool_folds(parts, len(targets))
        report["pooled"] = summarize(targets, pooled, n_boot, seed)
        eval_dir = RunDir(out) if out else RunDir(layout.root / "eval")
        for name, img in target_plots(targets, pooled, f"{layout.name}, folds pooled").items():
            save_png(eval_dir.plot(name), img)
        write_json(eval_dir.summary, report)
        return report
    if labels is None:
        raise UsageError("--features needs --labels", "give the labels CSV of that cohort")
    device = device or torch.device("cpu")
    table = read_labels(labels, [target_from_dict(t.to_dict()) for t in targets])
    table, paths = match_features(table, features)
    ids = [s.slide_id for s in table.slides]
    dataset = BagDataset([paths[i] for i in ids], table.y(ids),
                         layout=bag_layout(config["config"]["model"]))
    eval_dir = RunDir(out) if out else RunDir(layout.eval_dir(Path(features).name))
    y = dataset.targets
    models = layout.fold_models()
    scores: list[list[np.ndarray]] = [[] for _ in targets]
    raw: list[list[np.ndarray]] = [[] for _ in targets]  # before temperature scaling
    for path in models:
        state = torch.load(path, map_location=device, weights_only=True)
        model, meta = load_model(state, device)
        fold_targets = _fold_targets(meta, targets, path)
        preds = predict(model, dataset, device, batch_size)
        data = [(y[:, t.columns], t.scores(preds.logits[:, t.outputs])) for t in fold_targets]
        for i, ((_, s), t) in enumerate(zip(data, fold_targets)):
            scores[i].append(s)
            raw[i].append(t.uncalibrated().scores(preds.logits[:, t.outputs]))
        report["folds"][str(meta["fold"])] = summarize(fold_targets, data, n_boot, seed)
        calibration = calibration_report(fold_targets, y, preds.logits)
        if calibration:
            report["folds"][str(meta["fold"])]["calibration"] = calibration
        write_csv(eval_dir.predictions(meta["fold"]),
                  prediction_rows(table, fold_targets, ids, preds.logits, preds.n_instances,
                                  meta["fold"], meta["model"]), prediction_fields(fold_targets))
    ensemble = [(y[:, t.columns], np.mean(scores[i], axis=0)) for i, t in enumerate(targets)]
    write_csv(eval_dir.ensemble_predictions,
              _ensemble_rows(table, targets, ids, ensemble, preds.n_instances,
                             config["config"]["model"]),
              prediction_fields(targets))
    before = [(y[:, t.columns], np.mean(raw[i], axis=0)) for i, t in enumerate(targets)]
    report["pooled"] = summarize(targets, ensemble, n_boot, seed)
    report["pooled"]["what"] = f"mean score of {len(models)} fold models"
    fitted = {name for part in report["folds"].values()  # targets some fold calibrated
              for name, c in part.get("calibration", {}).items() if c.get("fitted_on")}
    calibrated = [i for i, t in enumerate(targets) if t.name in fitted]
    if calibrated:
        report["pooled"]["calibration"] = {
            targets[i].name: {"ece_before": ece_of(*before[i]), "ece_after": ece_of(*ensemble[i])}
            for i in calibrated}
    for name, img in target_plots(targets, ensemble, "fold ensemble",
                                  before if calibrated else None).items():
        save_png(eval_dir.plot(name), img)
    write_json(eval_dir.summary, report)
    return report


def _fold_targets(meta: dict[str, Any], targets: list[Target], path: Path) -> list[Target]:
    """The targets a fold model was trained with (its own bins and scales)."""
    if not meta.get("targets"):  # a model from before targets: one classification head
        if meta["classes"] != getattr(targets[0], "classes", None):
            raise UsageError(f"{path} was trained on classes {meta['classes']}",
                             "do not mix checkpoints of different runs")
        column = targets[0].name
        return layout_targets([Classification(column, column=column, classes=meta["classes"],
                                              evidential=bool(meta.get("evidential")))])
    fold_targets = layout_targets([target_from_dict(d) for d in meta["targets"]])
    if [t.name for t in fold_targets] != [t.name for t in targets] or \
            [getattr(t, "classes", None) for t in fold_targets] != \
            [getattr(t, "classes", None) for t in targets]:
        raise UsageError(f"{path} was trained on other targets than its run",
                         "do not mix checkpoints of different runs")
    return fold_targets


def _ensemble_rows(table: Any, targets: list[Target], ids: list[str],
                   data: list[tuple[np.ndarray, np.ndarray]], n_instances: np.ndarray,
                   model: str) -> list[dict[str, Any]]:
    by_id = table.by_id()
    rows = []
    for k, sid in enumerate(ids):
        row: dict[str, Any] = {"slide_id": sid, "patient_id": by_id[sid].patient_id,
                               "fold": "ensemble", "n_instances": int(n_instances[k]),
                               "model": model}
        for t, (y, s) in zip(targets, data):
            row.update(t.score_row(y[k], s[k]))
        rows.append(row)
    return rows
