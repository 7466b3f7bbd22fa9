"""Regression targets: a standardized continuous value, MSE or Huber loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from gigamil.errors import UsageError
from gigamil.mil.targets.base import TARGETS, Target, labelled

__all__ = ["Regression"]


@dataclass
class Regression(Target):
    """A continuous value, standardized on the fold's training slides; MSE or Huber."""

    column: str = "value"
    loss_kind: str = "mse"  # or "huber"
    mean: float = 0.0
    std: float = 1.0

    kind: ClassVar[str] = "regression"
    metric_names: ClassVar[tuple[str, ...]] = ("r2", "mae", "rmse", "pearson")

    @property
    def csv_columns(self) -> tuple[str, ...]:
        return (self.column,)

    @property
    def label_names(self) -> list[str]:
        return ["value"]

    def parse(self, cells: dict[str, str], where: str) -> list[float]:
        v = cells[self.column]
        if not v:
            return [math.nan]
        try:
            x = float(v)
        except ValueError:
            raise UsageError(f"{where}: {self.column} {v!r} is not a number",
                             "regression targets are numbers; leave the cell empty if unknown"
                             ) from None
        if not math.isfinite(x):
            raise UsageError(f"{where}: {self.column} {v!r} is not finite", "give a number")
        return [x]

    def finish_parsing(self, y: np.ndarray, where: str) -> None:
        known = y[labelled(y), 0]
        if len(known) < 2 or float(np.std(known)) == 0:
            raise UsageError(f"{self.column} {where} takes a single value",
                             "a regression target needs values that differ")

    def stratum(self, y: np.ndarray) -> str:
        return ""

    @property
    def n_outputs(self) -> int:
        return 1

    def fit(self, y: np.ndarray) -> None:
        known = y[labelled(y), 0]
        if len(known) == 0:  # no training slide of this fold has the value: it is masked
            self.mean, self.std = 0.0, 1.0
            return
        self.mean = float(np.mean(known))
        std = float(np.std(known))
        self.std = std if np.isfinite(std) and std > 1e-12 else 1.0

    def loss(self, out: torch.Tensor, y: torch.Tensor, epoch: int | None = 0) -> torch.Tensor:
        known = ~torch.isnan(y[:, 0])
        z = torch.where(known, (y[:, 0] - self.mean) / self.std, torch.zeros_like(y[:, 0]))
        pred = out[:, 0]
        if self.loss_kind == "huber":
            per_bag = F.huber_loss(pred, z.to(pred.dtype), reduction="none")
        else:
            per_bag = F.mse_loss(pred, z.to(pred.dtype), reduction="none")
        return torch.where(known, per_bag, torch.zeros_like(per_bag))

    def scores(self, out: np.ndarray) -> np.ndarray:
        return np.asarray(out, np.float64)[:, :1] * self.std + self.mean

    @property
    def score_names(self) -> list[str]:
        return ["pred"]

    def metrics(self, y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        from gigamil.mil.calibration import regression_metrics

        keep = labelled(y)
        return regression_metrics(y[keep, 0], scores[keep, 0])

    def bootstrap(self, y: np.ndarray, scores: np.ndarray, n_boot: int, seed: int
                  ) -> dict[str, tuple[float, float, float]]:
        from gigamil.mil.calibration import bootstrap_regression

        keep = labelled(y)
        return bootstrap_regression(y[keep, 0], scores[keep, 0], n_boot, seed)


TARGETS.register("regression")(Regression)
