"""Survival targets: discrete-time hazards over quantile bins, or Cox; Harrell's C."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from gigamil.errors import UsageError
from gigamil.mil.targets.base import TARGETS, Target, labelled

__all__ = ["Survival"]


@dataclass
class Survival(Target):
    """Time to event: discrete-time hazards over quantile bins (``nll``), or Cox."""

    time_column: str = "time"
    event_column: str = "event"
    loss_kind: str = "nll"  # or "cox"
    n_bins: int = 4
    edges: list[float] = field(default_factory=list)  # fitted per fold (nll)

    kind: ClassVar[str] = "survival"
    width: ClassVar[int] = 2
    metric_names: ClassVar[tuple[str, ...]] = ("c_index",)

    @property
    def batch_loss(self) -> bool:  # type: ignore[override]
        return self.loss_kind == "cox"

    @property
    def csv_columns(self) -> tuple[str, ...]:
        return (self.time_column, self.event_column)

    @property
    def label_names(self) -> list[str]:
        return ["time", "event"]

    def parse(self, cells: dict[str, str], where: str) -> list[float]:
        t, e = cells[self.time_column], cells[self.event_column]
        if not t or not e:
            return [math.nan, math.nan]
        try:
            time = float(t)
        except ValueError:
            raise UsageError(f"{where}: {self.time_column} {t!r} is not a number",
                             "give the follow-up time as a number (days, months…)") from None
        if not math.isfinite(time) or time < 0:
            raise UsageError(f"{where}: {self.time_column} {t!r} is negative or not finite",
                             "follow-up times are ≥ 0")
        if e not in ("0", "1", "0.0", "1.0", "True", "False", "true", "false"):
            raise UsageError(f"{where}: {self.event_column} {e!r} is not 0 or 1",
                             "1 = the event happened, 0 = censored")
        return [time, 1.0 if e in ("1", "1.0", "True", "true") else 0.0]

    def finish_parsing(self, y: np.ndarray, where: str) -> None:
        known = labelled(y)
        if known.sum() < 2 or y[known, 1].sum() == 0:
            raise UsageError(f"{self.name} {where} has no events",
                             f"survival needs slides with {self.event_column} = 1")

    def stratum(self, y: np.ndarray) -> str:
        return "" if math.isnan(y[1]) else str(int(y[1]))

    @property
    def n_outputs(self) -> int:
        return 1 if self.loss_kind == "cox" else self.n_bins

    def fit(self, y: np.ndarray) -> None:
        if self.loss_kind == "cox":
            return
        from gigamil.mil.survival import time_bins

        known = labelled(y)
        edges = [float(e) for e in time_bins(y[known, 0], y[known, 1], self.n_bins)]
        # fewer distinct quantiles than bins: the missing last bins hold no slide
        self.edges = edges[:-1] + [math.inf] * (self.n_bins + 2 - len(edges))

    def loss(self, out: torch.Tensor, y: torch.Tensor, epoch: int | None = 0) -> torch.Tensor:
        from gigamil.mil.survival import cox_loss, nll_survival_loss

        known = ~torch.isnan(y[:, 0])
        time = torch.where(known, y[:, 0], torch.zeros_like(y[:, 0]))
        event = torch.where(known, y[:, 1], torch.zeros_like(y[:, 1]))
        if self.loss_kind == "cox":
            return cox_loss(out[known, 0], time[known], event[known])
        inner = torch.tensor(self.edges[1:-1], dtype=torch.float64, device=time.device)
        bins = torch.bucketize(time.double(), inner, right=True).clamp_max(self.n_bins - 1)
        per_bag = nll_survival_loss(out, bins, event)
        return torch.where(known, per_bag, torch.zeros_like(per_bag))

    def scores(self, out: np.ndarray) -> np.ndarray:
        if self.loss_kind == "cox":
            return np.asarray(out, np.float64)[:, :1]
        from gigamil.mil.survival import nll_risk

        return nll_risk(torch.from_numpy(np.asarray(out, np.float32))).double().numpy()[:, None]

    @property
    def score_names(self) -> list[str]:
        return ["risk"]

    def metrics(self, y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        from gigamil.mil.survival import concordance_index

        keep = labelled(y)
        return {"c_index": concordance_index(y[keep, 0], scores[keep, 0], y[keep, 1])}

    def bootstrap(self, y: np.ndarray, scores: np.ndarray, n_boot: int, seed: int
                  ) -> dict[str, tuple[float, float, float]]:
        from gigamil.mil.survival import bootstrap_c_index

        keep = labelled(y)
        return {"c_index": bootstrap_c_index(y[keep, 0], scores[keep, 0], y[keep, 1], n_boot,
                                             seed)}


TARGETS.register("survival")(Survival)
