"""An evidential (Dirichlet) head that turns any model's logits into probabilities and
an uncertainty (Sensoy et al., NeurIPS 2018), and its loss.

    probs, uncertainty = dirichlet(out.logits)       # uncertainty = K / Σα in (0, 1]
    loss = evidential_loss(out.logits, y, epoch_frac) # expected MSE + annealed KL
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dirichlet", "evidential_loss"]


def dirichlet(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected class probabilities, uncertainty) with evidence = softplus(logits), α = e + 1."""
    alpha = F.softplus(logits) + 1.0
    strength = alpha.sum(-1, keepdim=True)
    return alpha / strength, (logits.shape[-1] / strength).squeeze(-1)


def evidential_loss(logits: torch.Tensor, target: torch.Tensor, anneal: float = 1.0,
                    reduction: str = "mean") -> torch.Tensor:
    """Expected squared error under the Dirichlet plus a KL term (weight ``anneal`` in [0, 1])
    that shrinks misleading evidence towards the uniform Dirichlet.

    ``reduction="none"`` returns the per-bag losses."""
    k = logits.shape[-1]
    alpha = F.softplus(logits) + 1.0
    s = alpha.sum(-1, keepdim=True)
    y = F.one_hot(target, k).to(logits.dtype)
    p = alpha / s
    mse = ((y - p) ** 2 + p * (1 - p) / (s + 1)).sum(-1)
    alpha_t = y + (1 - y) * alpha  # remove the evidence of the true class
    s_t = alpha_t.sum(-1)
    kl = (torch.lgamma(s_t) - torch.lgamma(torch.tensor(float(k), device=logits.device))
          - torch.lgamma(alpha_t).sum(-1)
          + ((alpha_t - 1) * (torch.digamma(alpha_t) - torch.digamma(s_t)[:, None])).sum(-1))
    per_bag = mse + min(max(anneal, 0.0), 1.0) * kl
    return per_bag if reduction == "none" else per_bag.mean()
