"""Fold models: building one, loading a saved one, and running it over a bag dataset.

    model, meta = load_model(torch.load("runs/crc1/checkpoints/fold0/best.pt"), device)
    preds = predict(model, dataset, device, evidential=meta["evidential"])
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from gigamil.errors import UsageError
from gigamil.mil.bags import BagBatchSampler, BagDataset, collate_bags
from gigamil.mil.models import create_model, dirichlet
from gigamil.mil.train_config import autocast_dtype

__all__ = ["Predictions", "build_model", "load_model", "takes_label", "probs_and_uncertainty",
           "predict"]


@dataclass
class Predictions:
    """Per-bag outputs in dataset order."""

    index: np.ndarray  # (n,) dataset indices
    probs: np.ndarray  # (n, C)
    uncertainty: np.ndarray  # (n,)
    loss: np.ndarray  # (n,) per-bag loss (NaN without targets)
    n_instances: np.ndarray  # (n,)


def build_model(name: str, in_dim: int, n_classes: int, options: dict[str, Any]) -> nn.Module:
    """``create_model`` with a clear error for an unknown option."""
    try:
        return create_model(name, in_dim=in_dim, n_classes=n_classes, **options)
    except TypeError as exc:
        raise UsageError(f"model {name!r}: {exc}",
                         "see `gigamil models` for each model's options") from None


def load_model(state: dict[str, Any], device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """A model and its metadata from a ``best.pt`` state
    (see :meth:`gigamil.mil.fold.FoldTrainer.best_state`)."""
    meta = state["meta"]
    model = build_model(meta["model"], meta["in_dim"], len(meta["classes"]), meta["model_options"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), meta


def takes_label(model: nn.Module) -> bool:
    """Whether the model's forward takes the bag label (CLAM's instance loss does)."""
    return "label" in inspect.signature(model.forward).parameters


def probs_and_uncertainty(logits: torch.Tensor, evidential: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
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
    dtype = autocast_dtype(precision)
    rows: list[tuple[int, list[float], float, float, int]] = []
    for batch in loader:
        b = batch.to(device)
        x, mask = b.padded()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x, mask)
        logits = out.logits.float()
        probs, unc = probs_and_uncertainty(logits, evidential)
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
