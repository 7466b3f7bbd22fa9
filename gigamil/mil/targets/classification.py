"""Classification targets: classes of one column, cross-entropy or evidential loss;
temperature scaling fitted on a fold's inner validation split (:meth:`Classification.calibrate`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from gigamil.errors import UsageError
from gigamil.mil.targets.base import TARGETS, Target, labelled

__all__ = ["Classification"]


@dataclass
class Classification(Target):
    """Classes of one column; cross-entropy (or evidential), inverse-frequency weights."""

    column: str = "label"
    classes: list[str] = field(default_factory=list)
    evidential: bool = False
    class_weights: list[float] | None = None  # fitted per fold with ``auto_weights``
    auto_weights: bool = True
    temperature: float = 1.0  # softmax(logits / T): fitted on the inner validation split
    calibrated_on: int = 0  # labelled validation slides T was fitted on (0: not fitted)

    kind: ClassVar[str] = "classification"
    metric_names: ClassVar[tuple[str, ...]] = ("acc", "bal_acc", "auroc", "f1_macro", "kappa",
                                               "ece")

    @property
    def csv_columns(self) -> tuple[str, ...]:
        return (self.column,)

    @property
    def label_names(self) -> list[str]:
        return ["label", "target"] if not self.prefix else ["target"]

    def prepare(self, rows: Sequence[dict[str, str]], where: str) -> None:
        found = sorted({r[self.column] for r in rows if r[self.column]})
        if not self.classes:
            self.classes = found
            return
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise UsageError(f"labels {unknown} are not among the classes {self.classes}",
                             "add them to --classes or fix the labels")

    def parse(self, cells: dict[str, str], where: str) -> list[float]:
        v = cells[self.column]
        return [float(self.classes.index(v))] if v else [math.nan]

    def finish_parsing(self, y: np.ndarray, where: str) -> None:
        self.check(y, where)

    def check(self, y: np.ndarray, where: str) -> None:
        counts = np.bincount(y[~np.isnan(y[:, 0]), 0].astype(np.int64),
                             minlength=len(self.classes))
        present = [c for c, n in zip(self.classes, counts) if n]
        if len(present) < 2:
            raise UsageError(f"{self.column} {where} has a single class "
                             f"({', '.join(present) or 'none'})",
                             "MIL training needs at least two classes in the label column")
        empty = [c for c, n in zip(self.classes, counts) if n == 0]
        if empty:
            raise UsageError(f"class {', '.join(map(repr, empty))} has no slides {where}",
                             "add slides of that class, or drop it from the labels")

    def stratum(self, y: np.ndarray) -> str:
        return "" if math.isnan(y[0]) else self.classes[int(y[0])]

    @property
    def n_outputs(self) -> int:
        return len(self.classes)

    def fit(self, y: np.ndarray) -> None:
        if not self.auto_weights:
            self.class_weights = None
            return
        known = y[~np.isnan(y[:, 0]), 0].astype(np.int64)
        counts = np.bincount(known, minlength=len(self.classes)).astype(np.float64)
        self.class_weights = (len(known) / (len(self.classes) * np.maximum(counts, 1))).tolist()

    def loss(self, out: torch.Tensor, y: torch.Tensor, epoch: int | None = 0) -> torch.Tensor:
        from gigamil.mil.models import evidential_loss

        known = ~torch.isnan(y[:, 0])
        t = torch.where(known, y[:, 0], torch.zeros_like(y[:, 0])).long()
        if self.evidential:
            anneal = 1.0 if epoch is None else min(1.0, epoch / 10)
            per_bag = evidential_loss(out, t, anneal, reduction="none")
        else:
            per_bag = F.cross_entropy(out, t, reduction="none")
        if self.class_weights is not None and epoch is not None:
            per_bag = per_bag * torch.tensor(self.class_weights, device=out.device)[t]
        return torch.where(known, per_bag, torch.zeros_like(per_bag))

    def probs_and_uncertainty(self, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from gigamil.mil.predict import probs_and_uncertainty

        z = torch.from_numpy(np.asarray(out, np.float32))
        if not self.evidential and self.temperature != 1.0:
            z = z / self.temperature
        p, u = probs_and_uncertainty(z, self.evidential)
        return p.double().numpy(), u.double().numpy()

    def calibrate(self, y: np.ndarray, out: np.ndarray) -> None:
        """Fit the temperature on labelled validation slides (``out``: their logits); an
        evidential head (Dirichlet evidence, not logits) stays as it is."""
        from gigamil.mil.calibration import MIN_CALIBRATION_SLIDES, fit_temperature

        out = np.asarray(out, np.float64)
        keep = labelled(y) & np.isfinite(out).all(1)  # (an overflowed bag is left out)
        if self.evidential or keep.sum() < MIN_CALIBRATION_SLIDES:
            self.temperature, self.calibrated_on = 1.0, 0
            return
        self.temperature = fit_temperature(out[keep], y[keep, 0].astype(np.int64))
        self.calibrated_on = int(keep.sum())

    def uncalibrated(self) -> Classification:
        return dataclasses.replace(self, temperature=1.0, calibrated_on=0)

    def scores(self, out: np.ndarray) -> np.ndarray:
        return self.probs_and_uncertainty(out)[0]

    @property
    def score_names(self) -> list[str]:
        return [f"prob_{c}" for c in self.classes]

    def row(self, y: np.ndarray, out: np.ndarray) -> dict[str, Any]:
        p, u = self.probs_and_uncertainty(out[None])
        return self.score_row(y, p[0], float(u[0]))

    def score_row(self, y: np.ndarray, scores: np.ndarray,
                  uncertainty: float | None = None) -> dict[str, Any]:
        """Cells from probabilities; the uncertainty defaults to their normalised entropy."""
        if uncertainty is None:
            q = np.clip(scores, 1e-12, None)
            uncertainty = float(-(q * np.log(q)).sum() / math.log(max(2, len(q))))
        known = not math.isnan(y[0])
        cells: dict[str, Any] = {}
        if not self.prefix:
            cells["label"] = self.classes[int(y[0])] if known else ""
        cells[self.prefix + "target"] = int(y[0]) if known else ""
        cells[self.prefix + "pred"] = self.classes[int(np.argmax(scores))]
        cells.update({self.prefix + k: f"{v:.8g}" for k, v in zip(self.score_names, scores)})
        cells[self.prefix + "uncertainty"] = f"{uncertainty:.6g}"
        return cells

    def columns_out(self) -> list[str]:
        p = self.prefix
        return ([] if p else ["label"]) + [p + "target", p + "pred",
                                           *(p + s for s in self.score_names), p + "uncertainty"]

    def read(self, rows: Sequence[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        p = self.prefix
        y = np.array([[float(r[p + "target"]) if r[p + "target"] != "" else np.nan]
                      for r in rows], np.float64).reshape(len(rows), 1)
        s = np.array([[float(r[p + k]) for k in self.score_names] for r in rows],
                     np.float64).reshape(len(rows), len(self.classes))
        return y, s

    def metrics(self, y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        from gigamil.mil.metrics import classification_metrics

        keep = labelled(y)
        return classification_metrics(y[keep, 0].astype(np.int64), scores[keep], self.classes)

    def bootstrap(self, y: np.ndarray, scores: np.ndarray, n_boot: int, seed: int
                  ) -> dict[str, tuple[float, float, float]]:
        from gigamil.mil.metrics import bootstrap_metrics

        keep = labelled(y)
        return bootstrap_metrics(y[keep, 0].astype(np.int64), scores[keep], n_boot, seed=seed,
                                 classes=self.classes)


TARGETS.register("classification")(Classification)
