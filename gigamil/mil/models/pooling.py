"""Pooling baselines: mean and max of instance features, then a linear classifier."""

from __future__ import annotations

import functools

import torch
from torch import nn

from gigamil.mil.models.base import MODELS, MILOutput, apply_valid

__all__ = ["PoolingMIL"]


class PoolingMIL(nn.Module):
    """Instances → hidden → mean or max over the valid instances → classifier.

    Attention reports each instance's share: uniform for mean; for max, the share
    of the (non-zero) features for which the instance is the maximum.
    """

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 256, mode: str = "mean",
                 dropout: float = 0.25) -> None:
        super().__init__()
        if mode not in ("mean", "max"):
            raise ValueError(f"mode must be mean or max, not {mode!r}")
        self.mode = mode
        self.project = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        h = apply_valid(self.project, x, mask)
        m = mask[..., None]
        count = mask.sum(1, keepdim=True).clamp_min(1)
        if self.mode == "mean":
            bag = (h * m).sum(1) / count
            attention = mask / count
        else:
            filled = h.masked_fill(~m, torch.finfo(h.dtype).min)
            bag, idx = filled.max(dim=1)
            bag = torch.where(mask.any(1, keepdim=True), bag, torch.zeros_like(bag))
            hits = torch.zeros_like(h).scatter_(1, idx[:, None, :], 1.0)
            active = (bag > 0).to(h.dtype)[:, None, :]  # dead (all-zero) features have no argmax
            attention = (hits * active).sum(-1) * mask
            attention = attention / attention.sum(-1, keepdim=True).clamp_min(1e-12)
        return MILOutput(self.classifier(bag), attention, bag)


MODELS.register("mean")(functools.partial(PoolingMIL, mode="mean"))
MODELS.register("max")(functools.partial(PoolingMIL, mode="max"))
