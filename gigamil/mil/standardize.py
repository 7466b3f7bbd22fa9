"""Feature standardization, fitted on a fold's training bags and saved inside its model.

    mean, std = feature_stats(train_set)
    if wants_standardizing("auto", mean, std):
        model = Standardized(model, in_dim, mean, std)   # eval, infer and ONNX apply it too

Hand-crafted or unnormalized features (values in the hundreds, or dimensions on scales
a thousand times apart) stall attention-MIL; ImageNet or pathology encoder features are
already near zero mean and unit scale and are left as they are under ``auto``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from gigamil.mil.bags import BagDataset
from gigamil.mil.models.base import MILOutput

__all__ = ["feature_stats", "wants_standardizing", "fit_standardization", "Standardized"]


def feature_stats(dataset: BagDataset, per_bag: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation over the instances of ``dataset``
    (at most ``per_bag`` evenly spaced instances of each bag: deterministic), float64."""
    total = 0
    s1: np.ndarray | None = None
    s2: np.ndarray | None = None
    for i in range(len(dataset)):
        feats = dataset[i][0].cpu().numpy().astype(np.float64)
        if len(feats) > per_bag:
            feats = feats[np.linspace(0, len(feats) - 1, per_bag).round().astype(np.int64)]
        s1 = feats.sum(0) if s1 is None else s1 + feats.sum(0)
        s2 = (feats**2).sum(0) if s2 is None else s2 + (feats**2).sum(0)
        total += len(feats)
    if s1 is None or s2 is None or total == 0:
        raise ValueError("no instances to standardize on")
    mean = s1 / total
    std = np.sqrt(np.maximum(s2 / total - mean**2, 0.0))
    return mean, std


def wants_standardizing(mode: str, mean: np.ndarray, std: np.ndarray) -> bool:
    """``on``/``off``, or under ``auto``: whether the features are far from zero mean and
    unit scale (a tenth of the dimensions off by a factor of 5 or more)."""
    if mode != "auto":
        return mode == "on"
    live = std > 0
    if not live.any():
        return False
    off_scale = (std[live] > 5) | (std[live] < 0.2)
    off_centre = np.abs(mean[live]) > 5 * np.maximum(std[live], 1.0)
    return bool((off_scale | off_centre).mean() > 0.1)


def fit_standardization(mode: str, train_set: BagDataset
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) of the training instances when ``--standardize mode`` applies, else None."""
    if mode == "off":
        return None
    mean, std = feature_stats(train_set)
    return (mean, std) if wants_standardizing(mode, mean, std) else None


class Standardized(nn.Module):
    """``model`` fed ``(x - mean) / std`` on the real instances (0 on padding).

    Dimensions without spread keep a scale of 1, and a spread is taken as at least 1e-3
    of the dimension's mean (below that it is round-off). The statistics are buffers: they are
    saved and loaded with the model, and traced into its ONNX export.
    """

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, model: nn.Module, in_dim: int, mean: np.ndarray | None = None,
                 std: np.ndarray | None = None) -> None:
        super().__init__()
        self.model = model
        m = np.zeros(in_dim) if mean is None else np.asarray(mean, np.float64)
        s = np.ones(in_dim) if std is None else np.asarray(std, np.float64)
        # a spread under 1e-3 of the dimension's own mean is float32 round-off once the
        # mean is subtracted: it is not blown up to unit scale
        floor = 1e-3 * np.abs(m)
        s = np.where(s > 1e-12, np.maximum(s, floor), 1.0)
        self.register_buffer("mean", torch.tensor(m, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(1.0 / s, dtype=torch.float32))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: Any
                ) -> MILOutput:
        z = (x - self.mean) * self.scale
        if mask is not None:
            z = z * mask[..., None].to(z.dtype)
        out: MILOutput = self.model(z, mask, **kwargs)
        return out
