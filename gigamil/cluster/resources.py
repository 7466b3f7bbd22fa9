"""How many cores this process may use, and the one place that sizes its thread pools.

    n = configure_threads()          # inside a SLURM job: --cpus-per-task; else the affinity mask
    configure_threads(2)             # a Ray worker or pool process with a share of the cores

Torch, OpenMP/MKL/OpenBLAS (through their environment variables, which child processes such as
DataLoader workers inherit) and OpenCV all get the same count. Without this a job started
with ``sbatch -c 1`` runs torch with one thread per core of the node, and 8 ranks on one node
oversubscribe it 8 times; float32 results then also depend on the node's core count.
"""

from __future__ import annotations

import os
import sys

__all__ = ["allocated_cpus", "configure_threads", "THREAD_ENV_VARS"]

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def allocated_cpus() -> int:
    """The cores this process was given: SLURM's per-task CPUs inside a job step, else the
    CPUs SLURM put on this node divided among its tasks, else the affinity mask."""
    env = os.environ
    cores = _affinity()
    per_task = _int(env.get("SLURM_CPUS_PER_TASK"))
    if per_task is None and env.get("SLURM_JOB_ID"):
        on_node = _int(env.get("SLURM_CPUS_ON_NODE"))
        tasks = _int((env.get("SLURM_NTASKS_PER_NODE") or "").split("(")[0]) or \
            _int((env.get("SLURM_TASKS_PER_NODE") or "").split("(")[0]) or 1
        per_task = on_node // tasks if on_node else None
    if per_task is None:
        return max(1, cores)
    return max(1, min(per_task, cores))


def configure_threads(threads: int | None = None, export: bool = True) -> int:
    """Size torch, OpenMP and OpenCV to ``threads`` (default: :func:`allocated_cpus`).

    Returns the count. Torch is sized only if it is already imported (a process that never
    needs it does not pay for the import); if it is imported later it reads
    ``OMP_NUM_THREADS``. ``export`` also sets ``OMP_NUM_THREADS`` and friends for this
    process's children: right for a job or a worker process, which own their process;
    wrong inside a caller's process (a library call), whose environment is not ours.
    """
    n = max(1, int(threads) if threads else allocated_cpus())
    if export:
        for var in THREAD_ENV_VARS:
            os.environ[var] = str(n)
    if "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:  # opencv is a dependency; tolerate a broken wheel here
        pass
    return n
