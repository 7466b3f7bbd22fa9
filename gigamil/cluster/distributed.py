"""Rank, world size and device from torchrun, SLURM or submitit: one function for all.

Model code never imports this module; the CLI and the pipelines do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gigamil.errors import UsageError

__all__ = ["DistEnv", "dist_env", "process_group", "backend_for"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """The process's place in a job: torchrun's variables, else SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or submitit's exported environment
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)))
    return DistEnv()


def backend_for(device: torch.device) -> str:
    """NCCL for GPUs, gloo for CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    """Initialise ``torch.distributed`` for ``env`` (no-op for a single process).

    The rendezvous address comes from ``MASTER_ADDR``/``MASTER_PORT`` (torchrun and
    submitit set them). Ends with a barrier before the group is destroyed, which
    stops the occasional gloo abort at exit.
    """
    if env.world_size <= 1:
        yield
        return
    import torch.distributed as dist

    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UsageError(f"rank {env.rank} of {env.world_size} has no MASTER_ADDR/MASTER_PORT",
                         "start multi-rank runs with torchrun, srun via submitit, or "
                         "`gigamil train --executor slurm`")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), rank=env.rank, world_size=env.world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
