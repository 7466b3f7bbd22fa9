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
