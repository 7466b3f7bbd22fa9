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
    calibration_diagram,
    confusion_matrix,
    expected_calibration_error,
    reliability_diagram,
)
from gigamil.mil.targets import Classification, Survival, Target
from gigamil.mil.train_config import TrainConfig

__all__ = ["prediction_rows", "prediction_fields", "read_predictions", "metric_row", "summarize",
           "bootstrap_targets", "write_metrics", "write_summary", "target_plots",
           "calibration_report", "uncalibrated_scores", "ece_of", "pool_folds"]


def prediction_rows(table: LabelTable, targets: Sequence[Target], ids: Sequence[str],
                    logits: np.ndarray, n_instances: np.ndarray, fold: int | str,
                    model: str) -> list[dict[str, Any]]:
    """Rows of a predictions CSV (see :func:`prediction_fields`), one per slide in ``ids``."""
    by_id = table.by_id()
    y = table.y(ids)
    rows = []
    for k, sid in enumerate(ids):
        row: dict[str, Any] = {"slide_id": sid, "patient_id": by_id[sid].patient_id,
                               "fold": fold}
        for t in targets:
            row.update(t.row(y[k, t.columns], logits[k, t.outputs]))
        row.update({"n_instances": int(n_instances[k]), "model": model})
        rows.append(row)
    return rows


def read_predictions(path: Path, targets: Sequence[Target]
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per target, (labels (n, width), scores (n, s)) from a predictions CSV."""
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [t.read(rows) for t in targets]


def prediction_fields(targets: Sequence[Target]) -> list[str]:
    """The columns of a predictions CSV, in order."""
    return (["slide_id", "patient_id", "fold"] + [c for t in targets for c in t.columns_out()]
            + ["n_instances", "model"])


def metric_row(name: str, ci: dict[str, tuple[float, float, float]]) -> dict[str, Any]:
    """A ``metrics.csv`` row of test metrics with their CIs (``name``: a fold or pooled)."""
    row: dict[str, Any] = {"fold": name, "split": "test"}
    for k, (est, lo, hi) in ci.items():
        row[k], row[f"{k}_lo"], row[f"{k}_hi"] = est, lo, hi
    return row


def bootstrap_targets(targets: Sequence[Target], data: Sequence[tuple[np.ndarray, np.ndarray]],
                      n_boot: int, seed: int) -> dict[str, tuple[float, float, float]]:
    """Every target's metrics with bootstrap CIs, prefixed as in :func:`evaluate_targets`."""
    out: dict[str, tuple[float, float, float]] = {}
    for t, (y, s) in zip(targets, data):
        out.update({t.prefix + k: v for k, v in t.bootstrap(y, s, n_boot, seed).items()})
    return out


def summarize(targets: Sequence[Target], data: Sequence[tuple[np.ndarray, np.ndarray]],
              n_boot: int, seed: int) -> dict[str, Any]:
    """Metrics with bootstrap CIs (and the first classification target's confusion
    matrix), JSON-ready."""
    ci = bootstrap_targets(targets, data, n_boot, seed)
    n = len(data[0][0]) if data else 0
    summary: dict[str, Any] = {
        "n": int(n), "metrics": {k: {"value": v[0], "ci95": [v[1], v[2]]} for k, v in ci.items()}}
    for t, (y, s) in zip(targets, data):
        if isinstance(t, Classification):
            known = ~np.isnan(y[:, 0])
            summary["confusion_matrix"] = confusion_matrix(
                y[known, 0].astype(np.int64), s[known].argmax(1), len(t.classes)).tolist()
            break
    return summary


def ece_of(y: np.ndarray, s: np.ndarray) -> float:
    """ECE of a classification target's probabilities on its labelled slides."""
    known = ~np.isnan(y[:, 0])
    return expected_calibration_error(y[known, 0].astype(np.int64), s[known])[0] \
        if known.any() else float("nan")


def calibration_report(targets: Sequence[Target], y: np.ndarray, logits: np.ndarray
                       ) -> dict[str, dict[str, float]]:
    """Per classification target of a fold model: its fitted temperature and the ECE of
    its probabilities on ``y``/``logits`` (a test fold, an external cohort) before and
    after temperature scaling."""
    report = {}
    for t in targets:
        if isinstance(t, Classification):
            o, yt = logits[:, t.outputs], y[:, t.columns]
            report[t.name] = {"temperature": t.temperature, "fitted_on": t.calibrated_on,
                              "ece_before": ece_of(yt, t.uncalibrated().scores(o)),
                              "ece_after": ece_of(yt, t.scores(o))}
    return report


def uncalibrated_scores(targets: Sequence[Target], data: Sequence[tuple[np.ndarray, np.ndarray]],
                        calibration: dict[str, dict[str, float]]
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``data`` (labels, scores) with each classification target's temperature scaling
    undone (``calibration``: a :func:`calibration_report`)."""
    from gigamil.mil.calibration import undo_temperature

    out = []
    for t, (y, s) in zip(targets, data):
        temperature = calibration.get(t.name, {}).get("temperature", 1.0)
        out.append((y, undo_temperature(s, temperature) if isinstance(t, Classification)
                    and temperature != 1.0 else s))
    return out


def target_plots(targets: Sequence[Target], data: Sequence[tuple[np.ndarray, np.ndarray]],
                 title: str, before: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
                 temperature: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Pictures of predictions, by file name: a reliability diagram per classification
    target (beside the one ``before`` calibration, when given), a Kaplan–Meier plot of
    the risk halves per survival target."""
    from gigamil.mil.survival import km_plot

    out: dict[str, np.ndarray] = {}
    for i, (t, (y, s)) in enumerate(zip(targets, data)):
        known = ~np.isnan(y).any(1)
        if isinstance(t, Classification):
            yk = y[known, 0].astype(np.int64)
            name = f"reliability{'_' + t.name if t.prefix else ''}.png"
            out[name] = (reliability_diagram(yk, s[known], title=title) if before is None else
                         calibration_diagram(yk, before[i][1][known], s[known],
                                             (temperature or {}).get(t.name), title))
        elif isinstance(t, Survival) and known.sum() >= 2:
            risk = s[known, 0]
            out[f"km{'_' + t.name if t.prefix else ''}.png"] = km_plot(
                y[known, 0], y[known, 1], risk > np.median(risk), title=f"{title}: risk halves")
    return out


def _history_rows(results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for k in sorted(results):
        for h in results[k]["history"]:
            rows.append({"fold": k, "split": "epoch", **h})
        if "test_ci" in results[k]:
            rows.append({**metric_row(str(k), results[k]["test_ci"]),
                         "epoch": results[k]["best_epoch"]})
    return rows


def metric_names(targets: Sequence[Target]) -> list[str]:
    """Every target's metric names, prefixed (classification adds ``f1_<class>``)."""
    names: list[str] = []
    for t in targets:
        extra = [f"f1_{c}" for c in t.classes] if isinstance(t, Classification) else []
        names.extend(t.prefix + k for k in (*t.metric_names, *extra))
    return names


def write_metrics(out: Path, results: dict[int, dict[str, Any]], targets: Sequence[Target],
                  pooled: dict[str, tuple[float, float, float]] | None = None) -> None:
    """``metrics.csv``: every fold's epoch history and test CIs (and the pooled CIs)."""
    rows = _history_rows(results)
    if pooled is not None:
        rows.append(metric_row("pooled", pooled))
    names = metric_names(targets)
    fields = ["fold", "split", "epoch", "step", "train_loss", "lr",
              *(f"val_{k}" for k in ("loss", *names)),
              *(f"{k}{s}" for k in names for s in ("", "_lo", "_hi"))]
    write_csv(RunDir(out).metrics, rows, fields)


def pool_folds(parts: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], n: int
          ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per target, the (labels, scores) of every fold concatenated."""
    return [(np.concatenate([p[i][0] for p in parts]), np.concatenate([p[i][1] for p in parts]))
            for i in range(n)]


def write_summary(out: Path, summary: dict[str, Any], results: dict[int, dict[str, Any]],
                  targets: Sequence[Target], cfg: TrainConfig, complete: bool) -> dict[str, Any]:
    """Per-fold and pooled test metrics (from the prediction CSVs) into ``summary``, then
    the pictures (reliability, Kaplan–Meier), ``metrics.csv`` and ``summary.json`` into
    ``out``; ``summary``."""
    from gigamil.wsi.preview import save_png

    parts: list[list[tuple[np.ndarray, np.ndarray]]] = []
    raw_parts: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for k in sorted(results):
        summary["folds"][str(k)] = {"best_epoch": results[k]["best_epoch"],
                                    "n": results[k]["n"]}
        pred_file = RunDir(out).predictions(k)
        if "test_ci" not in results[k] or not pred_file.exists():
            continue
        data = read_predictions(pred_file, targets)
        summary["folds"][str(k)]["test"] = summarize(targets, data, cfg.bootstrap, cfg.seed)
        calibration = results[k].get("calibration", {})
        raw = uncalibrated_scores(targets, data, calibration)
        if calibration:
            summary["folds"][str(k)]["calibration"] = calibration
        if any(c.get("fitted_on") for c in calibration.values()):
            temps = {n: c["temperature"] for n, c in calibration.items()}
            for name, img in target_plots(targets, data, f"fold {k}", raw, temps).items():
                if name.startswith("reliability"):
                    save_png(RunDir(out).fold_plot(k, name), img)
        parts.append(data)
        raw_parts.append(raw)
    pooled = None
    if parts:
        data, raw = pool_folds(parts, len(targets)), pool_folds(raw_parts, len(targets))
        summary["pooled"] = summarize(targets, data, cfg.bootstrap, cfg.seed)
        calibrated = any(c.get("fitted_on") for k in results
                         for c in results[k].get("calibration", {}).values())
        if calibrated:
            summary["pooled"]["calibration"] = {
                t.name: {"ece_before": ece_of(*raw[i]), "ece_after": ece_of(*data[i])}
                for i, t in enumerate(targets) if isinstance(t, Classification)}
        pooled = bootstrap_targets(targets, data, cfg.bootstrap, cfg.seed)
        for name, img in target_plots(targets, data, f"{cfg.model}, {len(parts)} folds pooled",
                                      raw if calibrated else None).items():
            save_png(RunDir(out).plot(name), img)
    write_metrics(out, results, targets, pooled)
    summary["complete"] = complete
    write_json(RunDir(out).summary, summary)
    return summary
