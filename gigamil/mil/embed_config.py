"""The options of ``gigamil embed`` and its per-slide results (no torch at import: the CLI
reads its defaults from here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from gigamil.errors import UsageError
from gigamil.mil.train_config import autocast_dtype, check_choice
from gigamil.wsi.extract_config import StainMethod

if TYPE_CHECKING:
    import torch

__all__ = ["Precision", "Scales", "EmbedConfig", "EmbedResult", "EMBED_FIELDS"]

#: ``auto``: bf16 on a GPU, fp32 on the CPU.
Precision = Literal["auto", "fp32", "bf16", "fp16"]
#: ``primary``: the store's first scale; ``all``: every scale, with the primary patches'
#: parents in each coarser one (for hierarchical models such as ``hier_abmil``).
Scales = Literal["primary", "all"]
EMBED_FIELDS = ["slide_id", "status", "n_patches", "n_bad", "seconds", "error"]


@dataclass(frozen=True)
class EmbedConfig:
    """Every option of ``gigamil embed``; saved beside the features."""

    encoder: str = "resnet50"
    weights: str | None = None
    batch_size: int = 256
    workers: int = 4
    precision: Precision = "auto"
    device: str = "auto"
    shard: tuple[int, int] | None = None  # (k, n), 0-based: SLURM array task k of n
    compile: bool = False
    overwrite: bool = False
    stain_norm: StainMethod | None = None  # fitted per slide on a sample of its patches
    stain_reference: str | None = None
    scales: Scales = "primary"  # of a multi-scale store
    rank: int = 0  # this process's place in a multi-process job (set by the caller,
    world_size: int = 1  # from torchrun/SLURM via gigamil.cluster.distributed)
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        check_choice("--scales", self.scales, Scales)
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise UsageError(f"--shard {self.shard[0]}/{self.shard[1]} is out of range",
                             "use k/n with 0 ≤ k < n (SLURM_ARRAY_TASK_ID/n), e.g. --shard 3/16")

    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            if not torch.cuda.is_available():
                return torch.device("cpu")
            return torch.device(f"cuda:{self.local_rank % torch.cuda.device_count()}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--device cuda but no GPU is visible", "use --device cpu")
        if self.device == "cuda":  # one GPU per rank
            return torch.device(f"cuda:{self.local_rank % torch.cuda.device_count()}")
        return torch.device(self.device)

    @property
    def manifest_part(self) -> str:
        """``""`` (embed.csv), or a part per shard/rank so parallel jobs never overwrite each
        other's manifest (``embed.shard3of16.rank1.csv``)."""
        parts = []
        if self.shard is not None:
            parts.append(f"shard{self.shard[0]}of{self.shard[1]}")
        if self.world_size > 1:
            parts.append(f"rank{self.rank}")
        return "".join(f".{p}" for p in parts)

    @property
    def manifest_name(self) -> str:
        """The file name of this process's manifest (see :meth:`FeatureDir.manifest`)."""
        from gigamil.layout import FeatureDir

        return FeatureDir("").manifest(self.manifest_part).name

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        return autocast_dtype(precision)


@dataclass
class EmbedResult:
    slide_id: str
    status: str
    n_patches: int = 0
    n_bad: int = 0
    seconds: float = 0.0
    error: str = ""

    def row(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seconds": round(self.seconds, 3)}


