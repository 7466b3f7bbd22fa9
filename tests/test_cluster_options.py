"""Cluster options and sbatch templates (no SLURM needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gigamil.cli.main import app
from gigamil.cluster.executor import ClusterOptions
from gigamil.cluster.slurm import make_executor
from gigamil.cluster.templates import TEMPLATES, render_template
from gigamil.errors import UsageError

runner = CliRunner()


@pytest.mark.parametrize(("text", "minutes"), [("02:00:00", 120), ("1-00:00:00", 1440),
                                               ("90", 90), ("10:30", 11), ("00:00:05", 1)])
def test_time_limits(text: str, minutes: int) -> None:
    assert ClusterOptions(time=text).time_minutes() == minutes


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(UsageError, match="not D-HH:MM:SS"):
        ClusterOptions(time="two hours")
    with pytest.raises(UsageError, match="not local or slurm"):
        ClusterOptions(executor="k8s")


def test_no_sbatch_means_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(UsageError, match="needs sbatch"):
        make_executor(ClusterOptions(executor="slurm"), tmp_path, "x")


@pytest.mark.parametrize("kind", TEMPLATES)
def test_templates_render_quoted_and_parse(kind: str, tmp_path: Path) -> None:
    evil = "a b;rm -rf x $(touch y) `z`"
    opts = ClusterOptions(executor="slurm", partition="a100", account="lab", gpus_per_node=8,
                          nodes=4, mem="0", exclusive=True)
    text = render_template(kind, opts, slides=evil, data=evil, out=evil,
                           args=["--out", evil, "--mpp", "0.5"], n_tasks=16)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, text
    assert "'a b;rm -rf x $(touch y) `z`'" in text
    assert "#SBATCH --partition=a100" in text and "#SBATCH --exclusive" in text
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            assert evil not in line


def test_hostile_sbatch_values_are_refused() -> None:
    with pytest.raises(UsageError, match="plain SLURM value"):
        render_template("train", ClusterOptions(executor="slurm", qos="x\n#SBATCH -A y"), out="o")


def test_template_command_prints_a_script() -> None:
    res = runner.invoke(app, ["slurm", "template", "train", "--out", "runs/a b", "--nodes", "2",
                              "--gpus-per-node", "8", "--", "--features", "f", "--labels", "l.csv"])
    assert res.exit_code == 0, res.output
    assert "#SBATCH --ntasks-per-node=8" in res.output and "'runs/a b'" in res.output
    assert "train --out 'runs/a b' --features f --labels l.csv --resume auto" in res.output
    res = runner.invoke(app, ["slurm", "template", "extract", "--out", "o"])
    assert res.exit_code == 2 and "--slides" in res.output


def test_debug_executor_runs_the_stage_in_process_like_local(
        cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--executor debug` (submitit's DebugExecutor) runs the same job in this process: the
    stores equal a local run's, and the job's folder is where submitit keeps its logs."""
    import os

    from gigamil.cluster.executor import EXECUTORS, DebugExecutor
    from gigamil.wsi.store import PatchStore

    assert EXECUTORS.get("debug") is DebugExecutor
    common = [str(cohort / "s000.svs"), str(cohort / "s001.svs"), "--mpp", "1.0",
              "--patch-size", "128"]
    res = runner.invoke(app, ["extract", *common, "--out", str(tmp_path / "local")])
    assert res.exit_code == 0, res.output
    pid = os.getpid()
    res = runner.invoke(app, ["extract", *common, "--out", str(tmp_path / "debug"),
                              "--executor", "debug", "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert os.getpid() == pid
    for sid in ("s000", "s001"):
        with PatchStore(tmp_path / "local/patches" / f"{sid}.lmdb") as a, \
                PatchStore(tmp_path / "debug/patches" / f"{sid}.lmdb") as b:
            assert len(a) == len(b) > 0 and (a.coords == b.coords).all()
            assert all((a[i] == b[i]).all() for i in range(0, len(a), 5))
    res = runner.invoke(app, ["extract", *common, "--out", str(tmp_path / "x"),
                              "--executor", "k8s"])
    assert res.exit_code == 2 and "k8s" in res.output
    # the seam itself: a stage's job, run by submitit's DebugJob in this process
    import submitit

    from gigamil.cluster.executor import run_stage
    from gigamil.cluster.resources import THREAD_ENV_VARS
    from gigamil.cluster.stages import ExtractStage
    from gigamil.wsi.extract_config import ExtractConfig

    for var in THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    outcome = run_stage(ExtractStage([cohort / "s002.svs"], tmp_path / "api",
                                     ExtractConfig(mpp=1.0, patch_size=128)),
                        ClusterOptions(executor="debug"))
    assert isinstance(outcome.jobs[0], submitit.DebugJob) and outcome.jobs[0].done()
    assert outcome.results is not None and [r.status for r in outcome.results[0]] == ["ok"]
    # a job run in the caller's process sizes no threads for it (that is a SLURM job's
    # business): the caller's environment is left as it was
    assert not [v for v in THREAD_ENV_VARS if v in os.environ]


def test_tissue_detector_and_its_options_reach_the_extraction(cohort: Path, tmp_path: Path
                                                              ) -> None:
    """`--tissue-detector NAME -t key=value` builds the registered detector with those
    options: a saturation floor above any pixel finds no tissue, so no patch is kept."""
    import csv

    common = [str(cohort / "s000.svs"), "--mpp", "1.0", "--patch-size", "128"]
    res = runner.invoke(app, ["extract", *common, "--out", str(tmp_path / "a"),
                              "--tissue-detector", "otsu", "-t", "min_saturation=20"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["extract", *common, "--out", str(tmp_path / "b"),
                              "--tissue-detector", "otsu", "-t", "min_saturation=256"])
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "b" / "extract.csv"))}
    first = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "a" / "extract.csv"))}
    assert int(first["s000"]["n_patches"]) > 0
    assert rows["s000"]["status"] == "failed" or int(rows["s000"]["n_patches"]) == 0
    res = runner.invoke(app, ["extract", *common, "--out", str(tmp_path / "c"),
                              "--tissue-detector", "nonesuch"])
    assert res.exit_code == 2 and "otsu" in res.output  # the known detectors are named
    res = runner.invoke(app, ["extract", *common, "--out", str(tmp_path / "c"),
                              "-t", "no_such_option=1"])
    assert res.exit_code == 2 and "no_such_option" in res.output
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "min_saturation" in res.output


def test_stores_from_before_tissue_params_stay_current() -> None:
    """A store's saved parameters decide whether a rerun skips it: the default (no
    detector options) must leave them as they were before `-t` existed, or every old store
    would be re-extracted."""
    from gigamil.wsi.extract_config import ExtractConfig

    assert "tissue_params" not in ExtractConfig().output_params()
    tuned = ExtractConfig(tissue_params={"min_saturation": 30}).output_params()
    assert tuned["tissue_params"] == {"min_saturation": 30}
    assert tuned != ExtractConfig().output_params()


def test_slurm_limit_parsing() -> None:
    from gigamil.cluster.slurm_limits import _gpus, parse_mem_mb, parse_minutes

    assert parse_minutes("infinite") is None and parse_minutes("UNLIMITED") is None
    assert parse_minutes("30") == 30 and parse_minutes("30:00") == 30
    assert parse_minutes("2:00:00") == 120 and parse_minutes("1-00:00:01") == 1441
    assert parse_mem_mb("16G") == 16384 and parse_mem_mb("500") == 500
    assert parse_mem_mb("1T") == 1024 * 1024 and parse_mem_mb("lots") is None
    assert _gpus("gpu:4") == 4 and _gpus("gpu:a100:8(S:0-1)") == 8 and _gpus("(null)") == 0
