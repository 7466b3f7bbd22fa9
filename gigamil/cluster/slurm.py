"""SLURM through submitit: options → submitit executors, the job registry, the training job.

    executor = make_executor(opts, out / "jobs", "gigamil-extract")   # submitit AutoExecutor
    record_jobs(out, "extract", jobs, opts)                           # for `gigamil jobs`
    report = job_report("runs/crc1")          # pending/running/requeued/done/failed + logs

The stages and how they split into jobs are in :mod:`gigamil.cluster.stages`; the executor
that submits them is :class:`gigamil.cluster.executor.SlurmExecutor`. Submitted jobs are
recorded in ``<out>/jobs/jobs.json`` beside submitit's logs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gigamil.cluster.executor import ClusterOptions
from gigamil.errors import GigamilError, UsageError
from gigamil.io import write_json
from gigamil.layout import JOBS

if TYPE_CHECKING:
    from gigamil.mil.train_config import TrainConfig

__all__ = ["make_executor", "record_jobs", "TrainJob", "job_report", "JobStatus", "wait_jobs",
           "active_jobs", "JOBS_DIR"]

log = logging.getLogger(__name__)

JOBS_DIR = JOBS


def make_executor(opts: ClusterOptions, folder: Path, name: str,
                  after: Sequence[str] = ()) -> Any:
    """A submitit executor for SLURM built from ``opts`` (logs and pickles in ``folder``).

    Its jobs carry ``--requeue``: after a node failure SLURM puts them back in the queue
    (onto the nodes left) instead of failing them, on clusters whose ``JobRequeue=0`` too,
    and every job resumes from disk. With ``after``, they start once those jobs have all
    completed (``--dependency=afterok``) and are cancelled if one fails."""
    import submitit

    # on the submitting side, submitit's sacct warnings (accounting is often off) are noise
    logging.getLogger("submitit").setLevel(logging.ERROR)
    if shutil.which("sbatch") is None:
        raise UsageError("--executor slurm needs sbatch on the PATH",
                         "run this on a cluster login node, or use --executor local")
    from gigamil.cluster.slurm_limits import check_request

    check_request(opts)  # a job that could never start is refused here, not left pending
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
    params: dict[str, Any] = {
        "name": name, "timeout_min": opts.time_minutes(), "nodes": opts.nodes,
        "tasks_per_node": opts.tasks(), "cpus_per_task": opts.cpus_per_task,
        "slurm_signal_delay_s": opts.signal_delay,
        "slurm_array_parallelism": opts.array_parallelism,
    }
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    optional = {"slurm_partition": opts.partition, "slurm_account": opts.account,
                "slurm_qos": opts.qos, "slurm_constraint": opts.constraint,
                "slurm_mem": opts.mem}
    params.update({k: v for k, v in optional.items() if v is not None})
    if opts.exclusive:
        params["slurm_exclusive"] = True
    extra: dict[str, Any] = {"requeue": True}
    if after:
        extra.update({"dependency": "afterok:" + ":".join(after), "kill_on_invalid_dep": "yes"})
    params["slurm_additional_parameters"] = extra
    executor.update_parameters(**params)
    return executor


# -- the job registry ------------------------------------------------------------------------

def record_jobs(out: Path, kind: str, jobs: Sequence[Any], opts: ClusterOptions,
                extra: dict[str, Any] | None = None) -> None:
    """Append ``jobs`` to ``<out>/jobs/jobs.json`` (what ``gigamil jobs`` reads)."""
    path = out / JOBS_DIR / "jobs.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    for job in jobs:
        entries.append({"job_id": str(job.job_id), "kind": kind, "submitted": now,
                        "folder": str(Path(job.paths.folder).resolve()),
                        "options": dataclasses.asdict(opts), **(extra or {})})
    write_json(path, entries)


def _scontrol(job_id: str) -> dict[str, str]:
    try:
        res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    fields: dict[str, str] = {}
    for token in res.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def _result_state(folder: Path, job_id: str, started: str = "") -> tuple[str, str] | None:
    """("done"|"failed", message) from submitit's result pickle of task 0, if written by the
    current run of the job (one left by a run before a requeue does not count)."""
    import pickle

    path = folder / f"{job_id}_0_result.pkl"
    if not path.exists():
        return None
    try:
        if started and path.stat().st_mtime < dt.datetime.fromisoformat(started).timestamp():
            return None
    except ValueError:
        pass
    try:
        with open(path, "rb") as fh:
            outcome, value = pickle.load(fh)  # our own job's result, written by submitit
    except Exception as exc:  # noqa: BLE001
        return "failed", f"unreadable result: {exc}"
    if outcome == "success":
        return "done", ""
    return "failed", _error_line(str(value)) if value else "failed"


_STATES = {"PENDING": "pending", "CONFIGURING": "pending", "RUNNING": "running",
           "COMPLETING": "running", "REQUEUED": "requeued", "REQUEUE_HOLD": "requeued",
           "REQUEUE_FED": "requeued", "COMPLETED": "done", "FAILED": "failed",
           "CANCELLED": "failed", "TIMEOUT": "failed", "NODE_FAIL": "failed",
           "OUT_OF_MEMORY": "failed", "PREEMPTED": "requeued", "BOOT_FAIL": "failed"}


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """One submitted job, as ``gigamil jobs`` shows it."""

    job_id: str
    kind: str
    state: str  # pending, running, requeued, done, failed or unknown
    restarts: int
    message: str
    stdout: str
    stderr: str
    cancel: str  # the scancel line
    slurm_state: str = ""  # SLURM's own (CANCELLED, TIMEOUT, …), while it still knows the job
    reason: str = ""  # SLURM's reason (Dependency, DependencyNeverSatisfied, Resources, …)
    started: str = ""  # StartTime of a job that started, as SLURM gives it (local time)

    @property
    def active(self) -> bool:
        return self.state in ("pending", "running", "requeued")

    @property
    def log(self) -> str:
        """The log worth reading: stderr of a failed job, else stdout."""
        return self.stderr if self.state == "failed" else self.stdout


def job_report(out: str | os.PathLike[str], latest: bool = False,
               kind: str | None = None) -> list[JobStatus]:
    """Each job behind ``out`` (of one ``kind`` of stage; only the last submission's with
    ``latest``): state, restarts, log paths, and how to cancel it."""
    path = Path(out) / JOBS_DIR / "jobs.json"
    if not path.exists():
        raise UsageError(f"no jobs were submitted for {out}",
                         "jobs appear here after a command with --executor slurm")
    rows = []
    entries = [e for e in json.loads(path.read_text()) if kind is None or e["kind"] == kind]
    if latest and entries:
        entries = [e for e in entries if e["submitted"] == entries[-1]["submitted"]]
    for entry in entries:
        job_id = entry["job_id"]
        folder = Path(entry["folder"]).parent / job_id
        info = _scontrol(job_id)
        state = _STATES.get(info.get("JobState", ""), "")
        message = ""
        result = _result_state(folder, job_id, info.get("StartTime", ""))
        if result and state not in ("pending", "requeued"):
            state, message = result
        if not state:
            state = "unknown"
        if state == "failed" and not message and info:
            message = f"{info.get('JobState')} exit {info.get('ExitCode', '?')}"
        reason = info.get("Reason", "None")
        if state == "pending" and reason == "None" and \
                info.get("Dependency", "(null)") not in ("(null)", ""):
            reason = "Dependency"  # queued behind a job the scheduler has not looked at yet
        if state == "pending" and reason != "None":
            message = f"pending: {reason}"  # Resources, Priority, PartitionConfig…
        rows.append(JobStatus(
            job_id=job_id, kind=entry["kind"], state=state,
            restarts=int(info.get("Restarts", 0) or 0), message=message,
            stdout=str(folder / f"{job_id}_0_log.out"),
            stderr=str(folder / f"{job_id}_0_log.err"),
            cancel=f"scancel {job_id.split('_')[0]}", slurm_state=info.get("JobState", ""),
            reason=reason,
            started=info.get("StartTime", "") if info.get("StartTime") != "Unknown" else ""))
    return rows


_ACTIVE = "PENDING,CONFIGURING,RUNNING,COMPLETING,REQUEUED,REQUEUE_HOLD,REQUEUE_FED,SUSPENDED"


def active_jobs(job_ids: Sequence[str]) -> set[str] | None:
    """Which of ``job_ids`` (array ids as ``123`` or ``123_4``) SLURM still has pending or
    running, as squeue names them; None if squeue could not be asked."""
    if not job_ids:
        return set()
    try:
        res = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-t", _ACTIVE,
                              "-o", "%i"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:  # every id unknown (gone long ago) is no active job
        return set() if "Invalid job id" in res.stderr else None
    return {line.strip() for line in res.stdout.splitlines() if line.strip()}


# -- training --------------------------------------------------------------------------------

class TrainJob:
    """A training run as a submitit ``Checkpointable``: one task per GPU (or CPU rank).

    Every start (the first, after a requeue, after a node failure) resumes from the
    checkpoints on disk. On USR2 (time limit near, or pre-emption) the loop writes a
    checkpoint at the next step boundary, then submitit requeues the job.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> dict[str, Any]:
        import submitit

        from gigamil.cluster.distributed import DistEnv
        from gigamil.cluster.launch import run_log, run_training
        from gigamil.cluster.resources import configure_threads
        from gigamil.errors import TrainingInterrupted

        configure_threads()  # this rank's --cpus-per-task, not every core of the node
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            dist = submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False)
            denv = DistEnv(dist.rank, dist.world_size, dist.local_rank)
        else:
            denv = DistEnv()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if denv.is_main:
            with run_log(Path(self.cfg.out), True):
                log.warning("SLURM job %s start %d (SLURM_RESTART_COUNT=%d): resuming from the "
                            "checkpoints on disk", env.job_id, restarts + 1, restarts)
        submitit_usr2 = signal.getsignal(signal.SIGUSR2)
        try:
            return run_training(self.cfg, resume=True, env=denv, preempt_signal=True)
        except TrainingInterrupted as exc:
            if "SIGUSR2" not in str(exc) and "another rank" not in str(exc):
                raise
            if denv.is_main:
                with run_log(Path(self.cfg.out), True):
                    log.warning("pre-emption or time limit (USR2): checkpoint written, "
                                "requeueing job %s", env.job_id)
            if callable(submitit_usr2):
                submitit_usr2(signal.SIGUSR2, None)  # submitit: checkpoint() and requeue
            time.sleep(120)  # other ranks: wait to be stopped by the requeue
            raise

    def checkpoint(self) -> Any:
        """submitit calls this on USR2: resubmit the same job (it resumes from disk)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg))


def _error_line(text: str) -> str:
    """The exception line of a remote traceback (``UsageError: …``), else its last line."""
    import re

    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    found = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupted): ", ln)]
    return found[-1] if found else (lines[-1] if lines else "failed")


def _ended_without_result(job: Any, seen: dict[str, int]) -> str | None:
    """Why a job that submitit does not call done will never be (cancelled, failed, or
    gone from the queue without a result), once seen twice in a row; else None. Reads
    ``scontrol``, so it works where SLURM accounting (sacct) is off."""
    job_id = str(job.job_id)
    info = _scontrol(job_id)
    state = info.get("JobState", "")
    if not info:
        reason = "vanished from the queue without a result"
    elif _STATES.get(state) in ("failed", "done"):
        reason = f"{state} ({info.get('Reason', 'None')}, exit {info.get('ExitCode', '?')})"
    else:
        seen.pop(job_id, None)
        return None
    seen[job_id] = seen.get(job_id, 0) + 1
    return reason if seen[job_id] >= 2 else None  # the result pickle may still be on its way


def wait_jobs(jobs: Sequence[Any], on_poll: Callable[[list[str]], None] | None = None,
              poll: float = 2.0) -> list[Any]:
    """Block until every job is finished, cancelled, failed or gone; the results (a job
    that failed or ended without a result raises GigamilError naming each one's state)."""
    seen: dict[str, int] = {}
    ended: dict[str, str] = {}
    while True:
        done = [job.done() for job in jobs]
        for job, d in zip(jobs, done):
            if not d and str(job.job_id) not in ended:
                why = _ended_without_result(job, seen)
                if why:
                    ended[str(job.job_id)] = why
        if on_poll is not None:
            on_poll([("done" if d else "ended" if str(j.job_id) in ended else "waiting")
                     for j, d in zip(jobs, done)])
        if all(d or str(j.job_id) in ended for j, d in zip(jobs, done)):
            break
        time.sleep(poll)
    results, failures = [], []
    for job in jobs:
        if str(job.job_id) in ended and not job.done():
            failures.append(f"job {job.job_id}: {ended[str(job.job_id)]} "
                            f"(log: {job.paths.stderr})")
            continue
        try:
            results.append(job.results()[0])  # task 0 (rank 0) answers for the job
        except Exception as exc:  # noqa: BLE001 - submitit re-raises the job's error
            failures.append(f"job {job.job_id}: {_error_line(str(exc))} "
                            f"(log: {job.paths.stderr})")
    if failures:
        raise GigamilError("; ".join(failures), "see the logs; `gigamil jobs OUT` lists them")
    return results
