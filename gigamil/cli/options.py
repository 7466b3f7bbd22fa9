"""Options shared by several commands (one definition, the same help everywhere)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from gigamil.wsi.qc import QCConfig


class BackendChoice(str, Enum):
    auto = "auto"
    openslide = "openslide"
    cucim = "cucim"


Mpp = Annotated[
    str, typer.Option(help="Target µm per pixel (0.5 ≈ 20x, 0.25 ≈ 40x); a list like "
                      "0.5,1.0,2.0 stores aligned grids at several scales.")
]
PatchSize = Annotated[int, typer.Option(min=8, max=8192, help="Patch side in px at --mpp.")]
Overlap = Annotated[int, typer.Option(min=0, help="Px shared by neighbouring patches.")]
MinTissue = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="Minimum tissue fraction to keep a patch.")
]
Backend = Annotated[BackendChoice, typer.Option(help="Slide reader.")]
MppOverride = Annotated[
    float | None, typer.Option(help="Level-0 µm/px for slides that do not record it "
                               "(a recorded value is never replaced).")
]
AllowUpsample = Annotated[bool, typer.Option(help="Allow --mpp finer than the scan (interpolates).")]
TissueMpp = Annotated[float, typer.Option(min=1.0, help="µm/px of the tissue-detection thumbnail.")]
QcBackground = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="QC: reject a patch with more glass than this (1 = off).")
]
QcPen = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="QC: reject a patch with more marker ink than this (1 = off).")
]
QcBlur = Annotated[
    float, typer.Option(min=0.0, help="QC: reject a patch whose focus score (median Laplacian "
                        "variance of its 32-px blocks) is below this (0 = off).")
]


def parse_mpps(text: str) -> tuple[float, ...]:
    """``"0.5,1.0"`` → (0.5, 1.0)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"--mpp {text!r}: give numbers like 0.5 or 0.5,1.0,2.0") from None
    if not values or any(v <= 0 for v in values):
        raise typer.BadParameter(f"--mpp {text!r}: values must be positive")
    return values


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"3/16"`` → (3, 16): share 3 of 16 (0-based), for SLURM array tasks."""
    if not text:
        return None
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"--shard {text!r} is not k/n, e.g. 3/16") from None
    if n < 1 or not 0 <= k < n:
        raise typer.BadParameter(f"--shard {text!r}: need 0 <= k < n")
    return k, n


def qc_config(background_max: float, pen_max: float, blur_min: float) -> QCConfig:
    """CLI thresholds → QCConfig (1, 1 and 0 switch the filters off)."""
    return QCConfig(
        background_max=None if background_max >= 1 else background_max,
        pen_max=None if pen_max >= 1 else pen_max,
        blur_min=None if blur_min <= 0 else blur_min,
    )


# -- where a command runs (the same options on extract, embed and train) ---------------------

class ExecutorChoice(str, Enum):
    local = "local"
    slurm = "slurm"


_SLURM = "SLURM (with --executor slurm)"
Executor = Annotated[ExecutorChoice, typer.Option(
    help="local: run here; slurm: submit jobs through submitit (arrays for extract/embed).",
    rich_help_panel=_SLURM)]
Partition = Annotated[str | None, typer.Option(help="Partition.", rich_help_panel=_SLURM)]
Account = Annotated[str | None, typer.Option(help="Account to charge.", rich_help_panel=_SLURM)]
Qos = Annotated[str | None, typer.Option(help="Quality of service.", rich_help_panel=_SLURM)]
Constraint = Annotated[str | None, typer.Option(help="Node features, e.g. a100.",
                                                rich_help_panel=_SLURM)]
Time = Annotated[str, typer.Option(help="Time limit per job, HH:MM:SS or D-HH:MM:SS.",
                                   rich_help_panel=_SLURM)]
CpusPerTask = Annotated[int, typer.Option(min=1, help="CPUs per task.", rich_help_panel=_SLURM)]
Mem = Annotated[str | None, typer.Option(help="Memory per node, e.g. 64G (0 = all).",
                                         rich_help_panel=_SLURM)]
Nodes = Annotated[int, typer.Option(min=1, help="Nodes per job (multi-node DDP for train).",
                                    rich_help_panel=_SLURM)]
GpusPerNode = Annotated[int, typer.Option(min=0, help="GPUs per node (one rank each).",
                                          rich_help_panel=_SLURM)]
TasksPerNode = Annotated[int | None, typer.Option(
    min=1, help="Ranks per node (default: one per GPU, or 1); e.g. 2 for CPU DDP.",
    rich_help_panel=_SLURM)]
Exclusive = Annotated[bool, typer.Option(help="Whole nodes only.", rich_help_panel=_SLURM)]
SignalDelay = Annotated[int, typer.Option(
    min=0, help="Seconds before the time limit that USR2 asks for a checkpoint and requeue.",
    rich_help_panel=_SLURM)]
ArrayParallelism = Annotated[int, typer.Option(min=1, help="Array tasks running at once.",
                                               rich_help_panel=_SLURM)]
SlidesPerJob = Annotated[int, typer.Option(min=1, help="Slides per array task.",
                                           rich_help_panel=_SLURM)]
Wait = Annotated[bool, typer.Option(help="Block until the jobs finish (else print job ids "
                                    "and return).", rich_help_panel=_SLURM)]
