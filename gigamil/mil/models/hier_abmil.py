"""Hierarchical multi-scale attention MIL: fine patches within coarse regions, then regions.

Layout: config-free constructor arguments, ``forward(x, mask) -> MILOutput``.

Each instance row is ``[fine feature | its coarse region's feature]`` (``in_dim = 2 D``),
the ``parent`` bag layout that :class:`gigamil.mil.bags.BagDataset` builds from a
feature file embedded with ``--scales all``. The rows of one region share its coarse
half exactly, which is how the model finds the regions (a fine patch whose region was
not kept carries its own feature there: a region of one). Attention runs over the fine
patches inside each region, the pooled vector is combined with the region's own
feature, and a second attention runs across the regions. The instance attention it
returns is each fine patch's share of the bag: its weight within its region times its
region's weight.
"""

from __future__ import annotations

import torch
from torch import nn

from gigamil.mil.models.base import MODELS, MILOutput, apply_valid, masked_softmax

__all__ = ["HierABMIL"]


class HierABMIL(nn.Module):
    """Fine patches → attention within their coarse region → + region feature → attention
    across regions → classifier."""

    bag_layout = "parent"  # instance rows: [fine | coarse parent]

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 256, attn_dim: int = 128,
                 dropout: float = 0.25) -> None:
        super().__init__()
        if in_dim % 2:
            raise ValueError(f"hier_abmil takes [fine | coarse] rows (an even in_dim), got {in_dim}")
        self.dim = in_dim // 2
        self.fine = nn.Sequential(nn.Linear(self.dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.coarse = nn.Sequential(nn.Linear(self.dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.combine = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(),
                                     nn.Dropout(dropout))
        self.fine_attn = _Attention(hidden, attn_dim)
        self.region_attn = _Attention(hidden, attn_dim)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        region, n_regions = _regions(x[..., self.dim:], mask)  # (B, N) region of each row
        r = max(1, int(n_regions.max()))
        member = (region[..., None] == torch.arange(r, device=x.device)) & mask[..., None]
        h = apply_valid(self.fine, x[..., :self.dim], mask)  # (B, N, hidden)
        s = apply_valid(self.fine_attn, h, mask)[..., 0]  # (B, N)
        # softmax of the scores within each region: (B, N, R), 0 outside it
        within = masked_softmax(s[..., None].expand_as(member).transpose(1, 2),
                                member.transpose(1, 2))  # (B, R, N)
        pooled = torch.bmm(within.to(h.dtype), h)  # (B, R, hidden)
        count = member.sum(1).clamp_min(1)  # (B, R)
        coarse_in = torch.bmm(member.transpose(1, 2).to(x.dtype), x[..., self.dim:]) \
            / count[..., None].to(x.dtype)  # the region's feature (equal on all its rows)
        region_ok = member.any(1)  # (B, R)
        z = apply_valid(self.combine, torch.cat(
            [pooled, apply_valid(self.coarse, coarse_in, region_ok)], -1), region_ok)
        weights = masked_softmax(apply_valid(self.region_attn, z, region_ok)[..., 0], region_ok)
        bag = torch.einsum("br,brh->bh", weights, z)
        # each fine patch's share: its weight in its region times the region's weight
        attention = (within * weights[..., None]).sum(1) * mask
        return MILOutput(self.classifier(bag), attention, bag)


class _Attention(nn.Module):
    """Tanh attention scores (B, N, 1) of hidden vectors."""

    def __init__(self, hidden: int, attn_dim: int) -> None:
        super().__init__()
        self.v = nn.Linear(hidden, attn_dim)
        self.w = nn.Linear(attn_dim, 1, bias=False)  # a shift is ignored by the softmax

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(torch.tanh(self.v(h)))


def _regions(coarse: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) region index of each real row (rows with equal coarse halves share one;
    numbered in sorted order), -1 on padding; and (B,) the regions of each bag."""
    region = torch.full(mask.shape, -1, dtype=torch.long, device=coarse.device)
    counts = torch.zeros(len(mask), dtype=torch.long, device=coarse.device)
    for b in range(len(mask)):
        rows = coarse[b][mask[b]]
        if len(rows):
            _, inverse = torch.unique(rows, dim=0, return_inverse=True)
            region[b, mask[b]] = inverse
            counts[b] = int(inverse.max()) + 1
    return region, counts


MODELS.register("hier_abmil")(HierABMIL)
