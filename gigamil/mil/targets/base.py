"""The target interface: label parsing, loss, scores, metrics and prediction columns."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from gigamil.registry import Registry

__all__ = ["Target", "TARGETS", "labelled"]

#: kind → target class (``classification``, ``survival``, ``regression``)
TARGETS: Registry[Target] = Registry("target kind")


@dataclass
class Target(ABC):
    """One prediction target: its label column(s), its head's outputs, loss and metrics."""

    name: str
    weight: float = 1.0
    prefix: str = ""  # of its metric and prediction columns ("" when it is the only target)
    outputs: slice = field(default_factory=lambda: slice(0, 0))  # its logits in the output
    columns: slice = field(default_factory=lambda: slice(0, 0))  # its label-matrix columns

    kind: ClassVar[str]
    width: ClassVar[int] = 1  # label-matrix columns
    batch_loss: ClassVar[bool] = False  # a loss over the whole batch (Cox), not per bag
    metric_names: ClassVar[tuple[str, ...]]

    # -- labels -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def csv_columns(self) -> tuple[str, ...]:
        """The labels-CSV columns it reads."""

    def prepare(self, rows: Sequence[dict[str, str]], where: str) -> None:
        """Learn what the whole labels file defines before any row is parsed (classes)."""
        return None

    @abstractmethod
    def parse(self, cells: dict[str, str], where: str) -> list[float]:
        """This slide's label-matrix values (NaN where the cell is empty)."""

    def finish_parsing(self, y: np.ndarray, where: str) -> None:
        """Check every slide's values together; raise a clear error."""
        return None

    def stratum(self, y: np.ndarray) -> str:
        """The value folds are stratified on ("" when missing)."""
        return "" if math.isnan(y[0]) else str(int(y[0]))

    def fit(self, y: np.ndarray) -> None:
        """Learn what the fold's training slides define (bins, standardization)."""
        return None

    def calibrate(self, y: np.ndarray, out: np.ndarray) -> None:
        """Fit post-hoc calibration on a fold's inner validation slides (``out``: their
        logits); only classification has any (temperature scaling)."""
        return None

    def uncalibrated(self) -> Target:
        """This target without its post-hoc calibration (itself when it has none)."""
        return self

    @property
    @abstractmethod
    def n_outputs(self) -> int:
        """Logits its head produces."""

    # -- training -----------------------------------------------------------------------------
    @abstractmethod
    def loss(self, out: torch.Tensor, y: torch.Tensor, epoch: int | None = 0) -> torch.Tensor:
        """Per-bag loss (B,), 0 where the label is missing; with ``batch_loss`` a sum over
        the batch (0-d). ``epoch`` None: the evaluation loss (no class weights, no
        annealing)."""

    # -- outputs ------------------------------------------------------------------------------
    @abstractmethod
    def scores(self, out: np.ndarray) -> np.ndarray:
        """(n, s) what it reports from logits: probabilities, a risk, a value."""

    @property
    @abstractmethod
    def score_names(self) -> list[str]:
        """Prediction-CSV columns of :meth:`scores`."""

    @property
    def label_names(self) -> list[str]:
        """Prediction-CSV columns of its labels."""
        return list(self.csv_columns)

    def row(self, y: np.ndarray, out: np.ndarray) -> dict[str, Any]:
        """Its prediction-CSV cells of one slide from its logits: labels, then scores."""
        return self.score_row(y, self.scores(out[None])[0])

    def score_row(self, y: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
        """Its prediction-CSV cells of one slide from its scores (an ensemble's mean)."""
        p = self.prefix
        cells = {p + k: ("" if math.isnan(v) else _num(v)) for k, v in zip(self.label_names, y)}
        cells.update({p + k: f"{v:.8g}" for k, v in zip(self.score_names, scores)})
        return cells

    def columns_out(self) -> list[str]:
        return [self.prefix + c for c in (*self.label_names, *self.score_names)]

    def read(self, rows: Sequence[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """(labels (n, width), scores (n, s)) back from prediction-CSV rows."""
        p = self.prefix
        y = np.array([[float(r[p + k]) if r[p + k] != "" else np.nan for k in self.label_names]
                      for r in rows], np.float64).reshape(len(rows), self.width)
        s = np.array([[float(r[p + k]) for k in self.score_names] for r in rows],
                     np.float64).reshape(len(rows), len(self.score_names))
        return y, s

    @abstractmethod
    def metrics(self, y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        """Its metrics on the slides with a label (names without the prefix)."""

    @abstractmethod
    def bootstrap(self, y: np.ndarray, scores: np.ndarray, n_boot: int, seed: int
                  ) -> dict[str, tuple[float, float, float]]:
        """(estimate, 95 % low, high) of each metric."""

    # -- saving -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("outputs", "columns")}
        return {"kind": self.kind, **d}


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.8g}"


def labelled(y: np.ndarray) -> np.ndarray:
    """Rows of a target's label columns with every value present."""
    return ~np.isnan(y).any(axis=1)
