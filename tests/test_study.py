"""One study file: init, checks with file and line, run = the commands by hand, status."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gigamil.cli.main import app
from gigamil.errors import UsageError
from gigamil.study import load_study
from gigamil.synth.slides import make_cohort

runner = CliRunner()

STUDY = """\
slides: slides/
labels: slides/labels.csv
out: study/
predict: slides/
extract:
  mpp: 1.0
  patch_size: 128
embed:
  encoder: tiny-cnn
  workers: 0
  device: cpu
train:
  folds: 2
  epochs: 2
  batch_size: 2
  bootstrap: 10
  val_frac: 0.0
infer:
  cluster:
    ray_address: none
"""


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_init_writes_a_study_that_loads_with_every_default(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    res = runner.invoke(app, ["init", str(path)])
    assert res.exit_code == 0, res.output
    study = load_study(path)  # the template is itself a valid study
    assert study.extract.patch_size == 256 and study.embed.encoder == "resnet50"
    assert study.train.model == "abmil" and study.cluster("train").executor == "local"
    assert study.stages() == ["extract", "embed", "train"]  # predict: null
    res = runner.invoke(app, ["init", str(path)])
    assert res.exit_code == 2 and "exists" in res.output


@pytest.mark.parametrize(("edit", "expected"), [
    ("  patch_size: 128\n", "study.yaml:7: unknown key `patch_sise` in `extract:` — did you "
                            "mean `patch_size`?"),
    ("  mpp: 1.0\n", "study.yaml:6: `mpp: 'fine'` is not a number or a list of a number"),
    ("  encoder: tiny-cnn\n", "study.yaml:9: `encoder: 3` is not text"),
    ("  epochs: 2\n", "study.yaml:14: `epochs: 0` is not"),
    ("  val_frac: 0.0\n", "study.yaml:17: `val_frac: 'x'` is not a number"),
    ("    ray_address: none\n", "study.yaml:20: unknown key `adress`"),
])
def test_a_bad_study_is_refused_with_its_line(tmp_path: Path, edit: str,
                                              expected: str) -> None:
    bad = {"  patch_size: 128\n": "  patch_sise: 128\n", "  mpp: 1.0\n": "  mpp: fine\n",
           "  encoder: tiny-cnn\n": "  encoder: 3\n", "  epochs: 2\n": "  epochs: 0\n",
           "  val_frac: 0.0\n": "  val_frac: x\n",
           "    ray_address: none\n": "    adress: none\n"}[edit]
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.replace(edit, bad))
    res = runner.invoke(app, ["status", str(path)])
    assert res.exit_code == 2, res.output
    if "epochs: 0" in expected:  # the config's own range check, located at its section
        assert "study.yaml:" in _flat(res.output) and "at least 1" in _flat(res.output)
    else:
        assert expected in _flat(res.output), res.output


def test_choices_and_missing_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.replace("  folds: 2\n", "  folds: 2\n  precision: fp8\n"))
    with pytest.raises(UsageError, match=r"study.yaml:14: `precision: 'fp8'` is not one of "
                                         r"'fp32', 'bf16', 'fp16'"):
        load_study(path)
    path.write_text(STUDY.replace("out: study/\n", ""))
    with pytest.raises(UsageError, match="`out:` is missing"):
        load_study(path)


@pytest.mark.slow
def test_run_equals_the_commands_by_hand_and_status_says_where_it_stands(
        tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    make_cohort(slides, n=4, width=3072, height=2048, seed=3, workers=1)
    (tmp_path / "study.yaml").write_text(STUDY)
    res = runner.invoke(app, ["status", str(tmp_path / "study.yaml")])
    assert res.exit_code == 0 and "not started" in res.output
    res = runner.invoke(app, ["run", str(tmp_path / "study.yaml")])
    assert res.exit_code == 0, res.output
    hand = tmp_path / "hand"
    for args in (
        ["extract", str(slides), "--out", str(hand / "data"), "--mpp", "1.0",
         "--patch-size", "128"],
        ["embed", str(hand / "data"), "--encoder", "tiny-cnn", "--workers", "0", "--device",
         "cpu"],
        ["train", "--features", str(hand / "data/features/tiny-cnn"), "--labels",
         str(slides / "labels.csv"), "--out", str(hand / "run"), "--folds", "2", "--epochs",
         "2", "--batch-size", "2", "--bootstrap", "10", "--val-frac", "0"],
        ["infer", str(slides), "--run", str(hand / "run"), "--out", str(hand / "preds"),
         "--ray-address", "none"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    study = tmp_path / "study"
    for k in (0, 1):
        assert (study / f"runs/run/predictions_fold{k}.csv").read_bytes() == \
            (hand / f"run/predictions_fold{k}.csv").read_bytes()

    def preds(p: Path) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k not in ("seconds", "model")}
                for r in csv.DictReader(open(p))]

    a, b = preds(study / "preds/predictions.csv"), preds(hand / "preds/predictions.csv")
    assert [(r["slide_id"], r["pred"], r["n_patches"]) for r in a] == \
        [(r["slide_id"], r["pred"], r["n_patches"]) for r in b]
    for ra, rb in zip(a, b):  # float32 sums in another thread layout: the last bits
        assert float(ra["prob_tumor"]) == pytest.approx(float(rb["prob_tumor"]), abs=1e-6)
    resolved = json.loads((study / "study.resolved.json").read_text())
    assert resolved["train"]["epochs"] == 2 and resolved["train"]["lr"] == 2e-4
    assert "versions" in resolved
    res = runner.invoke(app, ["status", str(tmp_path / "study.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    report = {r["stage"]: r for r in json.loads(res.output)}
    assert [report[s]["state"] for s in ("extract", "embed", "train", "infer")] == ["done"] * 4
    assert report["extract"]["done"] == 4 and report["train"]["done"] == 2
    res = runner.invoke(app, ["run", str(tmp_path / "study.yaml"), "--from", "embed"])
    assert res.exit_code == 0, res.output  # finished work is skipped
    rows = list(csv.DictReader(open(study / "data/features/tiny-cnn/embed.csv")))
    assert {r["status"] for r in rows} == {"skipped"}
    res = runner.invoke(app, ["run", str(tmp_path / "study.yaml"), "--from", "nonsense"])
    assert res.exit_code == 2 and "not a stage" in res.output


def test_any_command_takes_its_options_from_the_study_and_the_command_line_wins(
        tmp_path: Path) -> None:
    from gigamil.synth.bags import make_feature_bags

    bags = tmp_path / "bags"
    make_feature_bags(bags, n_slides=12, dim=8, bag_size=(5, 10), seed=0)
    (tmp_path / "study.yaml").write_text(STUDY.replace("  folds: 2\n", "  folds: 3\n"))
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--features", str(bags), "--labels",
                              str(bags / "labels.csv"), "--out", str(out), "--config",
                              str(tmp_path / "study.yaml"), "--epochs", "1"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["folds"] == 3 and cfg["batch_size"] == 2 and cfg["val_frac"] == 0.0  # study
    assert cfg["epochs"] == 1  # the command line over the study
    assert cfg["lr"] == 2e-4  # neither: the default
    bad = tmp_path / "bad.yaml"
    bad.write_text(STUDY.replace("  folds: 2\n", "  foldz: 2\n"))
    res = runner.invoke(app, ["train", "--features", str(bags), "--labels",
                              str(bags / "labels.csv"), "--out", str(tmp_path / "r2"),
                              "--config", str(bad)])
    assert res.exit_code != 0 and "bad.yaml:13: unknown key `foldz`" in _flat(res.output)
