"""Post-hoc temperature scaling for slide-level classifiers, and regression metrics.

Temperature scaling (Guo et al., 2017) divides a trained classifier's logits by one scalar
``T > 0`` fitted on held-out data to minimise the cross-entropy; it changes the confidence
of the predictions but never their argmax::

    T = fit_temperature(val_logits, val_y)            # float, 1.0 when nothing to fit
    probs = apply_temperature(test_logits, T)         # (n, C) float64, rows sum to 1
    m = regression_metrics(y, pred)                   # {"r2", "mae", "rmse", "pearson"}
    ci = bootstrap_regression(y, pred, n_boot=1000)   # {name: (estimate, low, high)}

The fit is a golden-section search over ``log T`` in ``[log 0.05, log 20]`` in float64
numpy: the NLL is convex in ``1 / T``, hence unimodal in ``log T``, and a fixed sequence of
evaluations makes the result bitwise reproducible. Plain numpy, no scipy.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "fit_temperature",
    "apply_temperature",
    "undo_temperature",
    "MIN_CALIBRATION_SLIDES",
    "regression_metrics",
    "bootstrap_regression",
    "REGRESSION_METRICS",
]

#: The regression metrics, in report order.
REGRESSION_METRICS = ("r2", "mae", "rmse", "pearson")

_LOG_T_MIN = math.log(0.05)
_LOG_T_MAX = math.log(20.0)
_LOG_T_TOL = 1e-9  # bracket width in log T at which the search stops
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0
_CHUNK_ELEMENTS = 1 << 22  # resampled values held at once by the bootstrap


def _logsumexp(z: np.ndarray) -> np.ndarray:
    """Stable log-sum-exp over the last axis."""
    m = z.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[..., 0]


def _check_labels(logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, np.float64)
    y_arr = np.asarray(y)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (n, C), got shape {logits.shape}")
    if y_arr.shape != (logits.shape[0],):
        raise ValueError(f"y must be ({logits.shape[0]},), got shape {y_arr.shape}")
    yi = y_arr.astype(np.int64)
    if not np.array_equal(yi, y_arr):
        raise ValueError("y must hold integer class indices")
    if len(yi) and (yi.min() < 0 or yi.max() >= logits.shape[1]):
        raise ValueError(f"y must lie in [0, {logits.shape[1]})")
    if not np.isfinite(logits).all():
        raise ValueError("logits must be finite")
    return logits, yi


#: a temperature fitted on fewer labelled validation slides is noise: they keep T = 1
MIN_CALIBRATION_SLIDES = 20


def fit_temperature(logits: np.ndarray, y: np.ndarray, max_iter: int = 200) -> float:
    """The temperature ``T > 0`` minimising the mean NLL of ``softmax(logits / T)``.

    ``logits`` is (n, C), ``y`` (n,) integer class indices. Returns 1.0 when n < 2, when
    ``y`` holds one class only, or when no ``T`` in ``[0.05, 20]`` lowers the NLL of
    ``T = 1`` by more than a relative 1e-12. ``max_iter`` bounds the golden-section steps
    (about 45 reach the 1e-9 tolerance in ``log T``). Deterministic.
    """
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    logits, yi = _check_labels(logits, y)
    if len(yi) < 2 or len(np.unique(yi)) < 2:
        return 1.0
    z_true = logits[np.arange(len(yi)), yi]

    def nll(log_t: float) -> float:
        inv_t = math.exp(-log_t)
        return float(np.mean(_logsumexp(logits * inv_t) - z_true * inv_t))

    nll_one = nll(0.0)
    a, b = _LOG_T_MIN, _LOG_T_MAX
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = nll(c), nll(d)
    best_u, best_f = (c, fc) if fc <= fd else (d, fd)
    for _ in range(max_iter):
        if b - a <= _LOG_T_TOL:
            break
        if fc <= fd:  # the minimum lies in [a, d]
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = nll(c)
            u, f = c, fc
        else:  # the minimum lies in [c, b]
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = nll(d)
            u, f = d, fd
        if f < best_f:
            best_u, best_f = u, f
    if not best_f < nll_one - 1e-12 * max(1.0, abs(nll_one)):
        return 1.0
    return float(math.exp(best_u))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(logits / temperature)`` over the last axis, float64 and overflow-safe."""
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    z = np.asarray(logits, np.float64) / t
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def undo_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities before temperature scaling, from those after it: the softmax of
    ``T · log p`` (``log p`` is ``z / T`` up to a per-row constant, which softmax drops).
    Exact up to the precision of ``probs``; rows of ``probs`` must be positive."""
    logp = np.log(np.clip(np.asarray(probs, np.float64), 1e-300, None))
    return apply_temperature(logp * float(temperature), 1.0)


def _regression_batch(y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """The metrics for each row of (B, n) arrays of targets and predictions (n >= 1)."""
    n = y.shape[1]
    err = y - pred
    mae = np.abs(err).mean(axis=1)
    rmse = np.sqrt((err * err).mean(axis=1))
    dy = y - y.mean(axis=1, keepdims=True)
    dp = pred - pred.mean(axis=1, keepdims=True)
    ss_tot = (dy * dy).sum(axis=1)
    ss_pred = (dp * dp).sum(axis=1)
    # Constant rows are detected exactly: their centred sums are rounding noise, not zero.
    y_const = (y.max(axis=1) == y.min(axis=1)) | (n < 2)
    p_const = (pred.max(axis=1) == pred.min(axis=1)) | (n < 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(y_const, np.nan, 1.0 - (err * err).sum(axis=1) / ss_tot)
        r = (dy * dp).sum(axis=1) / np.sqrt(ss_tot * ss_pred)
    pearson = np.where(y_const | p_const, np.nan, np.clip(r, -1.0, 1.0))
    return {"r2": r2, "mae": mae, "rmse": rmse, "pearson": pearson}


def _check_regression(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, np.float64)
    pred = np.asarray(pred, np.float64)
    if y.ndim != 1 or pred.shape != y.shape:
        raise ValueError(f"y and pred must be 1-D of one length, got {y.shape} and {pred.shape}")
    return y, pred


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """R², mean absolute error, root mean squared error and Pearson's r of ``pred``.

    ``r2`` is NaN for constant ``y`` or n < 2, ``pearson`` also for constant ``pred``;
    ``mae`` and ``rmse`` are NaN only for n = 0. Non-finite inputs propagate as NaN.
    """
    y, pred = _check_regression(y, pred)
    if len(y) == 0:
        return {k: float("nan") for k in REGRESSION_METRICS}
    batch = _regression_batch(y[None], pred[None])
    return {k: float(batch[k][0]) for k in REGRESSION_METRICS}


def bootstrap_regression(y: np.ndarray, pred: np.ndarray, n_boot: int = 1000, seed: int = 0,
                         alpha: float = 0.05) -> dict[str, tuple[float, float, float]]:
    """Each regression metric with a percentile bootstrap interval: {name: (est, lo, hi)}.

    Samples are drawn as :func:`gigamil.mil.metrics.bootstrap_metrics` draws them (one
    ``rng.integers(0, n, n)`` per resample, ``np.random.default_rng(seed)``), so one seed
    gives paired resamples across the two. Resamples where a metric is NaN are left out
    of its interval; the interval is (nan, nan) when none is left or ``n_boot == 0``.
    """
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    y, pred = _check_regression(y, pred)
    point = regression_metrics(y, pred)
    n = len(y)
    n_draw = n_boot if n > 1 else 0
    rng = np.random.default_rng(seed)
    draws = {k: np.empty(n_draw, np.float64) for k in REGRESSION_METRICS}
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, n_draw, chunk):
        stop = min(start + chunk, n_draw)
        idx = np.empty((stop - start, n), np.int64)
        for i in range(stop - start):
            idx[i] = rng.integers(0, n, n)
        for k, v in _regression_batch(y[idx], pred[idx]).items():
            draws[k][start:stop] = v
    out: dict[str, tuple[float, float, float]] = {}
    for k in REGRESSION_METRICS:
        vals = draws[k][~np.isnan(draws[k])]
        if len(vals) == 0:
            out[k] = (point[k], float("nan"), float("nan"))
        else:
            lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
            out[k] = (point[k], float(lo), float(hi))
    return out
