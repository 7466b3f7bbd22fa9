"""CLAM (Lu et al., Nat. Biomed. Eng. 2021): gated attention with instance-level clustering.

``clam_sb`` has one attention branch, ``clam_mb`` one per class. Given the bag
labels, the forward pass adds CLAM's instance loss: the ``k`` most and least
attended instances of the true class's branch are classified as positive and
negative evidence (and, for the other classes in ``clam_mb`` / subtyping, the
most attended ones as negative), with cross-entropy in place of the original
smooth SVM.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from gigamil.mil.models.base import MODELS, MILOutput, apply_valid, masked_softmax

__all__ = ["CLAM"]


class CLAM(nn.Module):
    """Gated attention MIL with instance classifiers per class (single or multi branch)."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 256, attn_dim: int = 128,
                 multi_branch: bool = False, k_sample: int = 8, dropout: float = 0.25,
                 subtyping: bool = False) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.k = k_sample
        self.subtyping = subtyping
        branches = n_classes if multi_branch else 1
        self.project = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_a = nn.Linear(hidden, attn_dim)
        self.attn_b = nn.Linear(hidden, attn_dim)
        self.attn_c = nn.Linear(attn_dim, branches, bias=False)  # softmax ignores a shift
        if multi_branch:  # one bag classifier per class, each on its own branch's embedding
            self.bag_classifiers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_classes))
        else:
            self.classifier = nn.Linear(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                label: torch.Tensor | None = None) -> MILOutput:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        h = apply_valid(self.project, x, mask)
        scores = apply_valid(self._score, h, mask)
        weights = masked_softmax(scores.transpose(1, 2), mask[:, None, :])  # (B, K, N)
        bag = torch.einsum("bkn,bnd->bkd", weights, h)
        if hasattr(self, "bag_classifiers"):
            logits = torch.cat([clf(bag[:, c]) for c, clf in enumerate(self.bag_classifiers)], -1)
        else:
            logits = self.classifier(bag[:, 0])
        aux = None if label is None else self._instance_loss(h, weights, mask, label)
        attention = weights[:, 0] if weights.shape[1] == 1 else weights
        return MILOutput(logits, attention, bag.flatten(1), aux)

    def _score(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn_c(torch.tanh(self.attn_a(h)) * torch.sigmoid(self.attn_b(h)))

    def _instance_loss(self, h: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                       label: torch.Tensor) -> torch.Tensor:
        losses = []
        for b in range(h.shape[0]):
            n = int(mask[b].sum())
            k = min(self.k, n // 2)
            if k < 1:
                continue
            y = int(label[b])
            for c, clf in enumerate(self.instance_classifiers):
                branch = weights[b, c if weights.shape[1] > 1 else 0, :n]
                feats = h[b, :n]
                if c == y:  # in-class: top-k attended are positive, bottom-k negative
                    top = feats[branch.topk(k).indices]
                    bottom = feats[(-branch).topk(k).indices]
                    inst = torch.cat([top, bottom])
                    target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
                elif self.subtyping:  # out-of-class: top-k attended are negative
                    inst = feats[branch.topk(k).indices]
                    target = torch.zeros(k, dtype=torch.long, device=h.device)
                else:
                    continue
                losses.append(F.cross_entropy(clf(inst), target))
        if not losses:
            return h.sum() * 0.0
        return torch.stack(losses).mean()


MODELS.register("clam_sb")(functools.partial(CLAM, multi_branch=False))
MODELS.register("clam_mb")(functools.partial(CLAM, multi_branch=True))
