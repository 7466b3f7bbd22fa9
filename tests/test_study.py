"""One study file: init, checks with file and line, run = the commands by hand, status."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gigamil.cli.main import app
from gigamil.cluster.study_run import run_study
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


class _Recorder:
    def __init__(self) -> None:
        self.begun: list[tuple[str, int | None]] = []
        self.totals: list[int] = []
        self.done: dict[str, int] = {}

    def begin(self, stage: str, total: int | None) -> None:
        self.begun.append((stage, total))
        self.done[stage] = 0

    def total(self, n: int) -> None:
        self.totals.append(n)

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done[self.begun[-1][0]] += n


@pytest.mark.slow
def test_run_equals_the_commands_by_hand_and_status_says_where_it_stands(
        tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    make_cohort(slides, n=4, width=3072, height=2048, seed=3, workers=1)
    (tmp_path / "study.yaml").write_text(STUDY)
    res = runner.invoke(app, ["status", str(tmp_path / "study.yaml")])
    assert res.exit_code == 0 and "not started" in res.output
    progress = _Recorder()  # what a run here reports: the CLI draws it as bars
    run_study(load_study(tmp_path / "study.yaml"), progress=progress)
    assert [b[0] for b in progress.begun] == ["extract", "embed (patches)", "train", "infer"]
    assert progress.totals == [4] and progress.done["extract"] == 4  # slides
    assert progress.begun[2][1] == 4 and progress.done["train"] == 4  # 2 folds × 2 epochs
    assert progress.done["embed (patches)"] > 0 and progress.done["infer"] == 4
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


def _on_slurm(study: str, out: str) -> str:
    """The study with every stage submitted to the test cluster (1 CPU, 2 slides a job)."""
    block = ("  cluster:\n    executor: slurm\n    cpus_per_task: 1\n"
             "    time: \"00:15:00\"\n    slides_per_job: 2\n")
    text = study.replace("out: study/\n", f"out: {out}\n")
    for anchor in ("  patch_size: 128\n", "  device: cpu\n", "  val_frac: 0.0\n"):
        text = text.replace(anchor, anchor + block)
    return text.replace("    ray_address: none\n", "    ray_address: none\n"
                        + block.split("\n", 1)[1])


def _target(stage: str) -> str:
    return {"extract": "data", "embed": "data", "train": "runs/run", "infer": "preds"}[stage]


@pytest.mark.slurm
@pytest.mark.slow
def test_on_slurm_the_study_is_one_chain_of_dependent_jobs(slurm_cluster: str,
                                                           tmp_path: Path) -> None:
    """Submitted at once with afterok dependencies; a slide that fails cancels the stages
    after it and status says which and why; after the fix only the rest runs, and the
    results equal a local run of the same study."""
    import subprocess

    from gigamil.cluster.study_chain import ChainLink, wait_chain

    slides = tmp_path / "slides"
    make_cohort(slides, n=4, width=3072, height=2048, seed=3, workers=1)
    (slides / "broken.svs").write_bytes(b"not a slide at all\n" * 200)
    path = tmp_path / "study.yaml"
    path.write_text(_on_slurm(STUDY, "study/"))
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    assert "submitted" in res.output and "scancel" in _flat(res.output)
    chain = json.loads((tmp_path / "study/chain.json").read_text())
    links = [ChainLink(**s) for s in chain["stages"]]
    assert [link.stage for link in links] == ["extract", "embed", "train", "infer"]
    assert [len(link.jobs) for link in links] == [3, 3, 1, 1]  # 5 slides, 2 a job
    for before, link in zip(links, links[1:]):
        assert link.after == before.array_ids
        shown = subprocess.run(["scontrol", "show", "job", "-o", link.jobs[0]],
                               capture_output=True, text=True).stdout
        dependency = next(t for t in shown.split() if t.startswith("Dependency="))
        assert f"afterok:{before.array_ids[0]}" in dependency, dependency
        job = link.array_ids[0]
        script = tmp_path / "study" / _target(link.stage) / "jobs" / job / f"{job}_submission.sh"
        assert "#SBATCH --kill-on-invalid-dep=yes" in script.read_text()
    res = runner.invoke(app, ["status", str(path), "--json"])
    report = {r["stage"]: r for r in json.loads(res.output)}
    assert report["embed"]["state"] == "pending", report["embed"]
    assert any("Dependency" in n for n in report["embed"]["notes"])  # SLURM's reason
    res = runner.invoke(app, ["run", str(path)])  # not twice while it is queued
    assert res.exit_code == 2 and "still" in res.output, res.output
    wait_chain(links, poll=2.0)
    res = runner.invoke(app, ["status", str(path), "--json"])
    assert res.exit_code == 1, res.output
    report = {r["stage"]: r for r in json.loads(res.output)}
    assert report["extract"]["state"] == "failed"
    assert [f["slide_id"] for f in report["extract"]["failures"]] == ["broken"]
    assert report["extract"]["failures"][0]["error"]
    assert [report[s]["state"] for s in ("embed", "train", "infer")] == ["cancelled"] * 3
    assert not (tmp_path / "study/data/features").exists()  # nothing ran on part of it
    res = runner.invoke(app, ["status", str(path)])
    assert "broken" in res.output and "cancelled" in res.output

    (slides / "broken.svs").unlink()  # the fix
    res = runner.invoke(app, ["run", str(path), "--wait"])
    assert res.exit_code == 0, res.output
    report = {r["stage"]: r for r in json.loads(
        runner.invoke(app, ["status", str(path), "--json"]).output)}
    assert [report[s]["state"] for s in ("extract", "embed", "train", "infer")] == ["done"] * 4
    rows = list(csv.DictReader(open(tmp_path / "study/data/extract.csv")))
    assert sorted(r["slide_id"] for r in rows) == [f"s{i:03d}" for i in range(4)]
    assert {r["status"] for r in rows} == {"skipped"}  # only the rest ran
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0 and "every stage is done" in res.output

    local = tmp_path / "local.yaml"
    local.write_text(STUDY.replace("out: study/\n", "out: local/\n"))
    res = runner.invoke(app, ["run", str(local)])
    assert res.exit_code == 0, res.output
    for k in (0, 1):
        assert (tmp_path / f"study/runs/run/predictions_fold{k}.csv").read_bytes() == \
            (tmp_path / f"local/runs/run/predictions_fold{k}.csv").read_bytes()
    a = list(csv.DictReader(open(tmp_path / "study/preds/predictions.csv")))
    b = list(csv.DictReader(open(tmp_path / "local/preds/predictions.csv")))
    assert [(r["slide_id"], r["pred"]) for r in a] == [(r["slide_id"], r["pred"]) for r in b]


def test_the_eta_is_the_pace_so_far_times_the_work_left() -> None:
    import datetime as dt

    from gigamil.study_status import _eta, format_eta

    started = (dt.datetime.now() - dt.timedelta(seconds=100)).isoformat(timespec="seconds")
    running = [{"started": started}, {"started": ""}]  # one not started: no time of its own
    rows = [{"status": "ok"}, {"status": "ok"}, {"status": "skipped"}]
    eta = _eta(running, rows, total=10, n_done=3, finished=None)  # 2 new in 100 s, 7 left
    assert eta == pytest.approx(350, abs=20)
    folds = [dt.datetime.now().timestamp() - 500, dt.datetime.now().timestamp() - 10]
    assert _eta(running, [], 5, 2, folds) == pytest.approx(300, abs=20)  # one fold since
    assert _eta(running, [{"status": "skipped"}], 5, 1, None) is None  # no pace yet
    assert _eta([], rows, 10, 3, None) is None
    assert [format_eta(s) for s in (None, 42, 600, 9000)] == ["?", "~42 s", "~10 min", "~2.5 h"]
