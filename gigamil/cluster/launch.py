"""Run training in this process (or in each rank of a torchrun/SLURM job).

    summary = run_training(cfg, resume=True)

Sets up what the training loop deliberately leaves out: the rank and device
(from :func:`gigamil.cluster.distributed.dist_env`), the process group (gloo on
CPU, NCCL on GPU), one :class:`CheckpointManager` per fold, the run log, and
signal handlers: SIGTERM checkpoints at the next step boundary and stops;
SIGUSR1 checkpoints and goes on.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from gigamil.cluster.checkpoint import CheckpointManager
from gigamil.cluster.distributed import DistEnv, dist_env, process_group
from gigamil.io import ensure_writable
from gigamil.layout import RunDir
from gigamil.mil.fold import StopRequest
from gigamil.mil.train import train
from gigamil.mil.train_config import TrainConfig, default_device

__all__ = ["run_training", "stop_on_signals", "run_log"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest, preempt: bool = False) -> Iterator[None]:
    """SIGTERM → checkpoint and stop; SIGUSR1 → checkpoint and continue; with ``preempt``
    also SIGUSR2 (SLURM's warning before a time limit or pre-emption) → checkpoint and stop.
    The previous handlers come back afterwards."""
    actions = {signal.SIGTERM: True, signal.SIGUSR1: False}
    if preempt:
        actions[signal.SIGUSR2] = True
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        stop.request(signal.Signals(signum).name, actions[signal.Signals(signum)])

    for sig in actions:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def run_log(out: Path, enabled: bool = True) -> Iterator[None]:
    """Append gigamil's log records (warnings and up) to ``<run>/train.log`` on the main rank."""
    if not enabled:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(RunDir(out).log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("gigamil")
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(min(root.getEffectiveLevel(), logging.INFO))
    for h in root.handlers:  # the console keeps its own verbosity
        if h is not handler and h.level == logging.NOTSET:
            h.setLevel(old_level or logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def run_training(cfg: TrainConfig, resume: bool = False, env: DistEnv | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 preempt_signal: bool = False) -> dict[str, Any]:
    """Train ``cfg`` as this process's rank; returns the run summary.

    ``preempt_signal``: also stop on SIGUSR2 (inside a SLURM job, see ``cluster.slurm``).
    """
    env = env or dist_env()
    device = default_device(cfg.device, env.local_rank)
    stop = StopRequest()
    out = Path(cfg.out)

    def checkpoints(fold: int) -> CheckpointManager:
        return CheckpointManager(RunDir(out).checkpoints(fold), keep=cfg.keep_last,
                                 is_main=env.is_main)

    if env.is_main:
        ensure_writable(out)  # a read-only or full --out: one error, before any work
    with run_log(out, env.is_main), stop_on_signals(stop, preempt_signal), \
            process_group(env, device):
        log.info("training %s on %s, rank %d of %d, %d torch threads%s", cfg.model, device,
                 env.rank, env.world_size, torch.get_num_threads(), " (resume)" if resume else "")
        return train(cfg, checkpoints, device, env.rank, env.world_size, resume, stop,
                     on_epoch if env.is_main else None)
