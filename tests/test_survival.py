"""Survival maths against lifelines (C-index, Kaplan-Meier, log-rank) and brute-force losses."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test as ll_logrank
from lifelines.utils import concordance_index as ll_cindex

from gigamil.mil import survival
from gigamil.mil.survival import (
    bootstrap_c_index,
    concordance_index,
    cox_loss,
    discretize,
    kaplan_meier,
    km_plot,
    logrank_test,
    nll_risk,
    nll_survival_loss,
    time_bins,
)


def _tied_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer times (many ties), coarse risks (many ties) and ~40 % censoring."""
    rng = np.random.default_rng(seed)
    times = rng.integers(1, 12, n).astype(np.float64)
    risk = np.round(rng.normal(size=n) - 0.1 * times, 1)
    events = (rng.random(n) < 0.6).astype(np.int64)
    return times, risk, events


def _planted(n: int, seed: int, d: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exponential times whose log-hazard is 1.5 * x[:, 0]; independent censoring (~35 %)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    t_event = rng.exponential(1.0 / np.exp(1.5 * x[:, 0]))
    t_censor = rng.exponential(2.0, n)
    return x, np.minimum(t_event, t_censor), (t_event <= t_censor).astype(np.int64)


# ----------------------------------------------------------------------------- C-index

@pytest.mark.parametrize("seed", range(8))
def test_concordance_matches_lifelines(seed: int) -> None:
    times, risk, events = _tied_data(int(np.random.default_rng(seed).integers(5, 400)), seed)
    assert len(np.unique(times)) < len(times) and len(np.unique(risk)) < len(risk)
    ours = concordance_index(times, risk, events)
    assert abs(ours - ll_cindex(times, -risk, events)) <= 1e-12


def test_concordance_tie_rules_by_hand() -> None:
    # An event and a censoring at the same time are comparable; two events at one time are not.
    times = np.array([1.0, 1.0, 1.0, 2.0])
    events = np.array([1, 0, 1, 1])
    risk = np.array([3.0, 1.0, 3.0, 3.0])
    # comparable pairs: (0,1) (0,3) (2,1) (2,3) -> concordant 2, risk-tied 2
    assert concordance_index(times, risk, events) == pytest.approx(0.75)
    assert concordance_index(times, risk, events) == ll_cindex(times, -risk, events)


def test_concordance_undefined_is_nan() -> None:
    assert math.isnan(concordance_index(np.array([1.0, 2.0]), np.array([0.0, 1.0]), np.zeros(2)))
    assert math.isnan(concordance_index(np.array([3.0]), np.array([1.0]), np.ones(1)))
    assert math.isnan(concordance_index(np.array([1.0, 2.0]), np.array([np.nan, 1.0]), np.ones(2)))
    with pytest.raises(ZeroDivisionError):  # lifelines raises where we say NaN
        ll_cindex(np.array([1.0, 2.0]), np.array([0.0, 1.0]), np.zeros(2))


def test_concordance_is_fast_and_exact_at_n_2000() -> None:
    rng = np.random.default_rng(3)
    times, risk = rng.exponential(size=2000), rng.normal(size=2000)
    events = rng.random(2000) < 0.7
    start = time.perf_counter()
    ours = concordance_index(times, risk, events)
    assert time.perf_counter() - start < 1.0
    assert ours == ll_cindex(times, -risk, events)


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_c_index_interval_and_determinism() -> None:
    x, times, events = _planted(500, 4)
    risk = x[:, 0] + np.random.default_rng(0).normal(size=500)
    start = time.perf_counter()
    est, lo, hi = bootstrap_c_index(times, risk, events, n_boot=1000, seed=1)
    assert time.perf_counter() - start < 2.0
    assert est == concordance_index(times, risk, events)
    assert lo < est < hi and 0.0 < hi - lo < 0.2
    assert bootstrap_c_index(times, risk, events, n_boot=1000, seed=1) == (est, lo, hi)
    assert bootstrap_c_index(times, risk, events, n_boot=1000, seed=2) != (est, lo, hi)
    e0, l0, h0 = bootstrap_c_index(times, risk, events, n_boot=0)
    assert e0 == est and math.isnan(l0) and math.isnan(h0)


def test_bootstrap_resamples_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pair-matrix shortcut equals scoring each resample (the fallback) and a plain loop."""
    times, risk, events = _tied_data(60, 5)
    fast = bootstrap_c_index(times, risk, events, n_boot=200, seed=7, alpha=0.1)
    rng = np.random.default_rng(7)
    draws = [rng.integers(0, 60, 60) for _ in range(200)]
    vals = np.array([concordance_index(times[d], risk[d], events[d]) for d in draws])
    lo, hi = np.quantile(vals[~np.isnan(vals)], [0.05, 0.95])
    assert fast[1:] == (float(lo), float(hi))
    monkeypatch.setattr(survival, "_BOOT_MATRIX", 0)
    assert bootstrap_c_index(times, risk, events, n_boot=200, seed=7, alpha=0.1) == fast


def test_bootstrap_skips_unusable_resamples() -> None:
    # One event among 8: many resamples miss it (no comparable pair) and are left out.
    times = np.arange(1.0, 9.0)
    events = np.array([1, 0, 0, 0, 0, 0, 0, 0])
    risk = np.arange(8.0)[::-1]
    est, lo, hi = bootstrap_c_index(times, risk, events, n_boot=300)
    assert est == 1.0 and lo == 1.0 and hi == 1.0
    est, lo, hi = bootstrap_c_index(times, risk, np.zeros(8), n_boot=300)
    assert math.isnan(est) and math.isnan(lo) and math.isnan(hi)


# ----------------------------------------------------------------------------- KM and log-rank

@pytest.mark.parametrize("seed", range(4))
def test_kaplan_meier_matches_lifelines(seed: int) -> None:
    times, _, events = _tied_data(150, seed)
    times[:5] = 0.5 + np.arange(5)  # a few distinct, non-integer times too
    ut, surv = kaplan_meier(times, events)
    assert np.all(np.diff(ut) > 0) and np.array_equal(ut, np.unique(times))
    kmf = KaplanMeierFitter().fit(times, events)
    ref = kmf.survival_function_.loc[ut, "KM_estimate"].to_numpy()
    np.testing.assert_allclose(surv, ref, rtol=0, atol=1e-12)
    assert np.all(np.diff(surv) <= 0)


@pytest.mark.parametrize("seed", range(5))
def test_logrank_matches_lifelines(seed: int) -> None:
    rng = np.random.default_rng(seed)
    times, _, events = _tied_data(200, seed)
    group = rng.random(200) < 0.4
    times = times + 2.0 * group * rng.random(200)  # the groups differ a little
    res = ll_logrank(times[group], times[~group], events[group], events[~group])
    stat, p = logrank_test(times, events, group)
    assert stat == pytest.approx(res.test_statistic, rel=1e-9, abs=1e-9)
    assert p == pytest.approx(res.p_value, rel=1e-8, abs=1e-12)
    labels = np.where(group, "high", "low")
    assert logrank_test(times, events, labels)[0] == pytest.approx(stat, rel=1e-12)


def test_logrank_degenerate_and_separated() -> None:
    times = np.arange(1.0, 21.0)
    group = np.arange(20) >= 10
    stat, p = logrank_test(times, np.ones(20), group)  # the first group all dies first
    assert stat > 10 and p < 1e-3
    assert all(math.isnan(v) for v in logrank_test(times, np.zeros(20), group))
    assert all(math.isnan(v) for v in logrank_test(times, np.ones(20), np.zeros(20, bool)))
    with pytest.raises(ValueError):
        logrank_test(times, np.ones(20), np.arange(20) % 3)


# ----------------------------------------------------------------------------- Cox loss

def _cox_brute(risk: torch.Tensor, times: list[float], events: list[int]) -> torch.Tensor:
    total = risk.new_zeros(())
    for i, (t_i, e_i) in enumerate(zip(times, events)):
        if e_i:
            at_risk = [j for j, t_j in enumerate(times) if t_j >= t_i]
            total = total - (risk[i] - torch.logsumexp(risk[at_risk], 0))
    return total


@pytest.mark.parametrize("seed", range(4))
def test_cox_loss_matches_breslow_loop(seed: int) -> None:
    times, _, events = _tied_data(40, seed)
    rng = np.random.default_rng(seed)
    r64 = torch.tensor(rng.normal(size=40) * 2, dtype=torch.float64, requires_grad=True)
    ours = cox_loss(r64, torch.tensor(times), torch.tensor(events))
    ref = _cox_brute(r64, times.tolist(), events.tolist())
    assert ours.ndim == 0 and ours.item() == pytest.approx(ref.item(), rel=1e-12)
    g_ours, = torch.autograd.grad(ours, r64)
    g_ref, = torch.autograd.grad(ref, r64)
    assert torch.isfinite(g_ours).all()
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    r32 = r64.detach().float().requires_grad_()
    loss32 = cox_loss(r32 * 30, torch.tensor(times), torch.tensor(events))  # large risks: stable
    loss32.backward()
    assert loss32.dtype == torch.float32 and torch.isfinite(loss32)
    assert r32.grad is not None and torch.isfinite(r32.grad).all()


def test_cox_loss_without_events_is_zero_with_grad() -> None:
    risk = torch.randn(6, requires_grad=True)
    loss = cox_loss(risk, torch.arange(6.0), torch.zeros(6))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert risk.grad is not None and torch.all(risk.grad == 0)
    empty = torch.zeros(0, requires_grad=True)
    assert cox_loss(empty, torch.zeros(0), torch.zeros(0)).item() == 0.0


# ----------------------------------------------------------------------------- NLL loss

def _nll_brute(logits: np.ndarray, bins: np.ndarray, events: np.ndarray) -> np.ndarray:
    out = []
    for row, k, e in zip(logits, bins, events):
        h = [1 / (1 + math.exp(-v)) for v in row]
        surv_before = math.prod(1 - h[j] for j in range(k))
        if e:
            out.append(-math.log(h[k]) - math.log(surv_before))
        else:
            out.append(-math.log(surv_before * (1 - h[k])))
    return np.array(out)


def test_nll_survival_loss_matches_loop() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(32, 5)) * 2
    bins, events = rng.integers(0, 5, 32), rng.integers(0, 2, 32)
    ref = _nll_brute(logits, bins, events)
    ours = nll_survival_loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(bins),
                             torch.tensor(events, dtype=torch.float32))
    assert ours.shape == (32,) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-5)
    ours64 = nll_survival_loss(torch.tensor(logits), torch.tensor(bins),
                               torch.tensor(events).bool(), eps=0.0)
    np.testing.assert_allclose(ours64.numpy(), ref, rtol=1e-12)


def test_nll_survival_loss_is_stable_and_floored() -> None:
    logits = torch.tensor([[-200.0, 0.0], [200.0, 200.0]], requires_grad=True)
    loss = nll_survival_loss(logits, torch.tensor([0, 1]), torch.tensor([1, 0]))
    assert torch.isfinite(loss).all() and torch.all(loss <= -math.log(1e-7) * 2 + 1e-3)
    loss.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    unfloored = nll_survival_loss(logits.detach(), torch.tensor([0, 1]), torch.tensor([1, 0]),
                                  eps=0.0)
    assert unfloored[0].item() == pytest.approx(200.0, rel=1e-4)  # -log sigmoid(-200), no inf


def test_nll_risk_orders_by_hazard() -> None:
    logits = torch.tensor([[-3.0, -3.0, -3.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    risk = nll_risk(logits)
    assert risk.shape == (3,) and bool(risk[0] < risk[1] < risk[2])
    s = torch.cumprod(1 - torch.sigmoid(logits), 1)
    torch.testing.assert_close(risk, -s.sum(1))


# ----------------------------------------------------------------------------- training

def _fit(loss_fn: str, seed: int = 0) -> float:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    x, times, events = _planted(1000, seed)
    tr, te = slice(0, 600), slice(600, None)
    xt = torch.tensor(x[tr], dtype=torch.float32)
    if loss_fn == "nll":
        edges = time_bins(times[tr], events[tr], 4)
        bins = torch.from_numpy(discretize(times[tr], edges))
        model = torch.nn.Linear(x.shape[1], len(edges) - 1)
    else:
        model = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ev = torch.tensor(events[tr], dtype=torch.float32)
    for _ in range(150):
        opt.zero_grad()
        out = model(xt)
        if loss_fn == "nll":
            loss = nll_survival_loss(out, bins, ev).mean()
        else:
            loss = cox_loss(out.squeeze(1), torch.tensor(times[tr]), ev) / ev.sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(torch.tensor(x[te], dtype=torch.float32))
        risk = nll_risk(out) if loss_fn == "nll" else out.squeeze(1)
    return concordance_index(times[te], risk.numpy(), events[te])


@pytest.mark.parametrize("loss_fn", ["nll", "cox"])
def test_training_learns_planted_hazard(loss_fn: str) -> None:
    assert _fit(loss_fn) > 0.7  # the oracle (x0 itself) is ~0.80 here


# ----------------------------------------------------------------------------- bins

def test_time_bins_quantiles_of_event_times() -> None:
    _, times, events = _planted(400, 1)
    edges = time_bins(times, events, 4)
    assert edges.dtype == np.float64 and len(edges) == 5
    assert edges[0] == 0 and edges[-1] == np.inf and np.all(np.diff(edges) > 0)
    np.testing.assert_allclose(edges[1:-1], np.quantile(times[events == 1], [0.25, 0.5, 0.75]))
    k = discretize(times, edges)
    assert k.dtype == np.int64 and k.min() >= 0 and k.max() <= 3
    assert np.all((edges[k] <= times) & (times < edges[k + 1]))
    counts = np.bincount(k[events == 1], minlength=4)  # about a quarter of the events each
    assert counts.max() - counts.min() <= 2 and counts.sum() == events.sum()


def test_time_bins_duplicates_and_fallbacks() -> None:
    same = time_bins(np.full(20, 5.0), np.ones(20), 4)
    np.testing.assert_array_equal(same, [0.0, 5.0, np.inf])
    assert discretize(np.array([4.9, 5.0, 9.0]), same).tolist() == [0, 1, 1]
    lumpy = time_bins(np.array([1, 1, 1, 1, 1, 1, 2, 3.0]), np.ones(8), 4)
    assert np.all(np.diff(lumpy) > 0) and 2 <= len(lumpy) <= 5
    # two events < 3 bins: the quantiles of all times are used
    few = time_bins(np.arange(1.0, 13.0), np.r_[1, 1, np.zeros(10)], 3)
    np.testing.assert_allclose(few[1:-1], np.quantile(np.arange(1.0, 13.0), [1 / 3, 2 / 3]))
    np.testing.assert_array_equal(time_bins(np.zeros(5), np.ones(5), 4), [0.0, np.inf])
    np.testing.assert_array_equal(time_bins(np.arange(5.0), np.ones(5), 1), [0.0, np.inf])
    with pytest.raises(ValueError):
        time_bins(np.arange(5.0), np.ones(5), 0)


# ----------------------------------------------------------------------------- plot

def test_km_plot_draws_both_groups() -> None:
    x, times, events = _planted(200, 2)
    img = km_plot(times, events, x[:, 0] > 0, title="test", size=400)
    assert img.shape == (400, 400, 3) and img.dtype == np.uint8
    r, g, b = (img[..., i].astype(int) for i in range(3))
    assert np.count_nonzero((r > 180) & (g < 90) & (b < 90)) > 100  # the red curve
    assert np.count_nonzero((b > 180) & (r < 90) & (g < 130)) > 100  # the blue curve


@pytest.mark.parametrize("case", ["empty_group", "no_events", "empty"])
def test_km_plot_degenerate_inputs(case: str) -> None:
    times = np.arange(1.0, 31.0)
    events, high = np.ones(30), np.arange(30) % 2 == 0
    if case == "empty_group":
        high = np.zeros(30, bool)
    elif case == "no_events":
        events = np.zeros(30)
    else:
        times, events, high = np.zeros(0), np.zeros(0), np.zeros(0, bool)
    img = km_plot(times, events, high)
    assert img.shape == (480, 480, 3) and img.dtype == np.uint8
    assert np.count_nonzero(img.min(2) < 128) > 500  # axes, ticks and labels were drawn
