# cohesive: one class per kind of target (classification, survival, regression), each
# owning its label parsing, loss, metrics and prediction columns; split apart they would
# only import each other.
"""What a run predicts: one or several targets, each a head of the shared MIL model.

    targets = parse_targets(cfg)                        # from --task / --target
    table = read_labels("cohort.csv", targets)          # Y: (n, Σ width) float, NaN = missing
    t.fit(y_train)                                      # per fold: bins, standardization
    per_bag = t.loss(out[:, t.outputs], y[:, t.columns])

A target's *outputs* are its slice of the model's logits (one linear head per target is
the same as slicing one linear layer), its *columns* its slice of the label matrix. An
empty label cell masks that target for that slide (loss 0), the slide is kept.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from gigamil.errors import UsageError

if TYPE_CHECKING:
    from gigamil.mil.train_config import TrainConfig

__all__ = ["Target", "Classification", "Survival", "Regression", "TARGET_KINDS",
           "target_from_dict", "layout_targets", "build_targets", "targets_of_run",
           "evaluate_targets", "monitor_key", "total_outputs", "split_columns"]

#: kind → the metric each reports first (the ``--monitor`` it offers)
TARGET_KINDS = ("classification", "survival", "regression")


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

    @property
    @abstractmethod
    def n_outputs(self) -> int:
        """Logits its head produces."""

    # -- training -----------------------------------------------------------------------------
    @abstractmethod
    def loss(self, out: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """Per-bag loss (B,), 0 where the label is missing; with ``batch_loss`` a sum over
        the batch (0-d)."""

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


def _labelled(y: np.ndarray) -> np.ndarray:
    return ~np.isnan(y).any(axis=1)


@dataclass
class Classification(Target):
    """Classes of one column; cross-entropy (or evidential), inverse-frequency weights."""

    column: str = "label"
    classes: list[str] = field(default_factory=list)
    evidential: bool = False
    class_weights: list[float] | None = None  # fitted per fold with ``auto_weights``
    auto_weights: bool = True

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

    def loss(self, out: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        from gigamil.mil.models import evidential_loss

        known = ~torch.isnan(y[:, 0])
        t = torch.where(known, y[:, 0], torch.zeros_like(y[:, 0])).long()
        if self.evidential:
            per_bag = evidential_loss(out, t, min(1.0, epoch / 10), reduction="none")
        else:
            per_bag = F.cross_entropy(out, t, reduction="none")
        if self.class_weights is not None:
            per_bag = per_bag * torch.tensor(self.class_weights, device=out.device)[t]
        return torch.where(known, per_bag, torch.zeros_like(per_bag))

    def probs_and_uncertainty(self, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from gigamil.mil.predict import probs_and_uncertainty

        p, u = probs_and_uncertainty(torch.from_numpy(np.asarray(out, np.float32)),
                                     self.evidential)
        return p.double().numpy(), u.double().numpy()

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

        keep = _labelled(y)
        return classification_metrics(y[keep, 0].astype(np.int64), scores[keep], self.classes)

    def bootstrap(self, y: np.ndarray, scores: np.ndarray, n_boot: int, seed: int
                  ) -> dict[str, tuple[float, float, float]]:
        from gigamil.mil.metrics import bootstrap_metrics

        keep = _labelled(y)
        return bootstrap_metrics(y[keep, 0].astype(np.int64), scores[keep], n_boot, seed=seed,
                                 classes=self.classes)



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
        known = _labelled(y)
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

        known = _labelled(y)
        edges = [float(e) for e in time_bins(y[known, 0], y[known, 1], self.n_bins)]
        # fewer distinct quantiles than bins: the missing last bins hold no slide
        self.edges = edges[:-1] + [math.inf] * (self.n_bins + 2 - len(edges))

    def loss(self, out: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        from gigamil.mil.survival import cox_loss, nll_survival_loss

        known = ~torch.isnan(y[:, 0])
        time = torch.where(known, y[:, 0], torch.zeros_like(y[:, 0]))
        event = torch.where(known, y[:, 1], torch.zeros_like(y[:, 1]))
        if self.loss_kind == "cox":
            return cox_loss(out[known, 0], time[known], event[known])
        inner = torch.tensor(self.edges[1:-1], dtype=time.dtype, device=time.device)
        bins = torch.bucketize(time, inner, right=True).clamp_max(self.n_bins - 1)
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

        keep = _labelled(y)
        return {"c_index": concordance_index(y[keep, 0], scores[keep, 0], y[keep, 1])}

    def bootstrap(self, y: np.ndarray, scores: np.ndarray, n_boot: int, seed: int
                  ) -> dict[str, tuple[float, float, float]]:
        from gigamil.mil.survival import bootstrap_c_index

        keep = _labelled(y)
        return {"c_index": bootstrap_c_index(y[keep, 0], scores[keep, 0], y[keep, 1], n_boot,
                                             seed)}


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
        known = y[_labelled(y), 0]
        if len(known) < 2 or float(np.std(known)) == 0:
            raise UsageError(f"{self.column} {where} takes a single value",
                             "a regression target needs values that differ")

    def stratum(self, y: np.ndarray) -> str:
        return ""

    @property
    def n_outputs(self) -> int:
        return 1

    def fit(self, y: np.ndarray) -> None:
        known = y[_labelled(y), 0]
        self.mean = float(np.mean(known))
        self.std = float(np.std(known)) or 1.0

    def loss(self, out: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> torch.Tensor:
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

        keep = _labelled(y)
        return regression_metrics(y[keep, 0], scores[keep, 0])

    def bootstrap(self, y: np.ndarray, scores: np.ndarray, n_boot: int, seed: int
                  ) -> dict[str, tuple[float, float, float]]:
        from gigamil.mil.calibration import bootstrap_regression

        keep = _labelled(y)
        return bootstrap_regression(y[keep, 0], scores[keep, 0], n_boot, seed)


_KINDS: dict[str, type[Target]] = {"classification": Classification, "survival": Survival,
                                   "regression": Regression}


def target_from_dict(d: dict[str, Any]) -> Target:
    """A target saved with :meth:`Target.to_dict` (in ``best.pt`` and ``config.json``)."""
    d = dict(d)
    cls = _KINDS[d.pop("kind")]
    return cls(**d)


def layout_targets(targets: Sequence[Target]) -> list[Target]:
    """Set each target's slices of the outputs and the label matrix, and its prefix."""
    o = c = 0
    for t in targets:
        t.prefix = "" if len(targets) == 1 else f"{t.name}_"
        t.outputs = slice(o, o + t.n_outputs)
        t.columns = slice(c, c + t.width)
        o += t.n_outputs
        c += t.width
    return list(targets)


def total_outputs(targets: Sequence[Target]) -> int:
    return sum(t.n_outputs for t in targets)


def split_columns(targets: Sequence[Target]) -> int:
    return sum(t.width for t in targets)


def build_targets(cfg: TrainConfig) -> list[Target]:
    """The targets of a training run: ``--target a,b:survival,c:regression`` (each of
    ``--task`` unless it says otherwise), laid out one after another."""
    names = cfg.target or (("survival",) if cfg.task == "survival" else (cfg.label_column,))
    weights = cfg.target_weights or (1.0,) * len(names)
    targets: list[Target] = []
    for spec, w in zip(names, weights):
        name, _, kind = spec.partition(":")
        kind = kind or cfg.task
        if kind not in TARGET_KINDS:
            raise UsageError(f"--target {spec}: {kind!r} is not one of {', '.join(TARGET_KINDS)}",
                             "write COLUMN or COLUMN:KIND, e.g. os:survival,tmb:regression")
        if kind == "classification":
            targets.append(Classification(
                name, w, column=name, evidential=cfg.loss == "evidential",
                classes=list(cfg.classes) if cfg.classes and not targets else [],
                auto_weights=cfg.class_weights == "auto" and not cfg.balanced_sampler))
        elif kind == "survival":
            default = name == "survival"
            targets.append(Survival(
                name, w, time_column=cfg.time_column if default else f"{name}_time",
                event_column=cfg.event_column if default else f"{name}_event",
                loss_kind=cfg.survival_loss, n_bins=cfg.time_bins))
        else:
            targets.append(Regression(name, w, column=name, loss_kind=cfg.regression_loss))
    if len({t.name for t in targets}) < len(targets):
        raise UsageError(f"--target {','.join(names)} names a target twice", "name each once")
    return targets


def targets_of_run(config: dict[str, Any]) -> list[Target]:
    """The targets of a run from its ``config.json`` (a run from before targets: one
    classification target over its classes)."""
    saved = config.get("targets")
    if saved:
        return layout_targets([target_from_dict(d) for d in saved])
    column = config["config"].get("label_column", "label")
    return layout_targets([Classification(column, column=column, classes=config["classes"])])


def evaluate_targets(targets: Sequence[Target], y: np.ndarray, logits: np.ndarray,
                     epoch: int = 0) -> dict[str, float]:
    """Every target's metrics (prefixed with its name when there are several) and
    ``loss``: the weighted loss per bag over the whole set (Cox: its risk set is the set)."""
    out: dict[str, float] = {}
    total = 0.0
    yt, lt = torch.from_numpy(y).float(), torch.from_numpy(logits).float()
    for t in targets:
        scores = t.scores(logits[:, t.outputs])
        out.update({t.prefix + k: v for k, v in t.metrics(y[:, t.columns], scores).items()})
        loss = t.loss(lt[:, t.outputs], yt[:, t.columns], epoch)
        total += t.weight * float(loss.sum())
    out["loss"] = total / max(1, len(y))
    return out


def monitor_key(targets: Sequence[Target], monitor: str) -> str:
    """The metric ``--monitor`` means: the loss, or that metric of the first target
    that has it."""
    if monitor == "loss":
        return "loss"
    for t in targets:
        if monitor in t.metric_names:
            return t.prefix + monitor
    kinds = ", ".join(sorted({t.kind for t in targets}))
    raise UsageError(f"--monitor {monitor} is not a metric of {kinds}",
                     "use loss, auroc/bal_acc/acc (classification), c_index (survival) or r2 "
                     "(regression)")
