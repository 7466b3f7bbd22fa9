"""Attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018), plain or gated, multi-head.

Layout: config-free constructor arguments, ``forward(x, mask) -> MILOutput``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from gigamil.mil.models.base import MODELS, MILOutput, apply_valid, masked_softmax

__all__ = ["ABMIL"]


class ABMIL(nn.Module):
    """Instances → hidden features → attention pooling (per head) → classifier.

    ``gated=True`` is the gated attention of the paper (tanh ⊙ sigmoid). With
    ``heads > 1`` each head pools its own bag embedding; they are concatenated.
    """

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 256, attn_dim: int = 128,
                 heads: int = 1, gated: bool = False, dropout: float = 0.25) -> None:
        super().__init__()
        self.heads = heads
        self.project = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, attn_dim)
        self.attn_u = nn.Linear(hidden, attn_dim) if gated else None
        # no bias: softmax ignores a shift, so its gradient is 0 and Adam would amplify noise
        self.attn_w = nn.Linear(attn_dim, heads, bias=False)
        self.classifier = nn.Linear(hidden * heads, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        h = apply_valid(self.project, x, mask)  # (B, N, hidden), padding never computed
        scores = apply_valid(self._score, h, mask).transpose(1, 2)  # (B, heads, N)
        weights = masked_softmax(scores, mask[:, None, :])
        bag = torch.einsum("bhn,bnd->bhd", weights, h).flatten(1)  # (B, heads*hidden)
        attention = weights[:, 0] if self.heads == 1 else weights
        return MILOutput(self.classifier(bag), attention, bag)

    def _score(self, h: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.attn_v(h))
        if self.attn_u is not None:
            a = a * torch.sigmoid(self.attn_u(h))
        return self.attn_w(a)


MODELS.register("abmil")(ABMIL)
MODELS.register("abmil_gated")(functools.partial(ABMIL, gated=True))
