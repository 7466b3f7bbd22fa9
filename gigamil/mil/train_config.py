"""The options of a training run, and the device it runs on.

    cfg = TrainConfig(features="data/features/resnet50", labels="labels.csv", out="runs/crc1")
    device = default_device(cfg.device, local_rank)
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from gigamil.errors import UsageError

if TYPE_CHECKING:  # torch is imported when a device or dtype is asked for, not with the config
    import torch

__all__ = ["Precision", "Monitor", "CV", "Loss", "ClassWeights", "Task", "SurvivalLoss",
           "RegressionLoss", "Standardize", "MONITORS", "TrainConfig",
           "autocast_dtype", "default_device", "check_choice"]

#: The choices of a training run, defined once: the CLI offers exactly these.
Precision = Literal["fp32", "bf16", "fp16"]
Monitor = Literal["loss", "auroc", "bal_acc", "acc", "c_index", "r2"]
Task = Literal["classification", "survival", "regression"]
SurvivalLoss = Literal["nll", "cox"]
RegressionLoss = Literal["mse", "huber"]
Standardize = Literal["auto", "on", "off"]
Calibrate = Literal["temperature", "off"]
CV = Literal["patient", "site"]
Loss = Literal["ce", "evidential"]
ClassWeights = Literal["auto", "none"]

MONITORS: dict[str, float] = {"loss": -1.0, "auroc": 1.0, "bal_acc": 1.0, "acc": 1.0,
                              "c_index": 1.0, "r2": 1.0}  # sign


def check_choice(what: str, value: object, choices: object) -> None:
    """Refuse ``value`` unless it is one of the ``Literal`` ``choices``."""
    allowed = typing.get_args(choices)
    if value not in allowed:
        raise UsageError(f"{what} {value!r} is not one of {', '.join(map(str, allowed))}")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision (None: fp32, no autocast)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class TrainConfig:
    """Every option of a training run; the resolved config is saved as ``config.json``."""

    features: str
    labels: str
    out: str
    model: str = "abmil"
    model_options: dict[str, Any] = field(default_factory=dict)
    label_column: str = "label"
    classes: tuple[str, ...] | None = None
    task: Task = "classification"  # of every --target without a :kind of its own
    target: tuple[str, ...] | None = None  # columns (survival: names); default label_column
    target_weights: tuple[float, ...] | None = None  # loss weight per target
    time_column: str = "time"  # survival columns of the default target (else NAME_time)
    event_column: str = "event"
    survival_loss: SurvivalLoss = "nll"
    time_bins: int = 4
    regression_loss: RegressionLoss = "mse"
    standardize: Standardize = "auto"  # features, fitted on each fold's training bags
    calibrate: Calibrate = "temperature"  # of classification heads, on the inner validation split
    folds: int = 5
    cv: CV = "patient"
    val_frac: float = 0.15
    epochs: int = 50
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    batch_size: int = 8  # global: split across ranks
    accumulate: int = 1
    max_instances: int | None = 4096
    bucket: bool = False
    clip_grad: float | None = 1.0
    precision: Precision = "fp32"
    class_weights: ClassWeights = "auto"  # auto: inverse frequency unless the balanced sampler
    balanced_sampler: bool = False
    loss: Loss = "ce"
    aux_weight: float = 0.3  # weight of a model's own loss (CLAM's instance loss)
    early_stop: int | None = 10
    monitor: Monitor = "loss"
    seed: int = 0
    only_folds: tuple[int, ...] | None = None
    # how the work runs (never changes the result):
    device: str = "auto"
    workers: int = 0
    preload: bool = False
    checkpoint_every: int = 0  # optimizer steps; 0 = at the end of every epoch only
    keep_last: int = 3
    bootstrap: int = 1000

    RUNTIME_FIELDS = ("out", "device", "workers", "preload", "checkpoint_every", "keep_last",
                      "bootstrap", "only_folds", "epochs", "early_stop")

    def __post_init__(self) -> None:
        for what, value, choices in (("precision", self.precision, Precision),
                                     ("monitor", self.monitor, Monitor),
                                     ("loss", self.loss, Loss), ("cv", self.cv, CV),
                                     ("class weights", self.class_weights, ClassWeights),
                                     ("task", self.task, Task),
                                     ("survival loss", self.survival_loss, SurvivalLoss),
                                     ("regression loss", self.regression_loss, RegressionLoss),
                                     ("standardize", self.standardize, Standardize),
                                     ("calibrate", self.calibrate, Calibrate)):
            check_choice(what, value, choices)
        if self.batch_size < 1 or self.accumulate < 1 or self.epochs < 1:
            raise UsageError("batch size, accumulation steps and epochs must be at least 1")
        if self.classes is not None:
            self.classes = tuple(self.classes)
        if self.only_folds is not None:
            self.only_folds = tuple(self.only_folds)
        if self.target is not None:
            self.target = tuple(self.target)
        if self.target_weights is not None:
            self.target_weights = tuple(float(w) for w in self.target_weights)
            if len(self.target_weights) != len(self.target or ("",)):
                raise UsageError(f"{len(self.target_weights)} --target-weights for "
                                 f"{len(self.target or ('',))} targets", "give one per target")
        if self.task == "regression" and not self.target:
            raise UsageError("--task regression needs --target COLUMN",
                             "name the column of the labels CSV to predict")
        if self.time_bins < 1:
            raise UsageError("--time-bins must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        """Every option, as plain values."""
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The options that decide the result (a resumed run must match them)."""
        d = self.to_dict()
        for k in self.RUNTIME_FIELDS:
            d.pop(k, None)
        d["classes"] = list(d["classes"]) if d["classes"] else None
        for k in ("target", "target_weights"):
            d[k] = list(d[k]) if d[k] else None
        return d


def default_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU."""
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available here", "use --device cpu")
    return dev
