"""Where a stage runs: one interface, implementations picked by name (like submitit's).

    opts = ClusterOptions(executor="slurm", partition="a100", gpus_per_node=8)
    outcome = run_stage(ExtractStage(...), opts)     # or executor="local" / "debug"
    outcome.results                                  # one result per job; None if not waited

A :class:`Stage` (extract, embed, train; see :mod:`gigamil.cluster.stages`) says what its
work is: how many jobs it splits into on a scheduler, the picklable callable of one job
(shard ``k`` of ``n``), and what to do with the results. An :class:`Executor` decides
where those callables run:

- ``local``: here, with the stage's own process pool or DataLoader workers;
- ``debug``: here, in this very process, through submitit's ``DebugExecutor`` (a pdb-able
  run with no worker processes: what a job on a node would execute);
- ``slurm``: submitit jobs (an array for extract/embed, one multi-rank job for train),
  recorded in ``<out>/jobs/jobs.json`` for ``gigamil jobs``.

A new executor is one class registered here with ``@EXECUTORS.register("name")``: the CLI's
``--executor`` choices come from this registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from gigamil.config import option
from gigamil.errors import UsageError
from gigamil.registry import Registry

__all__ = ["ClusterOptions", "Stage", "Outcome", "Executor", "EXECUTORS", "run_stage",
           "LocalExecutor", "DebugExecutor", "SlurmExecutor", "DEFAULT_TIME"]

R = TypeVar("R")

#: Default ``--time`` of each stage's jobs.
DEFAULT_TIME = {"extract": "02:00:00", "embed": "04:00:00", "train": "24:00:00",
                "infer": "04:00:00"}


@dataclass
class ClusterOptions:
    """Where and how long a command runs; every command that submits takes these options
    (the CLI derives its ``--partition``, ``--time``, … from these fields)."""

    executor: str = option("local", "local: run here; debug: run here in-process through "
                         "submitit's DebugExecutor; slurm: submit jobs through submitit "
                         "(arrays for extract/embed).", choices="executors")
    partition: str | None = option(None, "Partition.")
    account: str | None = option(None, "Account to charge.")
    qos: str | None = option(None, "Quality of service.")
    constraint: str | None = option(None, "Node features, e.g. a100.")
    time: str = option("02:00:00", "Time limit per job, HH:MM:SS or D-HH:MM:SS.")
    cpus_per_task: int = option(8, "CPUs per task (the job sizes its threads to them).", min=1)
    mem: str | None = option(None, "Memory per node, e.g. 64G (0 = all).")
    nodes: int = option(1, "Nodes per job (multi-node DDP for train).", min=1)
    gpus_per_node: int = option(0, "GPUs per node (one rank each).", min=0)
    tasks_per_node: int | None = option(None, "Ranks per node (default: one per GPU, or 1); "
                                      "e.g. 2 for CPU DDP.", min=1)
    exclusive: bool = option(False, "Whole nodes only.")
    signal_delay: int = option(120, "Seconds before the time limit that USR2 asks for a "
                             "checkpoint and requeue.", min=0)
    array_parallelism: int = option(32, "Array tasks running at once.", min=1)
    slides_per_job: int = option(20, "Slides per array task.", min=1)
    wait: bool = option(False, "Block until the jobs finish (else print job ids and return).")

    def __post_init__(self) -> None:
        self.executor = str(getattr(self.executor, "value", self.executor))
        if self.executor not in EXECUTORS:
            raise UsageError(f"--executor {self.executor!r} is not "
                             f"{' or '.join(EXECUTORS.ordered())}",
                             "pick one of those executors")
        self.time_minutes()  # validates

    @property
    def submits(self) -> bool:
        """True when the work leaves this process for a scheduler (jobs to wait for)."""
        return EXECUTORS.get(self.executor).remote  # type: ignore[attr-defined]

    def time_minutes(self) -> int:
        """``D-HH:MM:SS``, ``HH:MM:SS``, ``MM:SS`` or minutes → minutes (rounded up)."""
        text = str(self.time)
        days, _, rest = text.rpartition("-")
        try:
            parts = [int(p) for p in rest.split(":")]
            d = int(days) if days else 0
        except ValueError:
            raise UsageError(f"--time {text!r} is not D-HH:MM:SS or HH:MM:SS",
                             "e.g. --time 02:00:00") from None
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts[-3:]
        return max(1, d * 1440 + h * 60 + m + (1 if s else 0))

    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


class Stage(ABC, Generic[R]):
    """A unit of the pipeline, defined once: its jobs and what to do with their results.

    ``job(shard, workers, here)`` returns a picklable callable (it is sent to SLURM as is);
    ``here`` is True when it runs in this process, where progress callbacks may be used.
    ``workers=0`` asks for no worker processes at all (the debug executor).
    """

    kind: ClassVar[str]
    #: Resources of the multi-rank job (train), else one task per job.
    multi_rank: ClassVar[bool] = False

    @property
    @abstractmethod
    def target(self) -> Path:
        """The output folder: ``jobs/`` and manifests go here."""

    def n_jobs(self, opts: ClusterOptions) -> int:
        """How many jobs (array tasks) the stage becomes on a scheduler."""
        return 1

    @property
    def local_shard(self) -> tuple[int, int] | None:
        """The share of the work a run in this process takes (``--shard``)."""
        return None

    @property
    def local_workers(self) -> int:
        """Worker processes for a run here."""
        return 1

    @abstractmethod
    def job(self, shard: tuple[int, int] | None, workers: int, here: bool) -> Callable[[], R]:
        """The work of shard ``k`` of ``n`` (None: all of it)."""

    def before_submit(self) -> None:  # noqa: B027 - optional hook
        """Before its jobs go to a scheduler (drop what a new submission supersedes)."""

    def finish(self, results: list[R]) -> None:  # noqa: B027 - optional hook
        """After every job is done (merge manifests, …)."""

    def record(self) -> dict[str, Any]:
        """What ``jobs.json`` notes about the submission."""
        return {}


@dataclass
class Outcome(Generic[R]):
    """What running a stage gave: one result per job (None: submitted, not waited for)."""

    results: list[R] | None
    jobs: list[Any] = field(default_factory=list)


class Executor(ABC):
    """Runs a stage's jobs somewhere."""

    remote: ClassVar[bool] = False

    def __init__(self, opts: ClusterOptions) -> None:
        self.opts = opts

    @abstractmethod
    def run(self, stage: Stage[R], on_submit: Callable[[list[Any]], None] | None = None,
            on_poll: Callable[[list[str]], None] | None = None) -> Outcome[R]:
        """Run (or submit) ``stage``; ``on_submit`` sees the scheduler's jobs, ``on_poll``
        their states while waiting."""


class _Executors(Registry[Executor]):
    def ordered(self) -> list[str]:
        """Names in registration order (local first)."""
        return list(self._entries)


EXECUTORS: _Executors = _Executors("executor")


@EXECUTORS.register("local")
class LocalExecutor(Executor):
    """In this process, with the stage's own worker processes."""

    def run(self, stage: Stage[R], on_submit: Callable[[list[Any]], None] | None = None,
            on_poll: Callable[[list[str]], None] | None = None) -> Outcome[R]:
        results = [stage.job(stage.local_shard, stage.local_workers, True)()]
        stage.finish(results)
        return Outcome(results)


@EXECUTORS.register("slurm")
class SlurmExecutor(Executor):
    """submitit jobs on SLURM: ``n_jobs`` array tasks, or one multi-rank job."""

    remote = True

    def run(self, stage: Stage[R], on_submit: Callable[[list[Any]], None] | None = None,
            on_poll: Callable[[list[str]], None] | None = None) -> Outcome[R]:
        from gigamil.cluster.slurm import wait_jobs

        jobs = self.submit(stage)
        if on_submit is not None:
            on_submit(jobs)
        if not self.opts.wait:
            return Outcome(None, jobs)
        results: list[R] = wait_jobs(jobs, on_poll=on_poll)
        stage.finish(results)
        return Outcome(results, jobs)

    def submit(self, stage: Stage[R], after: Sequence[str] = (), n_jobs: int | None = None,
               extra: dict[str, Any] | None = None) -> list[Any]:
        """Submit ``stage``'s jobs (``n_jobs`` array tasks, default ``stage.n_jobs``) and
        record them; with ``after``, they start only once those jobs have all completed
        (``--dependency=afterok``), and are cancelled if one of them fails."""
        from gigamil.cluster.slurm import make_executor, record_jobs

        n = n_jobs if n_jobs is not None else stage.n_jobs(self.opts)
        name = f"gigamil-{stage.kind}" + (f"-{stage.target.name}" if stage.multi_rank else "")
        executor = make_executor(self.opts, stage.target / "jobs", name, after)
        stage.target.mkdir(parents=True, exist_ok=True)
        stage.before_submit()
        with executor.batch():
            # array tasks always take share k of n (0-based, like SLURM_ARRAY_TASK_ID), even
            # when n is 1; a multi-rank job (train) is one piece of work
            jobs = [executor.submit(stage.job(None if stage.multi_rank else (k, n),
                                              self.opts.cpus_per_task, False))
                    for k in range(n)]
        record_jobs(stage.target, stage.kind, jobs, self.opts,
                    {**stage.record(), **({"after": list(after)} if after else {}),
                     **(extra or {})})
        return jobs


@EXECUTORS.register("debug")
class DebugExecutor(Executor):
    """In this process through submitit's ``DebugExecutor``: no worker processes, the job
    callable exactly as a node would run it (logs and pickles in ``<out>/jobs/debug``)."""

    def run(self, stage: Stage[R], on_submit: Callable[[list[Any]], None] | None = None,
            on_poll: Callable[[list[str]], None] | None = None) -> Outcome[R]:
        import sys

        import submitit

        folder = stage.target / "jobs" / "debug"
        executor = submitit.DebugExecutor(folder=str(folder))
        job = executor.submit(stage.job(stage.local_shard, 0, True))
        # at a terminal a failure opens pdb post-mortem (submitit's DebugJob); with no
        # terminal (a batch script, CI) the same submission runs without the debugger
        results: list[R] = [job.result() if sys.stdin.isatty() else job.submission().result()]
        stage.finish(results)
        return Outcome(results, [job])


def run_stage(stage: Stage[R], opts: ClusterOptions,
              on_submit: Callable[[list[Any]], None] | None = None,
              on_poll: Callable[[list[str]], None] | None = None) -> Outcome[R]:
    """Run ``stage`` with the executor that ``opts.executor`` names."""
    executor: Executor = EXECUTORS.create(opts.executor, opts=opts)
    return executor.run(stage, on_submit, on_poll)
