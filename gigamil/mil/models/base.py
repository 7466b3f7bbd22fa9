"""The model registry, the common output type and masked helpers shared by the models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gigamil.registry import Registry

__all__ = ["MODELS", "MILOutput", "bag_layout", "create_model", "list_models", "masked_softmax", "apply_valid"]

MODELS: Registry[nn.Module] = Registry("MIL model")


@dataclass
class MILOutput:
    """What every MIL model returns."""

    logits: torch.Tensor  # (B, C)
    attention: torch.Tensor  # (B, N) instance weights (0 on padding), or (B, H, N)
    embedding: torch.Tensor | None = None  # (B, E) bag embedding before the classifier
    aux_loss: torch.Tensor | None = None  # a model's own extra loss (CLAM's instance loss)


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered model: ``create_model("abmil", in_dim=1024, n_classes=2)``."""
    return MODELS.create(name, **kwargs)


def bag_layout(name: str) -> str:
    """What a model's instance rows hold: ``instances`` (one patch's feature), or
    ``parent`` (``[fine | coarse parent]``, from features embedded with ``--scales all``)."""
    return str(getattr(MODELS.get(name), "bag_layout", "instances"))


def list_models() -> list[str]:
    return MODELS.names()


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where ``mask`` is True; exactly 0 on padding.

    A bag with no valid instance gets all-zero weights (never NaN).
    """
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1) * mask
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def apply_valid(fn: nn.Module | Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """``fn`` over the real instances only, zeros at padding: padding costs no compute.

    ``x`` (B, N, D) and ``mask`` (B, N) → (B, N, D'), as ``fn(x)`` on the real rows.
    """
    if bool(mask.all()):
        return fn(x)
    values = fn(x[mask])
    out = values.new_zeros(*mask.shape, values.shape[-1])
    out[mask] = values
    return out
