from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gigamil.cli.main import app


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reruns_cheaply(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["demo", "--out", str(tmp_path), "--n", "6", "--heldout", "2", "--size", "4096x3072",
            "--folds", "2", "--epochs", "8"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert [s["status"] for s in summary["slides"]] == ["ok"] * 6
    assert all(s["n_patches"] > 10 for s in summary["stores"])
    assert 0 <= summary["heldout_auroc"] <= 1 and summary["cv_auroc"]["value"] >= 0
    assert (tmp_path / "montage.png").exists()
    assert len(list((tmp_path / "preds" / "heatmaps").glob("*.png"))) == 2
    assert "held-out AUROC" in res.output
    res = runner.invoke(app, args)  # rerun: everything is reused
    assert res.exit_code == 0
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert [s["status"] for s in summary["slides"]] == ["skipped"] * 6
    assert summary["timings"]["infer_s"] < 5  # nothing left to predict
