from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gigamil.cli.main import app

runner = CliRunner()


def test_help_lists_commands() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("synth", "extract", "inspect", "demo"):
        assert cmd in res.output


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("gigamil ")


@pytest.mark.parametrize("cmd", ["synth", "extract", "inspect", "demo", "inspect slide",
                                 "inspect store"])
def test_every_command_explains_itself(cmd: str) -> None:
    res = runner.invoke(app, [*cmd.split(), "--help"])
    assert res.exit_code == 0 and "Usage" in res.output


def test_synth_inspect_extract_inspect(tmp_path: Path) -> None:
    slides, data = tmp_path / "slides", tmp_path / "data"
    res = runner.invoke(app, ["synth", str(slides), "--n", "2", "--size", "3072x2048",
                              "--seed", "1", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert (slides / "s000.svs").exists() and (slides / "labels.csv").exists()
    assert (slides / "masks" / "s000.npz").exists()

    res = runner.invoke(app, ["inspect", "slide", str(slides / "s000.svs"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["mpp"] == 0.25 and info["width"] == 3072 and info["vendor"] == "aperio"
    assert "label" in info["associated_images"] and len(info["levels"]) == 2

    res = runner.invoke(app, ["inspect", "slide", str(slides / "s000.svs")])
    assert res.exit_code == 0 and "levels" in res.output and "0.25" in res.output

    res = runner.invoke(app, ["extract", str(slides), "--out", str(data), "--mpp", "0.5",
                              "--patch-size", "128", "--coords-h5"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(data / "extract.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert (data / "coords" / "s000.h5").exists()

    res = runner.invoke(app, ["inspect", "store", str(data / "patches" / "s000.lmdb"), "--json",
                              "--montage", str(tmp_path / "m.png")])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["count"] == int(rows[0]["n_patches"]) and info["patch_size"] == 128
    assert info["target_mpp"] == 0.5 and "gigamil" in info["versions"]
    assert (tmp_path / "m.png").stat().st_size > 1000

    res = runner.invoke(app, ["extract", str(slides), "--out", str(data), "--mpp", "0.5",
                              "--patch-size", "128"])
    assert res.exit_code == 0 and "2 skipped" in res.output


def test_failed_slides_give_exit_code_1_and_a_table(bad_slides: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in ("good.svs", "notaslide.svs"):
        shutil.copy(bad_slides / name, src / name)
    res = runner.invoke(app, ["extract", str(src), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "1 failed" in res.output and "notaslide" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize(("args", "message"), [
    (["extract", "/nonexistent/dir", "--out", "o"], "does not exist"),
    (["inspect", "store", "/nonexistent.lmdb"], "no patch store"),
    (["extract", ".", "--out", "o", "--overlap", "300"], "--overlap"),
])
def test_user_mistakes_are_one_red_line(args: list[str], message: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_out_is_a_file(cohort: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    res = runner.invoke(app, ["extract", str(cohort / "s000.svs"), "--out", str(tmp_path / "f")])
    assert res.exit_code == 2 and "is a file" in res.output


def test_missing_mpp_message_names_the_option(bad_slides: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["extract", str(bad_slides / "nompp.tiff"), "--out", str(tmp_path)])
    assert res.exit_code == 1 and "--mpp-override" in res.output
    res = runner.invoke(app, ["extract", str(bad_slides / "nompp.tiff"), "--out", str(tmp_path),
                              "--mpp-override", "0.25", "--min-tissue", "0.1"])
    assert res.exit_code == 0, res.output


def test_inspect_slide_preview_and_extract_previews(tmp_path: Path, cohort: Path) -> None:
    res = runner.invoke(app, ["inspect", "slide", str(cohort / "s000.svs"), "--preview",
                              str(tmp_path / "p.png"), "--min-tissue", "0.8", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["preview"]["kept"] > 0 and (tmp_path / "p.png").stat().st_size > 10_000
    res = runner.invoke(app, ["extract", str(cohort / "s000.svs"), "--out", str(tmp_path / "o"),
                              "--previews", "--mpp", "0.5,1.0", "--stain-norm", "macenko"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "previews" / "s000.png").exists()
    rows = list(csv.DictReader(open(tmp_path / "o" / "extract.csv")))
    assert {"qc_background", "qc_pen", "qc_blur"} <= set(rows[0])
    # the preview predicts exactly what extraction with the same options keeps
    res = runner.invoke(app, ["extract", str(cohort / "s000.svs"), "--out", str(tmp_path / "q"),
                              "--min-tissue", "0.8"])
    row = next(csv.DictReader(open(tmp_path / "q" / "extract.csv")))
    assert int(row["n_patches"]) == info["preview"]["kept"]


def test_encoders_and_embed_commands(tmp_path: Path, cohort: Path) -> None:
    res = runner.invoke(app, ["encoders"])
    assert res.exit_code == 0 and "uni2-h" in res.output and "virchow2" in res.output
    res = runner.invoke(app, ["extract", str(cohort / "s000.svs"), "--out", str(tmp_path),
                              "--mpp", "2.0", "--patch-size", "64"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["embed", str(tmp_path), "--encoder", "tiny-cnn", "--workers", "0",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "features" / "tiny-cnn" / "s000.h5").exists()
    assert "1 embedded" in res.output
    res = runner.invoke(app, ["embed", str(tmp_path), "--encoder", "no_such_model_xyz",
                              "--workers", "0", "--device", "cpu"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = runner.invoke(app, ["embed", str(tmp_path), "--device", "cuda", "--encoder", "tiny-cnn"])
    if not __import__("torch").cuda.is_available():
        assert res.exit_code == 2 and "--device cpu" in res.output
