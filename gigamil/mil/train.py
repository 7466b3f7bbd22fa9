"""The MIL training loop: k folds, padded batches, AMP, DDP, resumable to the bit.

    cfg = TrainConfig(features="data/features/resnet50", labels="labels.csv", out="runs/crc1")
    result = train(cfg, checkpoints=lambda fold: CheckpointManager(...))

This module holds no process-group setup, signal handling or checkpoint file
format: the caller (``gigamil.cluster.launch``) initialises ``torch.distributed``
if it runs several ranks, passes a :class:`Checkpointer` per fold and a
:class:`StopRequest` that its signal handlers set. Everything the loop needs to
continue — model, optimizer, scheduler, AMP scaler, epoch/step, position in the
epoch, RNG state, early-stopping state, history — is in :meth:`FoldTrainer.state_dict`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from gigamil.errors import GigamilError, UsageError
from gigamil.io import write_csv, write_json
from gigamil.mil.data import (
    BagBatch,
    BagBatchSampler,
    BagDataset,
    Fold,
    LabelTable,
    class_weights,
    collate_bags,
    make_folds,
    match_features,
    read_labels,
    write_splits,
)
from gigamil.mil.metrics import SCALAR_METRICS, bootstrap_metrics, confusion_matrix
from gigamil.mil.models import create_model, dirichlet, evidential_loss
from gigamil.versions import package_versions

__all__ = [
    "TrainConfig",
    "Checkpointer",
    "StopRequest",
    "TrainingInterrupted",
    "FoldTrainer",
    "Predictions",
    "train",
    "predict",
    "prediction_rows",
    "prediction_fields",
    "read_predictions",
    "summarize",
    "build_model",
    "load_model",
]

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MONITORS = {"loss": -1.0, "auroc": 1.0, "bal_acc": 1.0, "acc": 1.0}  # sign: higher is better
RUN_SCHEMA_VERSION = 1


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
    folds: int = 5
    cv: str = "patient"  # or "site"
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
    precision: str = "fp32"
    class_weights: str = "auto"  # auto: inverse frequency unless the balanced sampler is on
    balanced_sampler: bool = False
    loss: str = "ce"  # or "evidential"
    aux_weight: float = 0.3  # weight of a model's own loss (CLAM's instance loss)
    early_stop: int | None = 10
    monitor: str = "loss"
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
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.monitor not in MONITORS:
            raise UsageError(f"monitor {self.monitor!r} is not one of {', '.join(MONITORS)}")
        if self.loss not in ("ce", "evidential"):
            raise UsageError(f"loss {self.loss!r} is not ce or evidential")
        if self.class_weights not in ("auto", "none"):
            raise UsageError(f"class weights {self.class_weights!r} is not auto or none")
        if self.batch_size < 1 or self.accumulate < 1 or self.epochs < 1:
            raise UsageError("batch size, accumulation steps and epochs must be at least 1")
        if self.classes is not None:
            self.classes = tuple(self.classes)
        if self.only_folds is not None:
            self.only_folds = tuple(self.only_folds)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The options that decide the result (a resumed run must match them)."""
        d = self.to_dict()
        for k in self.RUNTIME_FIELDS:
            d.pop(k, None)
        d["classes"] = list(d["classes"]) if d["classes"] else None
        return d


class Checkpointer(Protocol):
    """Where a fold's checkpoints go (``gigamil.cluster.checkpoint.CheckpointManager``)."""

    directory: Path

    def save(self, state: dict[str, Any], step: int) -> Path: ...
    def save_best(self, state: dict[str, Any], metric: float, step: int) -> Path: ...
    def load_latest(self, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, Any], Path] | None: ...
    def load_best(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None: ...


class StopRequest:
    """Set by a signal handler; the loop checkpoints at the next step boundary.

    ``stop=True`` (SIGTERM) then ends the run; ``stop=False`` (SIGUSR1) goes on.
    """

    def __init__(self) -> None:
        self.level = 0  # 0 nothing, 1 checkpoint, 2 checkpoint and stop
        self.reason = ""

    def request(self, reason: str, stop: bool) -> None:
        self.level = max(self.level, 2 if stop else 1)
        self.reason = reason

    def clear(self) -> None:
        self.level = 0
        self.reason = ""


class TrainingInterrupted(GigamilError):
    """Training stopped on request after writing a checkpoint."""


@dataclass
class Predictions:
    """Per-bag outputs in dataset order."""

    index: np.ndarray  # (n,) dataset indices
    probs: np.ndarray  # (n, C)
    uncertainty: np.ndarray  # (n,)
    loss: np.ndarray  # (n,) per-bag loss (NaN without targets)
    n_instances: np.ndarray  # (n,)


# -- models ----------------------------------------------------------------------------------

def build_model(name: str, in_dim: int, n_classes: int, options: dict[str, Any]) -> nn.Module:
    """``create_model`` with a clear error for an unknown option."""
    try:
        return create_model(name, in_dim=in_dim, n_classes=n_classes, **options)
    except TypeError as exc:
        raise UsageError(f"model {name!r}: {exc}",
                         "see `gigamil models` for each model's options") from None


def load_model(state: dict[str, Any], device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """A model and its metadata from a ``best.pt`` state (see :meth:`FoldTrainer.best_state`)."""
    meta = state["meta"]
    model = build_model(meta["model"], meta["in_dim"], len(meta["classes"]), meta["model_options"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), meta


def _takes_label(model: nn.Module) -> bool:
    import inspect

    return "label" in inspect.signature(model.forward).parameters


def _uncertainty(logits: torch.Tensor, evidential: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, uncertainty in [0, 1]): Dirichlet K/S, or normalised entropy."""
    if evidential:
        return dirichlet(logits)
    probs = torch.softmax(logits, -1)
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(logits.shape[-1])
    return probs, ent


@torch.no_grad()
def predict(model: nn.Module, dataset: BagDataset, device: torch.device, batch_size: int = 8,
            precision: str = "fp32", evidential: bool = False, rank: int = 0,
            world_size: int = 1, workers: int = 0) -> Predictions:
    """Run ``model`` over every bag (sharded over ranks, then gathered on all of them)."""
    model.eval()
    sampler = BagBatchSampler(dataset.targets, batch_size=batch_size, shuffle=False, rank=rank,
                              world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_bags,
                        num_workers=0 if dataset.on_device else workers,
                        generator=torch.Generator())
    dtype = PRECISIONS[precision]
    rows: list[tuple[int, list[float], float, float, int]] = []
    for batch in loader:
        b = batch.to(device)
        x, mask = b.padded()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x, mask)
        logits = out.logits.float()
        probs, unc = _uncertainty(logits, evidential)
        targets = b.targets.clamp_min(0)
        loss = F.cross_entropy(logits, targets, reduction="none")
        loss = torch.where(b.targets >= 0, loss, torch.full_like(loss, float("nan")))
        for k in range(len(batch.index)):
            rows.append((int(batch.index[k]), probs[k].tolist(), float(unc[k]), float(loss[k]),
                         int(batch.lengths[k])))
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    rows.sort(key=lambda r: r[0])
    return Predictions(np.array([r[0] for r in rows], np.int64),
                       np.array([r[1] for r in rows], np.float64).reshape(len(rows), -1),
                       np.array([r[2] for r in rows]), np.array([r[3] for r in rows]),
                       np.array([r[4] for r in rows], np.int64))


# -- one fold --------------------------------------------------------------------------------

@dataclass
class FoldProgress:
    """Where a fold's training stands (all plain values: safe for ``weights_only``)."""

    epoch: int = 0  # the epoch in progress (or next to start)
    batch: int = 0  # micro-batches of that epoch already done
    loss_sum: float = 0.0  # their summed loss (the epoch's mean survives a resume)
    step: int = 0  # optimizer steps so far
    best: float = -math.inf  # best monitored value, sign-adjusted (higher is better)
    best_epoch: int = -1
    bad_epochs: int = 0
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def _cosine_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


class FoldTrainer:
    """Trains one fold: owns the model, optimizer, schedule, scaler and progress."""

    def __init__(self, cfg: TrainConfig, fold: Fold, table: LabelTable, paths: dict[str, Path],
                 in_dim: int, ckpt: Checkpointer, device: torch.device, rank: int = 0,
                 world_size: int = 1, stop: StopRequest | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg = cfg
        self.fold = fold
        self.table = table
        self.classes = table.classes
        self.ckpt = ckpt
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.stop = stop or StopRequest()
        self.on_epoch = on_epoch
        self.in_dim = in_dim
        by_id = table.by_id()

        def dataset(ids: Sequence[str], train: bool) -> BagDataset:
            return BagDataset([paths[i] for i in ids], [table.target(by_id[i]) for i in ids],
                              max_instances=cfg.max_instances if train else None,
                              seed=cfg.seed * 1000 + fold.index, preload=cfg.preload,
                              preload_device=device)

        self.train_set = dataset(fold.train, True)
        self.val_set = dataset(fold.val, False) if fold.val else None
        self.test_set = dataset(fold.test, False) if fold.test else None
        self.sampler = BagBatchSampler(
            self.train_set.targets, self.train_set.lengths() if cfg.bucket else None,
            cfg.batch_size, shuffle=True, balanced=cfg.balanced_sampler, bucket=cfg.bucket,
            seed=cfg.seed * 1000 + fold.index, rank=rank, world_size=world_size)
        self.batches_per_epoch = len(self.sampler.global_batches(0))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.accumulate)

        torch.manual_seed(cfg.seed * 1000 + fold.index)  # the same initial weights on every rank
        self.model = build_model(cfg.model, in_dim, len(self.classes), cfg.model_options).to(device)
        self.with_label = _takes_label(self.model)
        self.ddp: nn.Module = self.model
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids,
                                               find_unused_parameters=self.with_label)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        total = cfg.epochs * self.steps_per_epoch
        warmup = max(1, int(round(cfg.warmup_epochs * self.steps_per_epoch)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           _cosine_warmup(warmup, total))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        weights = cfg.class_weights == "auto" and not cfg.balanced_sampler
        self.weights = (class_weights(self.train_set.targets, len(self.classes)).to(device)
                        if weights else None)
        self.progress = FoldProgress()

    # -- state --------------------------------------------------------------------------------
    def _rng_states(self) -> dict[str, list[torch.Tensor]]:
        """Every rank's RNG state (dropout draws differ per rank), gathered on all ranks."""
        mine = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world_size == 1:
            return {k: [v] for k, v in mine.items()}
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        return {k: [g[k] for g in gathered] for k in mine}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit (call on every rank: it gathers)."""
        return {
            "fold": self.fold.index,
            "world_size": self.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": self.progress.state_dict(),
            "rng": self._rng_states(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.progress.load_state_dict(state["progress"])
        rng = state["rng"]
        mine = self.rank if len(rng["torch"]) == self.world_size else 0
        if len(rng["torch"]) != self.world_size:
            log.warning("checkpoint from %d ranks resumed on %d: the result will not be "
                        "bitwise that of an uninterrupted run", len(rng["torch"]), self.world_size)
        torch.set_rng_state(rng["torch"][mine].cpu())  # (map_location may have moved it)
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][mine].cpu(), self.device)

    def best_state(self, epoch: int) -> dict[str, Any]:
        """The deployable model: weights plus what is needed to rebuild and use it."""
        return {"model": self.model.state_dict(), "epoch": epoch,
                "meta": {"model": self.cfg.model, "model_options": dict(self.cfg.model_options),
                         "in_dim": self.in_dim, "classes": list(self.classes),
                         "evidential": self.cfg.loss == "evidential", "fold": self.fold.index,
                         "precision": self.cfg.precision}}

    # -- the loop -----------------------------------------------------------------------------
    def _sync_stop(self) -> int:
        level = self.stop.level
        if self.world_size > 1:
            t = torch.tensor([level], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            level = int(t.item())
        return level

    def _checkpoint(self) -> None:
        self.ckpt.save(self.state_dict(), self.progress.step)

    def _loss(self, batch: BagBatch, n_micro: int) -> torch.Tensor:
        cfg = self.cfg
        dtype = PRECISIONS[cfg.precision]
        x, mask = batch.padded()
        with torch.autocast(self.device.type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            if self.with_label:
                out = self.ddp(x, mask, label=batch.targets)
            else:
                out = self.ddp(x, mask)
        logits = out.logits.float()
        if cfg.loss == "evidential":
            anneal = min(1.0, self.progress.epoch / 10)
            per_bag = evidential_loss(logits, batch.targets, anneal, reduction="none")
        else:
            per_bag = F.cross_entropy(logits, batch.targets, reduction="none")
        if self.weights is not None:
            per_bag = per_bag * self.weights[batch.targets]
        # normalise by the *global* batch, so gradients do not depend on the number of ranks
        scale = self.world_size / (self.sampler.batch_size * n_micro)
        loss = per_bag.sum() * scale
        if out.aux_loss is not None:
            loss = loss + cfg.aux_weight * out.aux_loss.float() * len(per_bag) * scale
        return loss

    def _optimizer_step(self) -> None:
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1

    def train_epoch(self) -> float:
        """Train from the current position to the end of the epoch; the mean batch loss."""
        p = self.progress
        acc = self.cfg.accumulate
        self.sampler.set_epoch(p.epoch, start=p.batch)
        on_host = not self.train_set.on_device
        loader = DataLoader(self.train_set, batch_sampler=self.sampler, collate_fn=collate_bags,
                            num_workers=self.cfg.workers if on_host else 0,
                            generator=torch.Generator(),
                            pin_memory=on_host and self.device.type == "cuda")
        self.ddp.train()
        for batch in loader:
            k = p.batch
            group_start = (k // acc) * acc
            n_micro = min(acc, self.batches_per_epoch - group_start)
            last_of_step = k - group_start == n_micro - 1
            sync = contextlib.nullcontext()
            if self.world_size > 1 and not last_of_step:
                sync = self.ddp.no_sync()  # type: ignore[operator]
            with sync:
                loss = self._loss(batch.to(self.device), n_micro)
                self.scaler.scale(loss).backward()
            p.loss_sum += float(loss.detach()) * n_micro / self.world_size
            p.batch += 1
            if last_of_step:
                self._optimizer_step()
                if p.batch < self.batches_per_epoch:
                    self._step_boundary()
        return p.loss_sum / p.batch if p.batch else float("nan")

    def _step_boundary(self) -> None:
        every = self.cfg.checkpoint_every
        level = self._sync_stop()
        if level or (every and self.progress.step % every == 0):
            self._checkpoint()
        self._handle_stop(level)

    def _handle_stop(self, level: int) -> None:
        if level >= 2:
            raise TrainingInterrupted(
                f"stopped ({self.stop.reason or 'signal on another rank'}) at fold "
                f"{self.fold.index}, epoch {self.progress.epoch}, step {self.progress.step}; "
                "a checkpoint was written", "rerun the same command with --resume auto")
        if level == 1:
            log.warning("checkpoint written on %s at step %d", self.stop.reason or "request",
                        self.progress.step)
            self.stop.clear()

    def evaluate(self, dataset: BagDataset) -> tuple[Predictions, dict[str, float]]:
        from gigamil.mil.metrics import classification_metrics

        preds = predict(self.model, dataset, self.device, self.cfg.batch_size,
                        self.cfg.precision, self.cfg.loss == "evidential", self.rank,
                        self.world_size, self.cfg.workers)
        y = np.asarray(dataset.targets)[preds.index]
        metrics = classification_metrics(y, preds.probs, self.classes)
        metrics["loss"] = float(np.mean(preds.loss))
        return preds, metrics

    def fit(self) -> None:
        """Train until the last epoch or early stop, from wherever the progress stands."""
        cfg, p = self.cfg, self.progress
        sign = MONITORS[cfg.monitor]
        while not p.finished and p.epoch < cfg.epochs:
            t0 = time.perf_counter()
            train_loss = self.train_epoch()
            if self.world_size > 1:  # each rank holds its share of the global batch loss
                t = torch.tensor([train_loss], dtype=torch.float64, device=self.device)
                dist.all_reduce(t)
                train_loss = float(t.item())
            row: dict[str, Any] = {"epoch": p.epoch, "step": p.step, "train_loss": train_loss,
                                   "lr": self.scheduler.get_last_lr()[0]}
            if self.val_set is not None:
                _, val = self.evaluate(self.val_set)
                row.update({f"val_{k}": v for k, v in val.items()})
                value = sign * val[cfg.monitor]
            else:
                value = float(p.epoch)  # no validation set: the latest epoch is the best
            p.history.append(row)
            improved = not math.isnan(value) and value > p.best
            if improved:
                p.best, p.best_epoch, p.bad_epochs = value, p.epoch, 0
            else:
                p.bad_epochs += 1
            if improved:
                self.ckpt.save_best(self.best_state(p.epoch), sign * p.best, p.step)
            p.epoch += 1
            p.batch = 0
            p.loss_sum = 0.0
            if cfg.early_stop and self.val_set is not None and p.bad_epochs >= cfg.early_stop:
                p.finished = True
            if p.epoch >= cfg.epochs:
                p.finished = True
            self._checkpoint()
            if self.on_epoch is not None:
                self.on_epoch({"fold": self.fold.index, "epoch": p.epoch, "epochs": cfg.epochs,
                               "seconds": time.perf_counter() - t0, **row})
            self._handle_stop(self._sync_stop())

    def resume(self) -> str | None:
        """Load the latest valid checkpoint, if any; its name."""
        found = self.ckpt.load_latest(map_location=self.device)
        if found is None:
            return None
        state, path = found
        if state.get("fold") != self.fold.index:
            raise UsageError(f"checkpoint {path} belongs to fold {state.get('fold')}",
                             "do not move checkpoints between fold directories")
        self.load_state_dict(state)
        return path.name


# -- the whole run ---------------------------------------------------------------------------

def _feature_dim(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        key = "features" if "features" in f else "feats"
        return int(f[key].shape[-1])


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _prepare_run(cfg: TrainConfig, out: Path, resume: bool, meta: dict[str, Any]) -> None:
    config_path = out / "config.json"
    if config_path.exists():
        import json

        saved = json.loads(config_path.read_text())
        if not resume:
            raise UsageError(f"{out} already holds a run",
                             "continue it with --resume auto, or choose another --out")
        old = saved.get("identity", {})
        new = cfg.identity()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise UsageError(f"the run in {out} was made with other settings ({', '.join(diff)})",
                             "resume with the original options, or choose another --out")
    write_json(config_path, {"schema_version": RUN_SCHEMA_VERSION, "config": cfg.to_dict(),
                             "identity": cfg.identity(), "versions": package_versions(), **meta})


def prediction_rows(table: LabelTable, ids: Sequence[str], probs: np.ndarray,
                    uncertainty: np.ndarray, n_instances: np.ndarray, fold: int | str,
                    model: str) -> list[dict[str, Any]]:
    """Rows of a predictions CSV (see :func:`prediction_fields`), one per slide in ``ids``."""
    by_id = table.by_id()
    rows = []
    for k, sid in enumerate(ids):
        s = by_id[sid]
        row = {"slide_id": sid, "patient_id": s.patient_id, "fold": fold, "label": s.label,
               "target": table.target(s), "pred": table.classes[int(probs[k].argmax())],
               "uncertainty": f"{uncertainty[k]:.6g}", "n_instances": int(n_instances[k]),
               "model": model}
        row.update({f"prob_{c}": f"{probs[k, j]:.8g}" for j, c in enumerate(table.classes)})
        rows.append(row)
    return rows


def read_predictions(path: Path, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(targets (n,), probabilities (n, C)) from a predictions CSV."""
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    y = np.array([int(r["target"]) for r in rows], np.int64)
    p = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows]).reshape(len(rows), -1)
    return y, p


def prediction_fields(classes: Sequence[str]) -> list[str]:
    return (["slide_id", "patient_id", "fold", "label", "target", "pred"]
            + [f"prob_{c}" for c in classes] + ["uncertainty", "n_instances", "model"])


def metric_row(name: str, ci: dict[str, tuple[float, float, float]]) -> dict[str, Any]:
    row: dict[str, Any] = {"fold": name, "split": "test"}
    for k, (est, lo, hi) in ci.items():
        row[k], row[f"{k}_lo"], row[f"{k}_hi"] = est, lo, hi
    return row


def summarize(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], n_boot: int,
              seed: int) -> dict[str, Any]:
    """Metrics with bootstrap CIs and the confusion matrix, JSON-ready."""
    ci = bootstrap_metrics(y, probs, n_boot=n_boot, seed=seed, classes=classes)
    return {"n": int(len(y)),
            "metrics": {k: {"value": v[0], "ci95": [v[1], v[2]]} for k, v in ci.items()},
            "confusion_matrix": confusion_matrix(y, probs.argmax(1), len(classes)).tolist()}


def _history_rows(results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for k in sorted(results):
        for h in results[k]["history"]:
            rows.append({"fold": k, "split": "epoch", **h})
        if "test_ci" in results[k]:
            rows.append({**metric_row(str(k), results[k]["test_ci"]),
                         "epoch": results[k]["best_epoch"]})
    return rows


def _write_metrics(out: Path, results: dict[int, dict[str, Any]], classes: Sequence[str],
                   pooled: dict[str, tuple[float, float, float]] | None = None) -> None:
    rows = _history_rows(results)
    if pooled is not None:
        rows.append(metric_row("pooled", pooled))
    metric_names = [*SCALAR_METRICS, *(f"f1_{c}" for c in classes)]
    fields = ["fold", "split", "epoch", "step", "train_loss", "lr",
              *(f"val_{k}" for k in ("loss", *metric_names)),
              *(f"{k}{s}" for k in metric_names for s in ("", "_lo", "_hi"))]
    write_csv(out / "metrics.csv", rows, fields)


def train(cfg: TrainConfig, checkpoints: Callable[[int], Checkpointer],
          device: torch.device | None = None, rank: int = 0, world_size: int = 1,
          resume: bool = False, stop: StopRequest | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train every fold (continuing finished work with ``resume``) and write the run directory.

    Returns the summary (also written to ``summary.json``).
    """
    import json

    from gigamil.mil.metrics import reliability_diagram
    from gigamil.wsi.preview import save_png

    device = device or torch.device("cpu")
    main = rank == 0
    out = Path(cfg.out)
    table = read_labels(cfg.labels, cfg.label_column, cfg.classes)
    table, paths = match_features(table, cfg.features)
    folds = make_folds(table, cfg.folds, cfg.seed, cfg.val_frac, cfg.cv)
    in_dim = _feature_dim(next(iter(paths.values())))
    meta = {"classes": table.classes, "in_dim": in_dim, "n_slides": len(table),
            "folds": len(folds)}
    if main:
        _prepare_run(cfg, out, resume, meta)
        write_splits(out / "splits.csv", table, folds)
    _barrier(world_size)
    selected = [f for f in folds if cfg.only_folds is None or f.index in cfg.only_folds]
    results: dict[int, dict[str, Any]] = {}
    for fold in folds:  # results of folds finished earlier (this run or another job)
        done = checkpoints(fold.index).directory / "result.json"
        if done.exists():
            results[fold.index] = json.loads(done.read_text())
    for fold in selected:
        if fold.index in results:
            log.info("fold %d is already finished", fold.index)
            continue
        ckpt = checkpoints(fold.index)
        trainer = FoldTrainer(cfg, fold, table, paths, in_dim, ckpt, device, rank, world_size,
                              stop, on_epoch)
        where = trainer.resume() if resume else None
        if where:
            log.warning("fold %d resumes from %s (epoch %d, step %d)", fold.index, where,
                        trainer.progress.epoch, trainer.progress.step)
        trainer.fit()
        _barrier(world_size)
        best = ckpt.load_best(map_location=device)
        if best is None:
            raise GigamilError(f"fold {fold.index} has no usable best checkpoint in "
                               f"{ckpt.directory}", "rerun with --resume auto to retrain it")
        trainer.model.load_state_dict(best["model"])
        result: dict[str, Any] = {"fold": fold.index, "best_epoch": best["epoch"],
                                  "history": trainer.progress.history,
                                  "n": {"train": len(fold.train), "val": len(fold.val),
                                        "test": len(fold.test)}}
        if trainer.test_set is not None:
            preds, _ = trainer.evaluate(trainer.test_set)
            y = np.asarray(trainer.test_set.targets)[preds.index]
            ci = bootstrap_metrics(y, preds.probs, cfg.bootstrap, seed=cfg.seed,
                                   classes=table.classes)
            result["test_ci"] = {k: list(v) for k, v in ci.items()}
            if main:
                ids = [fold.test[i] for i in preds.index]
                write_csv(out / f"predictions_fold{fold.index}.csv",
                          prediction_rows(table, ids, preds.probs, preds.uncertainty,
                                          preds.n_instances, fold.index, cfg.model),
                          prediction_fields(table.classes))
        results[fold.index] = result
        if main:
            write_json(ckpt.directory / "result.json", result)
            _write_metrics(out, results, table.classes)
        _barrier(world_size)

    summary: dict[str, Any] = {"classes": table.classes, "model": cfg.model,
                               "n_slides": len(table), "folds": {}}
    if not main:
        return summary
    ys, ps = [], []
    for k in sorted(results):
        summary["folds"][str(k)] = {"best_epoch": results[k]["best_epoch"],
                                    "n": results[k]["n"]}
        pred_file = out / f"predictions_fold{k}.csv"
        if "test_ci" not in results[k] or not pred_file.exists():
            continue
        y, p = read_predictions(pred_file, table.classes)
        summary["folds"][str(k)]["test"] = summarize(y, p, table.classes, cfg.bootstrap, cfg.seed)
        ys.append(y)
        ps.append(p)
    pooled = None
    if ys:
        y, p = np.concatenate(ys), np.concatenate(ps)
        summary["pooled"] = summarize(y, p, table.classes, cfg.bootstrap, cfg.seed)
        pooled = bootstrap_metrics(y, p, cfg.bootstrap, seed=cfg.seed, classes=table.classes)
        save_png(out / "reliability.png",
                 reliability_diagram(y, p, title=f"{cfg.model}, {len(ys)} folds pooled"))
    _write_metrics(out, results, table.classes, pooled)
    complete = all(f.index in results for f in folds)
    summary["complete"] = complete
    write_json(out / "summary.json", summary)
    return summary


def default_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available here", "use --device cpu")
    return dev

