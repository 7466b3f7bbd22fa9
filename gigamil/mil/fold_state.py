"""What a fold's loop keeps and is told: its progress, where checkpoints go, stop requests.

:class:`FoldProgress` is the loop's position (plain values, safe for ``weights_only``);
:class:`Checkpointer` is the interface of ``gigamil.cluster.checkpoint.CheckpointManager``;
:class:`StopRequest` is set by signal handlers and read at step boundaries.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["Checkpointer", "StopRequest", "FoldProgress"]


class Checkpointer(Protocol):
    """Where a fold's checkpoints go (``gigamil.cluster.checkpoint.CheckpointManager``)."""

    directory: Path

    def save(self, state: dict[str, Any], step: int) -> Path: ...
    def save_best(self, state: dict[str, Any], metric: float, step: int) -> Path: ...
    def load_latest(self, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, Any], Path] | None: ...
    def load_best(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None: ...


class StopRequest:
    """Set by a signal handler; the loop checkpoints at the next step boundary.

    ``stop=True`` (SIGTERM) then ends the run; ``stop=False`` (SIGUSR1) goes on.
    """

    def __init__(self) -> None:
        self.level = 0  # 0 nothing, 1 checkpoint, 2 checkpoint and stop
        self.reason = ""

    def request(self, reason: str, stop: bool) -> None:
        self.level = max(self.level, 2 if stop else 1)
        self.reason = reason

    def clear(self) -> None:
        self.level = 0
        self.reason = ""


# -- one fold --------------------------------------------------------------------------------

@dataclass
class FoldProgress:
    """Where a fold's training stands (all plain values: safe for ``weights_only``)."""

    epoch: int = 0  # the epoch in progress (or next to start)
    batch: int = 0  # micro-batches of that epoch already done
    loss_sum: float = 0.0  # their summed loss (the epoch's mean survives a resume)
    step: int = 0  # optimizer steps so far
    best: float = -math.inf  # best monitored value, sign-adjusted (higher is better)
    best_epoch: int = -1
    bad_epochs: int = 0
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
