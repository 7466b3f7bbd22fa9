"""Survival analysis for slide-level MIL: discrete-time hazard (NLL) and Cox losses, Harrell's C
with a bootstrap interval, Kaplan-Meier, the log-rank test and a Kaplan-Meier plot.

    edges = time_bins(train_times, train_events, n_bins=4)        # quantiles of the event times
    y = torch.from_numpy(discretize(train_times, edges))          # bin index per slide
    loss = nll_survival_loss(model(x), y, events).mean()          # model(x): (B, K) hazard logits
    risk = nll_risk(logits).detach().numpy()                      # higher = worse
    c = concordance_index(times, risk, events)                    # == lifelines(times, -risk, events)
    c, lo, hi = bootstrap_c_index(times, risk, events)
    img = km_plot(times, events, risk > np.median(risk))          # RGB uint8, with log-rank p

Or a single risk output with ``cox_loss(model(x).squeeze(1), times, events) / events.sum()``.
Plain numpy + torch; the tests check everything against lifelines.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "time_bins",
    "discretize",
    "nll_survival_loss",
    "nll_risk",
    "cox_loss",
    "concordance_index",
    "bootstrap_c_index",
    "kaplan_meier",
    "logrank_test",
    "km_plot",
]

#: Pairwise comparisons per chunk in the C-index (bounds memory at a few MiB).
_CHUNK = 1 << 22
#: Largest (events × n) pair matrix the bootstrap builds; beyond it resamples are scored one by one.
_BOOT_MATRIX = 1 << 23


def time_bins(times: np.ndarray, events: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin edges for a discrete-time hazard model (Zadeh & Schmid 2020; PORPOISE).

    The interior edges are the ``k / n_bins`` quantiles of the uncensored times (of all times
    when there are fewer than ``n_bins`` events); ``edges[0] = 0`` and ``edges[-1] = inf``, so
    every time falls in a bin. Tied quantiles are merged: fewer than ``n_bins`` bins come back
    then (at least one), never an empty one. Bins are ``[edges[k], edges[k + 1])``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    t = np.asarray(times, np.float64).ravel()
    e = np.asarray(events).ravel() != 0
    src = t[e] if e.sum() >= n_bins else t
    src = src[np.isfinite(src)]
    if n_bins == 1 or len(src) == 0:
        return np.array([0.0, np.inf])
    inner = np.unique(np.quantile(src, np.arange(1, n_bins) / n_bins))
    inner = inner[inner > 0]
    return np.concatenate([[0.0], inner, [np.inf]]).astype(np.float64)


def discretize(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin ``k`` with ``edges[k] <= t < edges[k + 1]`` of each time, clipped to the bins."""
    edges = np.asarray(edges, np.float64)
    k = np.searchsorted(edges, np.asarray(times, np.float64), side="right") - 1
    return np.clip(k, 0, len(edges) - 2).astype(np.int64)


def nll_survival_loss(logits: torch.Tensor, bins: torch.Tensor, events: torch.Tensor,
                      eps: float = 1e-7) -> torch.Tensor:
    """Per-bag discrete-time negative log-likelihood, shape (B,) (reduce it yourself).

    ``logits`` (B, K) are hazard logits, h_k = sigmoid(logit_k) = P(T in bin k | T >= bin k),
    and S_k = prod_{j<=k} (1 - h_j). With ``bins`` the bin of the observed time and ``events``
    nonzero for an observed event:

    * event in bin k: ``-log h_k - log S_{k-1}``  (survived the earlier bins, died in k);
    * censored in bin k: ``-log S_k``  (survived through bin k) -- the convention of Zadeh &
      Schmid 2020 and PORPOISE's ``nll_loss`` (there with ``alpha = 0``).

    Logs come from ``logsigmoid``; each log-probability is floored at ``log(eps)`` like the
    ``clamp(min=eps)`` of the reference code, so a term is at most ``-log(eps)`` (~16.1)
    and carries no gradient once there (``eps = 0`` removes the floor).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, K), got {tuple(logits.shape)}")
    floor = math.log(eps) if eps > 0 else -math.inf
    log_h = F.logsigmoid(logits)
    log_s = torch.cumsum(F.logsigmoid(-logits), dim=1)  # log S_k
    log_s_prev = torch.cat([torch.zeros_like(log_s[:, :1]), log_s[:, :-1]], dim=1)  # log S_{k-1}
    k = bins.reshape(-1, 1).to(device=logits.device, dtype=torch.long)
    event_nll = -(log_h.gather(1, k).clamp_min(floor) + log_s_prev.gather(1, k).clamp_min(floor))
    censor_nll = -log_s.gather(1, k).clamp_min(floor)
    is_event = events.reshape(-1, 1).to(logits.device) != 0
    return torch.where(is_event, event_nll, censor_nll).squeeze(1)


def nll_risk(logits: torch.Tensor) -> torch.Tensor:
    """Risk score (B,) from hazard logits (B, K): ``-sum_k S_k`` (higher = shorter survival)."""
    return -torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=1)).sum(dim=1)


def cox_loss(risk: torch.Tensor, times: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Cox negative partial log-likelihood over the batch, Breslow ties, SUMMED over events.

    ``-sum_{i: event} [r_i - log sum_{j: t_j >= t_i} exp(r_j)]``: the risk set of an event
    at time t is everyone with time >= t, tied times included. A 0-d tensor; it is 0 (still
    attached to ``risk``'s graph) when the batch has no event. The caller normalises, e.g. by
    the number of events in the batch (which makes it the usual mean partial likelihood).
    """
    r = risk.reshape(-1)
    if r.numel() == 0:
        return r.sum() * 0.0
    t = times.reshape(-1).to(r.device)
    e = (events.reshape(-1).to(r.device) != 0).to(r.dtype)
    order = torch.argsort(t, descending=True)
    r, t, e = r[order], t[order], e[order]
    lse = torch.logcumsumexp(r, dim=0)  # log sum exp over sorted positions 0..p
    neg_t = -t  # ascending: the last position of each tie group closes its risk set
    last = torch.searchsorted(neg_t.contiguous(), neg_t.contiguous(), right=True) - 1
    return -(e * (r - lse[last])).sum()


def _comparable_rows(t: np.ndarray, r: np.ndarray, ev: np.ndarray, ti: np.ndarray,
                     ri: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For events (ti, ri) against everyone: comparable, concordant and risk-tied masks.

    A pair (event i, any j) is comparable when t_i < t_j, or t_i == t_j and j is censored
    (two events at the same time are not compared) -- the rules of lifelines.
    """
    a_t, a_r = ti[:, None], ri[:, None]
    comp = (a_t < t) | ((a_t == t) & ~ev)
    return comp, comp & (a_r > r), comp & (a_r == r)


def _prepare(times: np.ndarray, risk: np.ndarray, events: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.asarray(times, np.float64).ravel()
    r = np.asarray(risk, np.float64).ravel()
    ev = np.asarray(events, np.float64).ravel() != 0
    if not len(t) == len(r) == len(ev):
        raise ValueError(f"lengths differ: times {len(t)}, risk {len(r)}, events {len(ev)}")
    if np.isnan(t).any():
        raise ValueError("NaN in times")
    return t, r, ev


def concordance_index(times: np.ndarray, risk: np.ndarray, events: np.ndarray) -> float:
    """Harrell's C, a higher risk meaning a shorter time: ``lifelines.utils.concordance_index(
    times, -risk, events)``, bit for bit (pairs tied in risk count 0.5; an event and a censored
    slide at the same time are comparable, two events at the same time are not).

    NaN when there is no comparable pair, or when ``risk`` has a NaN. Exact integer pair
    counts, chunked over the events (O(n_events * n) time, bounded memory; n = 2000 in ms).
    """
    t, r, ev = _prepare(times, risk, events)
    if np.isnan(r).any():
        return float("nan")
    ti, ri = t[ev], r[ev]
    step = max(1, _CHUNK // max(len(t), 1))
    pairs = correct = tied = 0
    for s in range(0, len(ti), step):
        comp, gt, eq = _comparable_rows(t, r, ev, ti[s:s + step], ri[s:s + step])
        pairs += int(np.count_nonzero(comp))
        correct += int(np.count_nonzero(gt))
        tied += int(np.count_nonzero(eq))
    return float("nan") if pairs == 0 else (correct + tied / 2) / pairs


def bootstrap_c_index(times: np.ndarray, risk: np.ndarray, events: np.ndarray, n_boot: int = 1000,
                      seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(estimate, low, high): C-index with a percentile bootstrap over slides.

    Resamples are drawn with ``np.random.default_rng(seed)``; those without a comparable
    pair are skipped; (est, nan, nan) when ``n_boot == 0`` or no resample is usable. Each
    resample's C is exact (weighted pair counts through one pair matrix, not an approximation).
    """
    t, r, ev = _prepare(times, risk, events)
    est = concordance_index(t, r, ev)
    n = len(t)
    if n_boot <= 0 or n < 2 or math.isnan(est):
        return est, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, n, n) for _ in range(n_boot)]
    n_ev = int(ev.sum())
    if n_ev * n <= _BOOT_MATRIX:
        comp, gt, eq = _comparable_rows(t, r, ev, t[ev], r[ev])
        pair_m = comp.astype(np.float64)  # (n_events, n); counts are exact in float64
        score_m = gt + 0.5 * eq
        vals = []
        for s in range(0, n_boot, 256):
            w = np.stack([np.bincount(d, minlength=n) for d in draws[s:s + 256]]).astype(np.float64)
            w_ev = w[:, ev]
            pairs = ((w_ev @ pair_m) * w).sum(1)
            score = ((w_ev @ score_m) * w).sum(1)
            ok = pairs > 0
            vals.append(score[ok] / pairs[ok])
        c = np.concatenate(vals)
    else:
        c = np.array([concordance_index(t[d], r[d], ev[d]) for d in draws])
        c = c[~np.isnan(c)]
    if len(c) == 0:
        return est, float("nan"), float("nan")
    lo, hi = np.quantile(c, [alpha / 2, 1 - alpha / 2])
    return est, float(lo), float(hi)


def kaplan_meier(times: np.ndarray, events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct observed times (events and censorings) and the Kaplan-Meier S(t) at each
    (right-continuous: just after the deaths at t), as lifelines' ``survival_function_``."""
    t = np.asarray(times, np.float64).ravel()
    e = np.asarray(events).ravel() != 0
    uniq, inv = np.unique(t, return_inverse=True)
    leaving = np.bincount(inv, minlength=len(uniq))
    deaths = np.bincount(inv, weights=e.astype(np.float64), minlength=len(uniq))
    at_risk = len(t) - np.concatenate([[0], np.cumsum(leaving)[:-1]])
    return uniq, np.cumprod(1.0 - deaths / at_risk)


def logrank_test(times: np.ndarray, events: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """Two-group log-rank test: (chi-square statistic with 1 df, p-value).

    ``group`` holds two labels (bool, 0/1, strings); the statistic is symmetric. (nan, nan)
    when a group is empty or the variance is 0 (no events) -- where lifelines says (0, 1).
    """
    t = np.asarray(times, np.float64).ravel()
    e = np.asarray(events).ravel() != 0
    g = np.asarray(group).ravel()
    labels = np.unique(g)
    if len(labels) > 2:
        raise ValueError(f"logrank_test takes two groups, got {len(labels)}")
    if len(labels) < 2:
        return float("nan"), float("nan")
    in_a = g == labels[1]
    uniq, inv = np.unique(t, return_inverse=True)
    m = len(uniq)

    def at_risk(mask: np.ndarray) -> np.ndarray:
        leaving = np.bincount(inv[mask], minlength=m)
        return mask.sum() - np.concatenate([[0], np.cumsum(leaving)[:-1]])

    n_all, n_a = at_risk(np.ones_like(in_a)).astype(np.float64), at_risk(in_a).astype(np.float64)
    d_all = np.bincount(inv, weights=e.astype(np.float64), minlength=m)
    d_a = np.bincount(inv, weights=(e & in_a).astype(np.float64), minlength=m)
    expected = (d_all * n_a / n_all).sum()
    big = n_all > 1  # at n = 1 one group is empty, so the term is 0
    na, nn, dd = n_a[big], n_all[big], d_all[big]
    var = (na * (nn - na) * dd * (nn - dd) / (nn**2 * (nn - 1))).sum()
    if var <= 0:
        return float("nan"), float("nan")
    stat = float((d_a.sum() - expected) ** 2 / var)
    return stat, math.erfc(math.sqrt(stat / 2))


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    return float(next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw))


def _fmt(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:g}"


def km_plot(times: np.ndarray, events: np.ndarray, high_risk: np.ndarray, title: str = "",
            size: int = 480) -> np.ndarray:
    """Kaplan-Meier curves of the low- (blue) and high-risk (red) groups as an RGB uint8 image
    (size x size x 3): censor ticks, axes, a legend with group sizes and the log-rank p
    ("n/a" when a group is empty or there are no events)."""
    t = np.asarray(times, np.float64).ravel()
    e = np.asarray(events).ravel() != 0
    hi = np.asarray(high_risk).ravel().astype(bool)
    pad_l, pad_b, pad_t, pad_r = 50, 40, 44, 15
    w, h = size - pad_l - pad_r, size - pad_b - pad_t
    img = np.full((size, size, 3), 255, np.uint8)
    t_max = float(t.max()) if len(t) and np.isfinite(t).all() and t.max() > 0 else 1.0

    def px(ft: float, fy: float) -> tuple[int, int]:
        return int(round(pad_l + ft / t_max * w)), int(round(pad_t + (1 - fy) * h))

    font, black, grey = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (225, 225, 225)
    step = _nice_step(t_max)
    x_ticks = [k * step for k in range(int(t_max / step + 1e-9) + 1)]
    for y in (0.0, 0.25, 0.5, 0.75, 1.0):
        cv2.line(img, px(0, y), px(t_max, y), grey, 1)
        cv2.putText(img, f"{y:.2f}", (6, px(0, y)[1] + 4), font, 0.38, black, 1, cv2.LINE_AA)
    for x in x_ticks:
        cv2.line(img, px(x, 0), (px(x, 0)[0], px(x, 0)[1] + 4), black, 1)
        label = _fmt(x)
        cv2.putText(img, label, (px(x, 0)[0] - 4 * len(label), size - pad_b + 17), font, 0.38,
                    black, 1, cv2.LINE_AA)
    cv2.rectangle(img, px(0, 1), px(t_max, 0), black, 1)
    cv2.putText(img, "time", (pad_l + w // 2 - 15, size - 6), font, 0.45, black, 1, cv2.LINE_AA)
    cv2.putText(img, "survival", (4, pad_t - 8), font, 0.45, black, 1, cv2.LINE_AA)

    groups = ((~hi, (40, 90, 210), "low risk"), (hi, (215, 45, 40), "high risk"))
    for mask, color, _ in groups:
        if mask.any():
            ut, s = kaplan_meier(t[mask], e[mask])
            pts, prev = [px(0, 1)], 1.0
            for ti, si in zip(ut, s):
                pts += [px(ti, prev), px(ti, si)]
                prev = float(si)
            cv2.polylines(img, [np.array(pts, np.int32).reshape(-1, 1, 2)], False, color, 2,
                          cv2.LINE_AA)
            for c in np.unique(t[mask & ~e]):  # censor ticks on the curve
                x, y = px(c, float(s[np.searchsorted(ut, c)]))
                cv2.line(img, (x, y - 5), (x, y + 5), color, 1, cv2.LINE_AA)
    # the legend goes in whichever free corner the curves cross least (bottom left first)
    bw, bh = 150, 42
    corners = [(pad_l + 4, pad_t + h - bh - 4), (pad_l + w - bw - 4, pad_t + 4),
               (pad_l + w - bw - 4, pad_t + h - bh - 4)]
    ink = [np.count_nonzero(img[y:y + bh, x:x + bw].min(2) < 200) for x, y in corners]
    lx, ly = corners[int(np.argmin(ink))]
    cv2.rectangle(img, (lx, ly), (lx + bw, ly + bh), (255, 255, 255), -1)
    cv2.rectangle(img, (lx, ly), (lx + bw, ly + bh), (150, 150, 150), 1)
    for j, (mask, color, name) in enumerate(groups):
        y = ly + 16 + 18 * j
        cv2.line(img, (lx + 6, y - 4), (lx + 28, y - 4), color, 2, cv2.LINE_AA)
        cv2.putText(img, f"{name} (n={int(mask.sum())})", (lx + 34, y), font, 0.4, black, 1,
                    cv2.LINE_AA)
    _, p = logrank_test(t, e, hi) if hi.any() and (~hi).any() else (0.0, float("nan"))
    p_txt = "= n/a" if math.isnan(p) else ("< 1e-16" if p < 1e-16 else f"= {p:.3g}")
    label = f"{title}  log-rank p {p_txt}".strip()
    cv2.putText(img, label, (pad_l + 70, pad_t - 12), font, 0.45, black, 1, cv2.LINE_AA)
    return img
