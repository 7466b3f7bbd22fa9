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
from torch import nn
from torch.utils.data import DataLoader

from gigamil.errors import UsageError
from gigamil.mil.bags import BagBatchSampler, BagDataset, collate_bags
from gigamil.mil.models import create_model, dirichlet
from gigamil.mil.train_config import autocast_dtype

__all__ = ["Predictions", "build_model", "load_model", "takes_label", "temperature_of",
           "probs_and_uncertainty", "predict"]


@dataclass
class Predictions:
    """Per-bag outputs in dataset order."""

    index: np.ndarray  # (n,) dataset indices
    logits: np.ndarray  # (n, outputs) every target's head
    n_instances: np.ndarray  # (n,)
    embedding: np.ndarray | None = None  # (n, E) the pooled slide vector, when asked for


def build_model(name: str, in_dim: int, n_classes: int, options: dict[str, Any]) -> nn.Module:
    """``create_model`` with a clear error for an unknown option."""
    try:
        return create_model(name, in_dim=in_dim, n_classes=n_classes, **options)
    except TypeError as exc:
        raise UsageError(f"model {name!r}: {exc}",
                         "see `gigamil models` for each model's options") from None


def load_model(state: dict[str, Any], device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """A model and its metadata from a ``best.pt`` state
    (see :meth:`gigamil.mil.fold.FoldTrainer.best_state`): with the feature standardization
    it was trained with, if any."""
    from gigamil.mil.standardize import Standardized

    meta = state["meta"]
    n_out = meta.get("n_outputs") or len(meta["classes"])
    model = build_model(meta["model"], meta["in_dim"], n_out, meta["model_options"])
    if meta.get("standardize"):
        model = Standardized(model, meta["in_dim"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), meta


def temperature_of(meta: dict[str, Any]) -> float:
    """The temperature a single-classification fold model's logits are divided by before
    the softmax (fitted on its inner validation split; 1 for older or evidential models)."""
    targets = meta.get("targets") or []
    if len(targets) != 1 or targets[0]["kind"] != "classification" or meta.get("evidential"):
        return 1.0
    return float(targets[0].get("temperature", 1.0))


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
            precision: str = "fp32", rank: int = 0, world_size: int = 1, workers: int = 0,
            embeddings: bool = False) -> Predictions:
    """Run ``model`` over every bag (sharded over ranks, then gathered on all of them):
    the logits, and with ``embeddings`` the pooled slide vectors."""
    model.eval()
    sampler = BagBatchSampler(np.zeros(len(dataset), np.int64), batch_size=batch_size,
                              shuffle=False, rank=rank, world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_bags,
                        num_workers=0 if dataset.on_device else workers,
                        generator=torch.Generator())
    dtype = autocast_dtype(precision)
    rows: list[tuple[int, list[float], int, list[float] | None]] = []
    for batch in loader:
        b = batch.to(device)
        x, mask = b.padded()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x, mask)
        logits = out.logits.float().cpu()
        emb = out.embedding.float().cpu() if embeddings and out.embedding is not None else None
        for k in range(len(batch.index)):
            rows.append((int(batch.index[k]), logits[k].tolist(), int(batch.lengths[k]),
                         emb[k].tolist() if emb is not None else None))
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    rows.sort(key=lambda r: r[0])
    embedding = None
    if embeddings and rows and rows[0][3] is not None:
        embedding = np.array([r[3] for r in rows], np.float32)
    return Predictions(np.array([r[0] for r in rows], np.int64),
                       np.array([r[1] for r in rows], np.float64).reshape(len(rows), -1),
                       np.array([r[2] for r in rows], np.int64), embedding)
