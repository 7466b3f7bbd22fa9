"""Attention-MIL models: one registry, one factory, plain ``nn.Module`` files.

    model = create_model("abmil", in_dim=1024, n_classes=2, gated=True)
    out = model(x, mask)           # x (B, N, D) padded bags, mask (B, N) True = real instance
    out.logits, out.attention      # (B, C), (B, N) (or (B, H, N) with several heads)

Every model takes padded batches with a mask (no batch-size-1 restriction) and
returns :class:`MILOutput`. Model files hold no distributed or I/O code.
"""

from gigamil.mil.models import (  # noqa: F401  (registers them)
    abmil,
    clam,
    hier_abmil,
    pooling,
    transmil,
)
from gigamil.mil.models.base import MODELS, MILOutput, bag_layout, create_model, list_models
from gigamil.mil.models.evidential import dirichlet, evidential_loss

__all__ = ["MODELS", "MILOutput", "bag_layout", "create_model", "list_models", "dirichlet", "evidential_loss"]
