"""Classification metrics for slide-level predictions, with bootstrap confidence intervals.

    m = classification_metrics(y, probs)              # dict of floats (NaN where undefined)
    ci = bootstrap_metrics(y, probs, n_boot=1000)     # {name: (estimate, low, high)}
    png = reliability_diagram(y, probs)               # RGB uint8 image

Plain numpy; every metric is checked against scikit-learn in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = [
    "classification_metrics",
    "bootstrap_metrics",
    "confusion_matrix",
    "binary_auroc",
    "expected_calibration_error",
    "reliability_diagram",
    "calibration_diagram",
    "SCALAR_METRICS",
]

#: The scalar metrics, in report order (per-class F1 adds ``f1_<class>``).
SCALAR_METRICS = ("acc", "bal_acc", "auroc", "f1_macro", "kappa", "ece")


def confusion_matrix(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (np.asarray(y, np.int64), np.asarray(pred, np.int64)), 1)
    return cm


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged (as scipy's ``rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U); NaN when only one class is present."""
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 15
                               ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """ECE of the top-class confidence in equal-width bins.

    Returns (ece, per-bin accuracy, per-bin mean confidence, per-bin count).
    """
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    acc = np.bincount(bins, weights=correct, minlength=n_bins) / np.maximum(count, 1)
    mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / np.maximum(count, 1)
    ece = float((count / max(len(y), 1) * np.abs(acc - mean_conf)).sum())
    return ece, acc, mean_conf, count


def classification_metrics(y: Sequence[int] | np.ndarray, probs: np.ndarray,
                           classes: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro one-vs-rest AUROC, per-class and macro F1,
    Cohen's kappa and ECE. Classes absent from ``y`` are left out of the macro means.

    Per-class F1 is ``f1_<class name>`` (``f1_<index>`` without ``classes``)."""
    y = np.asarray(y, np.int64)
    probs = np.asarray(probs, np.float64)
    n_classes = probs.shape[1]
    pred = probs.argmax(1)
    cm = confusion_matrix(y, pred, n_classes)
    n = cm.sum()
    support = cm.sum(1)
    predicted = cm.sum(0)
    tp = np.diag(cm).astype(np.float64)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / support
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    f1 = np.where(present, f1, np.nan)
    if n_classes == 2:
        auroc = binary_auroc(y == 1, probs[:, 1])
    else:
        aucs = [binary_auroc(y == c, probs[:, c]) for c in range(n_classes) if present[c]]
        auroc = float(np.mean(aucs)) if aucs and not np.isnan(aucs).any() else float("nan")
    p_o = tp.sum() / n if n else float("nan")
    p_e = float((support * predicted).sum()) / n**2 if n else float("nan")
    kappa = (p_o - p_e) / (1 - p_e) if n and p_e < 1 else float("nan")
    out = {
        "acc": float(p_o),
        "bal_acc": float(np.nanmean(recall[present])) if present.any() else float("nan"),
        "auroc": auroc,
        "f1_macro": float(np.nanmean(f1)) if present.any() else float("nan"),
        "kappa": float(kappa),
        "ece": expected_calibration_error(y, probs)[0] if n else float("nan"),
    }
    names = list(classes) if classes is not None else [str(c) for c in range(n_classes)]
    out.update({f"f1_{names[c]}": float(f1[c]) for c in range(n_classes)})
    return out


def bootstrap_metrics(y: Sequence[int] | np.ndarray, probs: np.ndarray, n_boot: int = 1000,
                      seed: int = 0, alpha: float = 0.05, classes: Sequence[str] | None = None
                      ) -> dict[str, tuple[float, float, float]]:
    """Each metric with a percentile bootstrap interval over slides: {name: (est, lo, hi)}.

    Resamples where a metric is undefined (one class only, for AUROC) are left out of
    that metric's interval.
    """
    y = np.asarray(y, np.int64)
    probs = np.asarray(probs, np.float64)
    point = classification_metrics(y, probs, classes)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot if len(y) > 1 else 0):
        idx = rng.integers(0, len(y), len(y))
        for k, v in classification_metrics(y[idx], probs[idx], classes).items():
            draws[k].append(v)
    out = {}
    for k, est in point.items():
        vals = np.asarray(draws[k])
        vals = vals[~np.isnan(vals)]
        if len(vals) == 0:
            out[k] = (est, float("nan"), float("nan"))
        else:
            lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
            out[k] = (est, float(lo), float(hi))
    return out


def reliability_diagram(y: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = 15,
                        title: str = "", size: int = 420) -> np.ndarray:
    """A reliability diagram (accuracy against confidence per bin, with the diagonal) as RGB."""
    y = np.asarray(y, np.int64)
    ece, acc, conf, count = expected_calibration_error(y, np.asarray(probs, np.float64), n_bins)
    pad_l, pad_b, pad_t, pad_r = 50, 40, 40, 15
    w = size - pad_l - pad_r
    h = size - pad_b - pad_t
    img = np.full((size, size, 3), 255, np.uint8)

    def px(fx: float, fy: float) -> tuple[int, int]:
        return int(pad_l + fx * w), int(pad_t + (1 - fy) * h)

    for i in range(n_bins):
        if count[i] == 0:
            continue
        x0, y0 = px(i / n_bins, acc[i])
        x1, y1 = px((i + 1) / n_bins, 0)
        cv2.rectangle(img, (x0 + 1, y0), (x1 - 1, y1), (70, 110, 200), -1)
        gap_top = px(0, max(acc[i], conf[i]))[1]  # the gap to perfect calibration, outlined
        gap_bottom = px(0, min(acc[i], conf[i]))[1]
        cv2.rectangle(img, (x0 + 1, gap_top), (x1 - 1, gap_bottom), (230, 120, 110), 1)
    cv2.line(img, px(0, 0), px(1, 1), (120, 120, 120), 1, cv2.LINE_AA)
    cv2.rectangle(img, px(0, 1), px(1, 0), (0, 0, 0), 1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for t in (0.0, 0.5, 1.0):
        cv2.putText(img, f"{t:.1f}", (px(t, 0)[0] - 10, size - pad_b + 18), font, 0.4, (0, 0, 0), 1)
        cv2.putText(img, f"{t:.1f}", (8, px(0, t)[1] + 4), font, 0.4, (0, 0, 0), 1)
    cv2.putText(img, "confidence", (size // 2 - 35, size - 6), font, 0.45, (0, 0, 0), 1)
    cv2.putText(img, "accuracy", (2, pad_t - 8), font, 0.45, (0, 0, 0), 1)
    label = f"{title}  ECE {ece:.3f}  n={len(y)}".strip()
    cv2.putText(img, label, (pad_l + 60, pad_t - 12), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def calibration_diagram(y: Sequence[int] | np.ndarray, before: np.ndarray, after: np.ndarray,
                        temperature: float | None = None, title: str = "") -> np.ndarray:
    """Reliability diagrams before and after post-hoc calibration, side by side, as RGB
    (``temperature``: the one fitted, shown in the right-hand title; None for an ensemble)."""
    t = "" if temperature is None else f" T={temperature:.2f}"
    left = reliability_diagram(y, before, title=f"{title} raw".strip())
    right = reliability_diagram(y, after, title=f"{title} calibrated{t}".strip())
    return np.concatenate([left, np.full((left.shape[0], 6, 3), 255, np.uint8), right], axis=1)
