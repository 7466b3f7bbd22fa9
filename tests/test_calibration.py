from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from gigamil.mil.calibration import (
    MIN_CALIBRATION_SLIDES,
    REGRESSION_METRICS,
    apply_temperature,
    bootstrap_regression,
    fit_temperature,
    regression_metrics,
)
from gigamil.mil.metrics import expected_calibration_error


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _planted(n: int, c: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(true_logits); returned logits are true_logits * scale."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(size=(n, c)) * 1.5 + 2.0 * np.eye(c)[rng.integers(0, c, n)]
    cdf = np.cumsum(_softmax(true_logits), 1)
    y = np.minimum((rng.uniform(size=(n, 1)) > cdf).sum(1), c - 1)
    return true_logits * scale, y


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    p = apply_temperature(logits, t)
    return float(-np.log(p[np.arange(len(y)), y]).mean())


def test_undo_temperature_recovers_the_raw_probabilities() -> None:
    from gigamil.mil.calibration import undo_temperature

    z = np.random.default_rng(0).normal(size=(50, 4)) * 4
    for t in (0.3, 1.7, 5.0):
        after = np.array([[float(f"{v:.8g}") for v in row] for row in apply_temperature(z, t)])
        np.testing.assert_allclose(undo_temperature(after, t), apply_temperature(z, 1.0),
                                   atol=1e-6)


@pytest.mark.parametrize(("c", "scale", "seed"), [(2, 3.0, 0), (4, 3.0, 1), (3, 0.5, 2)])
def test_fit_temperature_recovers_planted_temperature(c: int, scale: float, seed: int) -> None:
    logits, y = _planted(4000, c, scale, seed)
    t = fit_temperature(logits, y)
    assert abs(t - scale) / scale < 0.15


def test_fit_temperature_is_the_nll_minimum() -> None:
    logits, y = _planted(1000, 3, 3.0, 3)
    t = fit_temperature(logits, y)
    grid = np.exp(np.linspace(math.log(0.05), math.log(20), 2001))
    grid_best = min(_nll(logits, y, float(g)) for g in grid)
    assert _nll(logits, y, t) <= grid_best + 1e-12
    assert _nll(logits, y, t) < _nll(logits, y, 1.0)


def test_temperature_scaling_lowers_ece_of_overconfident_logits() -> None:
    logits, y = _planted(4000, 3, 3.0, 4)
    before = expected_calibration_error(y, _softmax(logits))[0]
    scaled = apply_temperature(logits, fit_temperature(logits, y))
    after = expected_calibration_error(y, scaled)[0]
    assert before > 0.05
    assert after < before / 2
    assert np.array_equal(scaled.argmax(1), logits.argmax(1))  # accuracy is unchanged


def test_fit_temperature_is_deterministic() -> None:
    logits, y = _planted(2000, 3, 3.0, 5)
    t1 = fit_temperature(logits, y)
    t2 = fit_temperature(logits.copy(), y.copy())
    assert isinstance(t1, float)
    assert t1 == t2  # bitwise
    assert t1 != 1.0


def test_fit_temperature_returns_one_when_nothing_to_fit() -> None:
    logits, y = _planted(200, 3, 3.0, 6)
    assert fit_temperature(logits, np.zeros(200, np.int64)) == 1.0  # one class only
    assert fit_temperature(logits[:1], y[:1]) == 1.0  # n < 2
    assert fit_temperature(logits[:0], y[:0]) == 1.0
    assert fit_temperature(np.zeros((200, 3)), y) == 1.0  # T cannot change the NLL
    assert fit_temperature(logits, y, max_iter=0) > 0


def test_fit_temperature_rejects_bad_input() -> None:
    logits, y = _planted(50, 3, 3.0, 7)
    with pytest.raises(ValueError):
        fit_temperature(logits, y + 3)
    with pytest.raises(ValueError):
        fit_temperature(logits[:, 0], y)
    with pytest.raises(ValueError):
        fit_temperature(logits, y[:-1])
    bad = logits.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        fit_temperature(bad, y)


@pytest.mark.parametrize("t", [1.0, 0.3, 2.5])
def test_apply_temperature_matches_torch_softmax(t: float) -> None:
    logits = np.random.default_rng(8).normal(size=(64, 5)) * 4
    probs = apply_temperature(logits, t)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=0, atol=1e-12)
    ref = torch.softmax(torch.from_numpy(logits) / t, dim=1).numpy()
    np.testing.assert_allclose(probs, ref, rtol=1e-12, atol=1e-15)


def test_apply_temperature_is_stable_and_validates() -> None:
    probs = apply_temperature(np.array([[1e4, 0.0, -1e4], [800.0, 800.0, 0.0]]), 0.05)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, [[1, 0, 0], [0.5, 0.5, 0]], atol=1e-12)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            apply_temperature(probs, bad)


@pytest.mark.parametrize(("n", "seed"), [(2, 0), (30, 1), (500, 2)])
def test_regression_metrics_match_sklearn(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=n) * 3 + 1
    pred = y + rng.normal(size=n) * 2
    m = regression_metrics(y, pred)
    assert list(m) == list(REGRESSION_METRICS)
    assert m["r2"] == pytest.approx(r2_score(y, pred), abs=1e-10)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, pred), abs=1e-10)
    assert m["rmse"] == pytest.approx(math.sqrt(mean_squared_error(y, pred)), abs=1e-10)
    assert m["pearson"] == pytest.approx(np.corrcoef(y, pred)[0, 1], abs=1e-10)


def test_regression_metrics_undefined_cases() -> None:
    perfect = regression_metrics(np.arange(5.0), np.arange(5.0))
    assert perfect == {"r2": 1.0, "mae": 0.0, "rmse": 0.0, "pearson": 1.0}
    const = regression_metrics(np.full(10, 0.1), np.linspace(0, 1, 10))
    assert math.isnan(const["r2"]) and math.isnan(const["pearson"])
    assert const["mae"] == pytest.approx(mean_absolute_error(np.full(10, 0.1), np.linspace(0, 1, 10)))
    flat_pred = regression_metrics(np.arange(4.0), np.ones(4))
    assert math.isnan(flat_pred["pearson"]) and not math.isnan(flat_pred["r2"])
    one = regression_metrics(np.array([1.0]), np.array([3.0]))
    assert math.isnan(one["r2"]) and math.isnan(one["pearson"]) and one["mae"] == 2.0
    assert all(math.isnan(v) for v in regression_metrics(np.array([]), np.array([])).values())
    with pytest.raises(ValueError):
        regression_metrics(np.zeros(3), np.zeros(4))


def _case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=n)
    return y, 0.8 * y + rng.normal(size=n) * 0.5


def test_bootstrap_regression_contains_estimate_and_is_deterministic() -> None:
    y, pred = _case(200, 9)
    ci = bootstrap_regression(y, pred, n_boot=300, seed=1)
    point = regression_metrics(y, pred)
    assert list(ci) == list(REGRESSION_METRICS)
    for k, (est, lo, hi) in ci.items():
        assert est == point[k]
        assert lo < est < hi
    assert bootstrap_regression(y, pred, n_boot=300, seed=1) == ci
    assert bootstrap_regression(y, pred, n_boot=300, seed=2) != ci


def test_bootstrap_regression_matches_a_loop_reference_and_skips_nan() -> None:
    y = np.array([0.0] * 6 + [1.0, 2.0])  # many resamples have constant y: r2 NaN
    pred = np.linspace(0, 1, 8)
    n_boot, seed, alpha = 400, 3, 0.1
    ci = bootstrap_regression(y, pred, n_boot=n_boot, seed=seed, alpha=alpha)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in REGRESSION_METRICS}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        for k, v in regression_metrics(y[idx], pred[idx]).items():
            draws[k].append(v)
    assert any(math.isnan(v) for v in draws["r2"])
    for k in REGRESSION_METRICS:
        vals = np.array(draws[k])
        lo, hi = np.quantile(vals[~np.isnan(vals)], [alpha / 2, 1 - alpha / 2])
        assert ci[k][1] == pytest.approx(lo, abs=1e-12)
        assert ci[k][2] == pytest.approx(hi, abs=1e-12)


def test_bootstrap_regression_without_resamples() -> None:
    y, pred = _case(50, 10)
    point = regression_metrics(y, pred)
    for ci in (bootstrap_regression(y, pred, n_boot=0),
               bootstrap_regression(y[:1], pred[:1], n_boot=100)):
        for _est, lo, hi in ci.values():
            assert math.isnan(lo) and math.isnan(hi)
    assert {k: v[0] for k, v in bootstrap_regression(y, pred, n_boot=0).items()} == point


def test_bootstrap_regression_is_fast() -> None:
    y, pred = _case(500, 11)
    t0 = time.perf_counter()
    ci = bootstrap_regression(y, pred, n_boot=1000)
    assert time.perf_counter() - t0 < 1.0
    assert all(np.isfinite(v).all() for v in ci.values())


# -- temperature scaling in a training run, eval and infer ------------------------------------

def _noisy_bags(out: Path) -> Path:
    """Bags whose labels are 25 % flipped: a model trained long on them is overconfident."""
    import csv

    from gigamil.synth.bags import make_feature_bags

    make_feature_bags(out, n_slides=120, dim=16, bag_size=(10, 40), signal=1.5, seed=3)
    rows = list(csv.DictReader(open(out / "labels.csv")))
    rng = np.random.default_rng(0)
    for r in rows:
        if rng.uniform() < 0.25:
            r["label"] = "tumor" if r["label"] == "normal" else "normal"
    with open(out / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def test_temperature_is_fitted_on_validation_and_applied_everywhere(tmp_path: Path) -> None:
    import csv
    import json

    from gigamil.cluster.launch import run_training
    from gigamil.mil.bags import BagDataset
    from gigamil.mil.evaluate import evaluate_run
    from gigamil.mil.export import OnnxMIL, export_run
    from gigamil.mil.labels import match_features, read_labels
    from gigamil.mil.predict import load_model, predict, temperature_of
    from gigamil.mil.targets import targets_of_run
    from gigamil.mil.train_config import TrainConfig

    torch.set_num_threads(1)
    bags = _noisy_bags(tmp_path / "bags")
    out = tmp_path / "run"
    cfg = TrainConfig(features=str(bags), labels=str(bags / "labels.csv"), out=str(out),
                      folds=3, epochs=15, lr=5e-3, batch_size=8, early_stop=None,
                      monitor="auroc", val_frac=0.3, bootstrap=20, weight_decay=0.0)
    summary = run_training(cfg)
    config = json.loads((out / "config.json").read_text())
    table, paths = match_features(read_labels(bags / "labels.csv", targets_of_run(config)),
                                  str(bags))
    splits = list(csv.DictReader(open(out / "splits.csv")))
    temps: list[float] = []
    pooled_y: list[np.ndarray] = []
    pooled_raw: list[np.ndarray] = []
    pooled_cal: list[np.ndarray] = []
    for k in range(3):
        state = torch.load(out / f"checkpoints/fold{k}/best.pt", weights_only=True)
        model, meta = load_model(state)
        t = temperature_of(meta)
        temps.append(t)

        def logits(part: str, k: int = k, model: torch.nn.Module = model
                   ) -> tuple[list[str], np.ndarray]:
            ids = [r["slide_id"] for r in splits if r["fold"] == str(k)
                   and r["partition"] == part]
            ds = BagDataset([paths[i] for i in ids], table.y(ids))
            return ids, predict(model, ds, torch.device("cpu"), 4).logits

        val_ids, val_z = logits("val")  # fitted on the inner validation split only
        y_val = table.y(val_ids)[:, 0].astype(np.int64)
        assert len(val_ids) >= MIN_CALIBRATION_SLIDES
        assert t == pytest.approx(fit_temperature(val_z, y_val), rel=1e-6)
        test_ids, test_z = logits("test")  # applied to the test fold's probabilities
        rows = {r["slide_id"]: r for r in csv.DictReader(open(out / f"predictions_fold{k}.csv"))}
        got = np.array([[float(rows[i]["prob_normal"]), float(rows[i]["prob_tumor"])]
                        for i in test_ids])
        np.testing.assert_allclose(got, apply_temperature(test_z, t), atol=1e-6)
        cal = summary["folds"][str(k)]["calibration"]["label"]
        assert cal["temperature"] == pytest.approx(t)
        y_test = table.y(test_ids)[:, 0].astype(np.int64)
        for key, temp in (("ece_before", 1.0), ("ece_after", t)):
            assert cal[key] == pytest.approx(expected_calibration_error(
                y_test, apply_temperature(test_z, temp))[0], abs=1e-6)
        assert (out / f"reliability_fold{k}.png").exists()
        pooled_y.append(y_test)
        pooled_raw.append(apply_temperature(test_z, 1.0))
        pooled_cal.append(apply_temperature(test_z, t))
        if k == 0:  # the ONNX engine divides by the same temperature
            export_run(out, 0, tmp_path / "f0.onnx")
            onnx = OnnxMIL(tmp_path / "f0.onnx")
            bag = BagDataset([paths[test_ids[0]]], table.y(test_ids[:1]))[0]
            probs, _ = onnx(bag[0].numpy())
            np.testing.assert_allclose(probs, apply_temperature(test_z[:1], t)[0], atol=1e-5)
    assert any(abs(t - 1.0) > 0.05 for t in temps), temps  # overconfident: T moved off 1
    pooled = summary["pooled"]["calibration"]["label"]
    y_all = np.concatenate(pooled_y)
    assert pooled["ece_before"] == pytest.approx(expected_calibration_error(
        y_all, np.concatenate(pooled_raw))[0], abs=1e-6)
    assert pooled["ece_after"] == pytest.approx(expected_calibration_error(
        y_all, np.concatenate(pooled_cal))[0], abs=1e-6)
    assert pooled["ece_after"] < pooled["ece_before"]  # overconfident: scaling helps
    assert (out / "reliability.png").exists()
    report = evaluate_run(out, features=str(bags), labels=str(bags / "labels.csv"),
                          out=tmp_path / "eval", n_boot=10)
    for k in range(3):
        assert report["folds"][str(k)]["calibration"]["label"]["temperature"] == \
            pytest.approx(temps[k])
        model, _ = load_model(torch.load(out / f"checkpoints/fold{k}/best.pt",
                                         weights_only=True))
        ids = [r["slide_id"] for r in csv.DictReader(open(tmp_path / "eval" /
                                                          f"predictions_fold{k}.csv"))]
        z = predict(model, BagDataset([paths[i] for i in ids], table.y(ids)),
                    torch.device("cpu"), 4).logits
        got = np.array([[float(r["prob_normal"]), float(r["prob_tumor"])] for r in
                        csv.DictReader(open(tmp_path / "eval" / f"predictions_fold{k}.csv"))])
        np.testing.assert_allclose(got, apply_temperature(z, temps[k]), atol=1e-6)
    assert set(report["pooled"]["calibration"]["label"]) == {"ece_before", "ece_after"}
