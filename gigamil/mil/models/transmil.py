"""TransMIL (Shao et al., NeurIPS 2021): transformer MIL with a pyramid position encoding.

Two transformer layers (``scaled_dot_product_attention`` instead of the paper's
Nyström approximation) around a PPEG module that runs depth-wise convolutions
over the instances laid out on a square. Padded instances are masked out of
every attention; ``attention`` reports the class token's last-layer attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gigamil.mil.models.base import MODELS, MILOutput, masked_softmax

__all__ = ["TransMIL"]


class _TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, cls_attention: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)
        allowed = key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(out.transpose(1, 2).reshape(b, t, d))
        attn = None
        if cls_attention:  # the class token's weights, averaged over heads
            scores = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(d // self.heads)
            attn = masked_softmax(scores, key_mask[:, None, :]).mean(1)
        return x, attn


class _PPEG(nn.Module):
    """Pyramid position encoding generator: depth-wise 7/5/3 convolutions, summed."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
                                   for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, n, d = x.shape
        grid = x.transpose(1, 2).reshape(b, d, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return grid.flatten(2).transpose(1, 2)


class TransMIL(nn.Module):
    """Instances → linear → [class token; square layout] → attention → PPEG → attention."""

    def __init__(self, in_dim: int, n_classes: int = 2, dim: int = 256, heads: int = 8,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.layer1 = _TransLayer(dim, heads, dropout)
        self.ppeg = _PPEG(dim)
        self.layer2 = _TransLayer(dim, heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        b, n, _ = x.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        h = self.fc(x)
        side = max(1, math.ceil(math.sqrt(n)))
        extra = side * side - n  # fill the square by repeating the first instances (as the paper)
        if extra:
            reps = math.ceil(extra / n)
            h = torch.cat([h, h.repeat(1, reps, 1)[:, :extra]], dim=1)
            mask_sq = torch.cat([mask, mask.repeat(1, reps)[:, :extra]], dim=1)
        else:
            mask_sq = mask
        h = h * mask_sq[..., None]
        ones = torch.ones(b, 1, dtype=torch.bool, device=x.device)
        key_mask = torch.cat([ones, mask_sq], dim=1)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1)
        tokens, _ = self.layer1(tokens, key_mask)
        cls, feats = tokens[:, :1], self.ppeg(tokens[:, 1:], side) * mask_sq[..., None]
        tokens, attn = self.layer2(torch.cat([cls, feats], dim=1), key_mask, cls_attention=True)
        bag = self.norm(tokens[:, 0])
        assert attn is not None
        inst = attn[:, 1 : 1 + n] * mask
        inst = inst / inst.sum(-1, keepdim=True).clamp_min(torch.finfo(inst.dtype).tiny)
        return MILOutput(self.classifier(bag), inst, bag)


MODELS.register("transmil")(TransMIL)
