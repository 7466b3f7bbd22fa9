"""One fold of a training run: its loop, its resumable state, and stop requests.

This module holds no signal handling or checkpoint file format: the caller passes a
:class:`Checkpointer` and a :class:`StopRequest` that its signal handlers set.
Everything the loop needs to continue — model, optimizer, scheduler, AMP scaler,
epoch/step, position in the epoch, RNG state, early-stopping state, history — is in
:meth:`FoldTrainer.state_dict`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from gigamil.errors import TrainingInterrupted, UsageError
from gigamil.mil.bags import BagBatch, BagBatchSampler, BagDataset, collate_bags
from gigamil.mil.fold_state import Checkpointer, FoldProgress, StopRequest
from gigamil.mil.labels import LabelTable
from gigamil.mil.models import bag_layout
from gigamil.mil.predict import Predictions, build_model, predict, takes_label
from gigamil.mil.splits import Fold
from gigamil.mil.standardize import Standardized, fit_standardization
from gigamil.mil.targets import (
    Target,
    evaluate_targets,
    layout_targets,
    monitor_key,
    target_from_dict,
    total_outputs,
)
from gigamil.mil.train_config import MONITORS, TrainConfig, autocast_dtype

__all__ = ["Checkpointer", "StopRequest", "FoldProgress", "FoldTrainer"]  # the first three:
# from gigamil.mil.fold_state, re-exported

log = logging.getLogger(__name__)


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
        self.ckpt = ckpt
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.stop = stop or StopRequest()
        self.on_epoch = on_epoch
        self.in_dim = in_dim
        by_id = table.by_id()
        # this fold's own targets: bins, class weights and scales come from its training slides
        self.targets: list[Target] = layout_targets(
            [target_from_dict(t.to_dict()) for t in table.targets])
        for t in self.targets:
            t.fit(table.y(fold.train)[:, t.columns])

        def dataset(ids: Sequence[str], train: bool) -> BagDataset:
            return BagDataset([paths[i] for i in ids], table.y(ids),
                              max_instances=cfg.max_instances if train else None,
                              seed=cfg.seed * 1000 + fold.index, preload=cfg.preload,
                              preload_device=device, layout=bag_layout(cfg.model))

        self.train_set = dataset(fold.train, True)
        self.val_set = dataset(fold.val, False) if fold.val else None
        self.test_set = dataset(fold.test, False) if fold.test else None
        strata = [table.target(by_id[i]) for i in fold.train]
        self.sampler = BagBatchSampler(
            strata, self.train_set.lengths() if cfg.bucket else None,
            cfg.batch_size, shuffle=True, balanced=cfg.balanced_sampler, bucket=cfg.bucket,
            seed=cfg.seed * 1000 + fold.index, rank=rank, world_size=world_size)
        self.batches_per_epoch = len(self.sampler.global_batches(0))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.accumulate)

        self.standardize = fit_standardization(cfg.standardize, self.train_set)
        torch.manual_seed(cfg.seed * 1000 + fold.index)  # the same initial weights on every rank
        self.model = build_model(cfg.model, in_dim, total_outputs(self.targets),
                                 cfg.model_options)
        self.with_label = takes_label(self.model)
        if self.with_label and (len(self.targets) > 1 or self.targets[0].kind != "classification"):
            raise UsageError(f"model {cfg.model!r} trains on one class label",
                             "use abmil, transmil or another model for survival, regression "
                             "or several targets")
        if self.standardize is not None:
            self.model = Standardized(self.model, in_dim, *self.standardize)
        self.model = self.model.to(device)
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
        self.progress = FoldProgress()

    @property
    def classes(self) -> list[str]:
        """The classes of the first target (none for survival or regression)."""
        first = self.targets[0]
        return list(getattr(first, "classes", []))

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

    def calibrated(self, preds: Predictions, dataset: BagDataset) -> list[Target]:
        """Copies of the fold's targets with post-hoc calibration (temperature scaling)
        fitted on ``preds`` of ``dataset``: the inner validation split, never the test fold."""
        y = dataset.targets[preds.index]
        out = copy.deepcopy(self.targets)
        for t in out:
            t.calibrate(y[:, t.columns], preds.logits[:, t.outputs])
        return out

    def best_state(self, epoch: int, targets: Sequence[Target] | None = None) -> dict[str, Any]:
        """The deployable model: weights plus what is needed to rebuild and use it
        (``targets``: the calibrated ones, default the fold's own)."""
        targets = self.targets if targets is None else targets
        return {"model": self.model.state_dict(), "epoch": epoch,
                "meta": {"model": self.cfg.model, "model_options": dict(self.cfg.model_options),
                         "in_dim": self.in_dim, "classes": self.classes,
                         "n_outputs": total_outputs(self.targets),
                         "targets": [t.to_dict() for t in targets],
                         "standardize": self.standardize is not None,
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
        dtype = autocast_dtype(cfg.precision)
        x, mask = batch.padded()
        with torch.autocast(self.device.type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            if self.with_label:
                out = self.ddp(x, mask, label=batch.targets[:, 0].long())
            else:
                out = self.ddp(x, mask)
        logits = out.logits.float()
        # normalise by the *global* batch, so gradients do not depend on the number of ranks
        scale = self.world_size / (self.sampler.batch_size * n_micro)
        loss = logits.new_zeros(())
        for t in self.targets:
            o, y = logits[:, t.outputs], batch.targets[:, t.columns]
            if t.batch_loss:  # Cox: the risk set is the global batch, gathered from every rank
                o, y = self._gather(o), self._gather(y)
                loss = loss + t.weight * t.loss(o, y, self.progress.epoch) * scale / self.world_size
            else:
                loss = loss + t.weight * t.loss(o, y, self.progress.epoch).sum() * scale
        if out.aux_loss is not None:
            loss = loss + cfg.aux_weight * out.aux_loss.float() * len(logits) * scale
        return loss

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` of every rank, concatenated in rank order (gradients flow back to each)."""
        if self.world_size == 1:
            return t
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(t.contiguous()))

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

    def evaluate(self, dataset: BagDataset, embeddings: bool = False
                 ) -> tuple[Predictions, dict[str, float]]:
        preds = predict(self.model, dataset, self.device, self.cfg.batch_size,
                        self.cfg.precision, self.rank, self.world_size, self.cfg.workers,
                        embeddings)
        y = dataset.targets[preds.index]
        return preds, evaluate_targets(self.targets, y, preds.logits, self.progress.epoch)

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
            val_preds = None
            if self.val_set is not None:
                val_preds, val = self.evaluate(self.val_set)
                row.update({f"val_{k}": v for k, v in val.items()})
                value = sign * val[monitor_key(self.targets, cfg.monitor)]
            else:
                value = float(p.epoch)  # no validation set: the latest epoch is the best
            p.history.append(row)
            # a monitor that is undefined (AUROC of a one-class validation split) keeps the
            # latest epoch as the best until it has a value: never a fold without a model
            undefined = math.isnan(value) and p.best == -math.inf
            if undefined and p.best_epoch == -1:
                log.warning("fold %d: validation %s is undefined; keeping the latest epoch",
                            self.fold.index, cfg.monitor)
            improved = undefined or (not math.isnan(value) and value > p.best)
            if improved:
                p.best = -math.inf if undefined else value
                p.best_epoch, p.bad_epochs = p.epoch, 0
            else:
                p.bad_epochs += 1
            if improved:
                calibrated = (self.calibrated(val_preds, self.val_set)
                              if val_preds is not None and self.val_set is not None
                              and cfg.calibrate != "off" else None)
                self.ckpt.save_best(self.best_state(p.epoch, calibrated), sign * p.best, p.step)
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
