from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from gigamil.mil.metrics import (
    binary_auroc,
    bootstrap_metrics,
    classification_metrics,
    expected_calibration_error,
    reliability_diagram,
)


def _random_case(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y] * rng.uniform(0, 1, (n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


@pytest.mark.parametrize(("n", "c", "seed"), [(50, 2, 0), (200, 2, 1), (120, 3, 2), (90, 5, 3)])
def test_metrics_match_sklearn(n: int, c: int, seed: int) -> None:
    y, probs = _random_case(n, c, seed)
    pred = probs.argmax(1)
    m = classification_metrics(y, probs)
    assert m["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["bal_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    auc = (skm.roc_auc_score(y, probs[:, 1]) if c == 2
           else skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["auroc"] == pytest.approx(auc)
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    for k, f in enumerate(skm.f1_score(y, pred, average=None, labels=range(c))):
        assert m[f"f1_{k}"] == pytest.approx(f)
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))


def test_auroc_ties_and_degenerate_cases() -> None:
    scores = np.array([0.5, 0.5, 0.5, 0.9, 0.1])
    pos = np.array([1, 0, 1, 1, 0], bool)
    assert binary_auroc(pos, scores) == pytest.approx(skm.roc_auc_score(pos, scores))
    assert np.isnan(binary_auroc(np.ones(4, bool), np.arange(4.0)))
    m = classification_metrics(np.zeros(4, int), np.tile([0.7, 0.3], (4, 1)))
    assert np.isnan(m["auroc"]) and m["acc"] == 1.0


def test_ece_by_hand() -> None:
    # two bins used: confidence 0.95 (2 right) and 0.65 (1 of 2 right)
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.65, 0.35], [0.35, 0.65]])
    y = np.zeros(4, int)  # the last one is predicted 1
    ece, acc, conf, count = expected_calibration_error(y, probs, n_bins=10)
    assert count.sum() == 4
    expected = 0.5 * abs(1.0 - 0.95) + 0.5 * abs(0.5 - 0.65)
    assert ece == pytest.approx(expected)


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_n() -> None:
    widths = []
    for n in (40, 400):
        y, probs = _random_case(n, 2, 7)
        ci = bootstrap_metrics(y, probs, n_boot=300, seed=0, classes=["a", "b"])
        est, lo, hi = ci["auroc"]
        assert lo <= est <= hi
        assert {"f1_a", "f1_b", "kappa", "ece"} <= ci.keys()
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 1.8  # ~ 1/sqrt(10)


def test_reliability_diagram_is_an_image() -> None:
    y, probs = _random_case(100, 3, 0)
    img = reliability_diagram(y, probs, title="t")
    assert img.shape == (420, 420, 3) and img.dtype == np.uint8
    assert (img < 200).any()  # something was drawn
