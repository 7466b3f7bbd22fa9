"""SLURM through submitit: the one place that turns cluster options into jobs.

    opts = ClusterOptions(executor="slurm", partition="a100", gpus_per_node=8, nodes=4)
    jobs = submit_train(cfg, opts)                     # one multi-node DDP job
    jobs = submit_extract(slides, out, cfg, opts)      # an array over chunks of slides
    report = job_report("runs/crc1")                   # pending/running/done/failed + logs

Every unit of work is idempotent (extraction and embedding skip finished slides,
training resumes from its checkpoints), so a resubmitted array or a requeued job
does only what is missing. Submitted jobs are recorded in ``<out>/jobs/jobs.json``
beside submitit's logs, for ``gigamil jobs``.
"""

from __future__ import annotations

import csv
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gigamil.errors import GigamilError, UsageError
from gigamil.io import write_csv, write_json

__all__ = [
    "ClusterOptions",
    "make_executor",
    "submit_extract",
    "submit_embed",
    "submit_train",
    "TrainJob",
    "job_report",
    "merge_extract_manifests",
    "JOBS_DIR",
]

log = logging.getLogger(__name__)

JOBS_DIR = "jobs"


@dataclass
class ClusterOptions:
    """Where and how long commands run; every command takes the same options."""

    executor: str = "local"  # local: in this process; slurm: submitit jobs
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time: str = "02:00:00"
    cpus_per_task: int = 4
    mem: str | None = None  # e.g. 64G; "0" = all of the node's memory
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU (or 1)
    exclusive: bool = False
    signal_delay: int = 120  # seconds before the time limit that USR2 arrives
    array_parallelism: int = 32
    slides_per_job: int = 20
    wait: bool = False

    def __post_init__(self) -> None:
        if self.executor not in ("local", "slurm"):
            raise UsageError(f"--executor {self.executor!r} is not local or slurm")
        self.time_minutes()  # validates

    @property
    def is_slurm(self) -> bool:
        return self.executor == "slurm"

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


def make_executor(opts: ClusterOptions, folder: Path, name: str) -> Any:
    """A submitit executor for SLURM built from ``opts`` (logs and pickles in ``folder``)."""
    import submitit

    # on the submitting side, submitit's sacct warnings (accounting is often off) are noise
    logging.getLogger("submitit").setLevel(logging.ERROR)
    if shutil.which("sbatch") is None:
        raise UsageError("--executor slurm needs sbatch on the PATH",
                         "run this on a cluster login node, or use --executor local")
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
    executor.update_parameters(**params)
    return executor


# -- the job registry ------------------------------------------------------------------------

def _record(out: Path, kind: str, jobs: Sequence[Any], opts: ClusterOptions,
            extra: dict[str, Any] | None = None) -> None:
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


def job_report(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Each job behind ``out``: state, restarts, log paths, and how to cancel it."""
    path = Path(out) / JOBS_DIR / "jobs.json"
    if not path.exists():
        raise UsageError(f"no jobs were submitted for {out}",
                         "jobs appear here after a command with --executor slurm")
    rows = []
    for entry in json.loads(path.read_text()):
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
        rows.append({
            "job_id": job_id, "kind": entry["kind"], "state": state,
            "restarts": int(info.get("Restarts", 0) or 0), "message": message,
            "stdout": str(folder / f"{job_id}_0_log.out"),
            "stderr": str(folder / f"{job_id}_0_log.err"),
            "cancel": f"scancel {job_id.split('_')[0]}",
        })
    return rows


# -- extract and embed arrays ----------------------------------------------------------------

def _extract_shard(inputs: list[str], out: str, cfg: Any, workers: int, overwrite: bool,
                   shard: tuple[int, int]) -> dict[str, int]:
    from gigamil.wsi.extract import extract_slides

    results = extract_slides(inputs, out, cfg, workers=workers, overwrite=overwrite, shard=shard)
    return {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}


def merge_extract_manifests(out: str | os.PathLike[str]) -> Path | None:
    """Join the array tasks' ``extract.shard*.csv`` into ``extract.csv`` (then remove them)."""
    from gigamil.wsi.extract import MANIFEST_FIELDS

    out = Path(out)
    parts = sorted(out.glob("extract.shard*.csv"))
    if not parts:
        return None
    rows = []
    for p in parts:
        with open(p, newline="") as fh:
            rows.extend(csv.DictReader(fh))
    rows.sort(key=lambda r: r["slide_id"])
    write_csv(out / "extract.csv", rows, MANIFEST_FIELDS)
    for p in parts:
        p.unlink()
    return out / "extract.csv"


def submit_extract(inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                   cfg: Any, opts: ClusterOptions, overwrite: bool = False) -> list[Any]:
    """An array job: about ``opts.slides_per_job`` slides per task (task k takes shard k/n)."""
    from gigamil.wsi.extract import discover_slides

    out = Path(out)
    n_slides = len(discover_slides(inputs))
    if not n_slides:
        raise UsageError("no slides found", "check the slide directory")
    n = -(-n_slides // max(1, opts.slides_per_job))
    executor = make_executor(opts, out / JOBS_DIR, "gigamil-extract")
    out.mkdir(parents=True, exist_ok=True)
    sources = [str(Path(p).resolve()) for p in inputs]
    with executor.batch():
        jobs = [executor.submit(_extract_shard, sources, str(out.resolve()), cfg,
                                opts.cpus_per_task, overwrite, (k, n)) for k in range(n)]
    _record(out, "extract", jobs, opts, {"slides": n_slides})
    return jobs


def _embed_shard(data: str, cfg: Any, out: str | None) -> dict[str, int]:
    from gigamil.mil.embed import embed_stores

    results = embed_stores(data, cfg, out)
    return {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}


def submit_embed(data: str | os.PathLike[str], cfg: Any, opts: ClusterOptions,
                 out: str | os.PathLike[str] | None = None) -> list[Any]:
    """An array job: task ``k`` of ``n`` embeds shard ``k/n`` of the stores."""
    data = Path(data)
    patch_dir = data / "patches" if (data / "patches").is_dir() else data
    n_stores = len(list(patch_dir.glob("*.lmdb")))
    if not n_stores:
        raise UsageError(f"no patch stores in {patch_dir}", "run `gigamil extract` first")
    n = max(1, -(-n_stores // max(1, opts.slides_per_job)))
    target = Path(out or data)
    executor = make_executor(opts, target / JOBS_DIR, "gigamil-embed")
    with executor.batch():
        jobs = [executor.submit(_embed_shard, str(data.resolve()),
                                dataclasses.replace(cfg, shard=(k, n)),
                                str(Path(out).resolve()) if out else None)
                for k in range(n)]
    _record(target, "embed", jobs, opts, {"stores": n_stores})
    return jobs


# -- training --------------------------------------------------------------------------------

class TrainJob:
    """A training run as a submitit ``Checkpointable``: one task per GPU (or CPU rank).

    Every start (the first, after a requeue, after a node failure) resumes from the
    checkpoints on disk. On USR2 (time limit near, or pre-emption) the loop writes a
    checkpoint at the next step boundary, then submitit requeues the job.
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def __call__(self) -> dict[str, Any]:
        import submitit

        from gigamil.cluster.distributed import DistEnv
        from gigamil.cluster.launch import run_log, run_training
        from gigamil.mil.train import TrainingInterrupted

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


def submit_train(cfg: Any, opts: ClusterOptions) -> list[Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    executor = make_executor(opts, out / JOBS_DIR, f"gigamil-train-{out.name}")
    job = executor.submit(TrainJob(cfg))
    _record(out, "train", [job], opts)
    return [job]


def _error_line(text: str) -> str:
    """The exception line of a remote traceback (``UsageError: …``), else its last line."""
    import re

    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    found = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupted): ", ln)]
    return found[-1] if found else (lines[-1] if lines else "failed")


def wait_jobs(jobs: Sequence[Any], on_poll: Callable[[list[str]], None] | None = None,
              poll: float = 2.0) -> list[Any]:
    """Block until every job is finished; the results (a failed job raises GigamilError)."""
    while True:
        done = [job.done() for job in jobs]
        if on_poll is not None:
            on_poll([("done" if d else "waiting") for d in done])
        if all(done):
            break
        time.sleep(poll)
    results, failures = [], []
    for job in jobs:
        try:
            results.append(job.results()[0])  # task 0 (rank 0) answers for the job
        except Exception as exc:  # noqa: BLE001 - submitit re-raises the job's error
            failures.append(f"job {job.job_id}: {_error_line(str(exc))} "
                            f"(log: {job.paths.stderr})")
    if failures:
        raise GigamilError("; ".join(failures), "see the logs; `gigamil jobs OUT` lists them")
    return results
