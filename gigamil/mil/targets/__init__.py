"""What a run predicts: one or several targets, each a head of the shared MIL model.

    targets = build_targets(cfg)                        # from --task / --target
    table = read_labels("cohort.csv", targets)          # Y: (n, Σ width) float, NaN = missing
    t.fit(y_train)                                      # per fold: bins, weights, scales
    per_bag = t.loss(out[:, t.outputs], y[:, t.columns])

A target's *outputs* are its slice of the model's logits (one linear head per target is
the same as slicing one linear layer), its *columns* its slice of the label matrix. An
empty label cell masks that target for that slide (loss 0); the slide is kept. Every
kind is a registered class in a file of its own, laid out the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gigamil.errors import UsageError
from gigamil.mil.targets.base import TARGETS, Target
from gigamil.mil.targets.classification import Classification
from gigamil.mil.targets.regression import Regression
from gigamil.mil.targets.survival import Survival

if TYPE_CHECKING:
    from gigamil.mil.train_config import TrainConfig

__all__ = ["Target", "TARGETS", "Classification", "Survival", "Regression", "TARGET_KINDS",
           "target_from_dict", "layout_targets", "build_targets", "targets_of_run",
           "evaluate_targets", "monitor_key", "total_outputs", "split_columns"]

TARGET_KINDS = ("classification", "survival", "regression")


def target_from_dict(d: dict[str, Any]) -> Target:
    """A target saved with :meth:`Target.to_dict` (in ``best.pt`` and ``config.json``)."""
    d = dict(d)
    return TARGETS.get(d.pop("kind"))(**d)


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
    return layout_targets([Classification(column, column=column, classes=config["classes"],
                                          evidential=config["config"].get("loss") == "evidential")])


def evaluate_targets(targets: Sequence[Target], y: np.ndarray, logits: np.ndarray,
                     epoch: int = 0) -> dict[str, float]:
    """Every target's metrics (prefixed with its name when there are several) and
    ``loss``: the evaluation loss per bag over the whole set (no class weights, evidential
    fully annealed; Cox: its risk set is the set)."""
    out: dict[str, float] = {}
    total = 0.0
    yt, lt = torch.from_numpy(y).float(), torch.from_numpy(logits).float()
    for t in targets:
        scores = t.scores(logits[:, t.outputs])
        out.update({t.prefix + k: v for k, v in t.metrics(y[:, t.columns], scores).items()})
        loss = t.loss(lt[:, t.outputs], yt[:, t.columns], None)
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
