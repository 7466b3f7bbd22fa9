"""Thread sizing from the allocation, and `gigamil jobs` on an 80-column terminal (no SLURM)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gigamil.cli.main import app
from gigamil.cluster.resources import THREAD_ENV_VARS, allocated_cpus, configure_threads

runner = CliRunner()
SLURM_VARS = ("SLURM_CPUS_PER_TASK", "SLURM_JOB_ID", "SLURM_CPUS_ON_NODE",
              "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


@pytest.fixture
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in SLURM_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_allocated_cpus_follows_slurm_then_affinity(no_slurm: pytest.MonkeyPatch) -> None:
    cores = len(os.sched_getaffinity(0))
    assert allocated_cpus() == cores
    no_slurm.setenv("SLURM_CPUS_PER_TASK", "1")
    assert allocated_cpus() == 1
    no_slurm.setenv("SLURM_CPUS_PER_TASK", "4096")  # never more than this process may use
    assert allocated_cpus() == cores
    no_slurm.delenv("SLURM_CPUS_PER_TASK")
    no_slurm.setenv("SLURM_JOB_ID", "7")  # no -c: the node's CPUs shared by its tasks
    no_slurm.setenv("SLURM_CPUS_ON_NODE", str(2 * cores))
    no_slurm.setenv("SLURM_TASKS_PER_NODE", "2(x3)")
    assert allocated_cpus() == cores


def test_a_job_with_one_cpu_runs_torch_and_openmp_with_one_thread() -> None:
    """What a SLURM job of `--cpus-per-task 1` sees, in a fresh process: torch (imported
    before or after), OpenMP's variables and OpenCV all get one thread."""
    code = ("import torch, cv2\nfrom gigamil.cluster.resources import configure_threads\n"
            "n = configure_threads()\nimport os\n"
            "print(n, torch.get_num_threads(), cv2.getNumThreads(), os.environ['OMP_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k not in (*SLURM_VARS, *THREAD_ENV_VARS)}
    env |= {"SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "1", "1", "1"]


def test_configure_threads_sets_what_it_returns(no_slurm: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    for var in THREAD_ENV_VARS:
        no_slurm.setenv(var, os.environ.get(var, ""))  # restored after the test
    try:
        assert configure_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert all(os.environ[v] == "1" for v in THREAD_ENV_VARS)
    finally:
        torch.set_num_threads(before)


def test_configure_threads_in_a_callers_process_exports_nothing(
        no_slurm: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    for var in THREAD_ENV_VARS:
        no_slurm.delenv(var, raising=False)
    try:
        assert configure_threads(1, export=False) == 1 and torch.get_num_threads() == 1
        assert not [v for v in THREAD_ENV_VARS if v in os.environ]
    finally:
        torch.set_num_threads(before)


def test_jobs_table_shows_state_and_whole_log_path_at_80_columns(tmp_path: Path) -> None:
    """A failed job on a login node without a terminal (80 columns): the state word and
    the log path must be readable whole, however deep the run directory is."""
    run = tmp_path / ("a-rather-long-project-folder-name" * 2) / "runs" / "crc-experiment-01"
    job_id = "4242"
    folder = run / "jobs" / job_id
    folder.mkdir(parents=True)
    with open(folder / f"{job_id}_0_result.pkl", "wb") as fh:
        pickle.dump(("error", "Traceback (most recent call last):\n  ...\n"
                     "gigamil.errors.UsageError: model option nonsense is unknown"), fh)
    (run / "jobs" / "jobs.json").write_text(json.dumps([{
        "job_id": job_id, "kind": "train", "submitted": "2026-12-01T00:00:00+00:00",
        "folder": str(run / "jobs" / "%j"), "options": {}}]))
    res = runner.invoke(app, ["jobs", str(run)])
    assert res.exit_code == 1, res.output
    assert "failed" in res.output.split()
    log_path = str(folder / f"{job_id}_0_log.err")
    assert len(log_path) > 80
    assert any(line.endswith(log_path) for line in res.output.splitlines()), res.output
