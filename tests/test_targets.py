"""Beyond one label: survival, regression and several targets, each learning a planted
signal, scored against what the true planted fraction would score; refusals; feature
standardization."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gigamil.cli.main import app
from gigamil.errors import UsageError
from gigamil.mil.calibration import regression_metrics
from gigamil.mil.metrics import binary_auroc
from gigamil.mil.survival import concordance_index
from gigamil.mil.train_config import TrainConfig
from gigamil.synth.bags import make_feature_bags, make_outcome_bags
from gigamil.wsi.features import read_bag, write_bag

runner = CliRunner()


@pytest.fixture(scope="module")
def outcome_bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("outcomes")
    make_outcome_bags(out, n_slides=96, dim=16, bag_size=(30, 90), signal=1.5, seed=3)
    return out


def _labels(feats: Path) -> dict[str, dict[str, str]]:
    return {r["slide_id"]: r for r in csv.DictReader(open(feats / "labels.csv"))}


def _pooled_predictions(run: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for p in sorted(run.glob("predictions_fold*.csv")):
        rows.extend(csv.DictReader(open(p)))
    return rows


def _train(feats: Path, out: Path, *extra: str) -> dict:
    res = runner.invoke(app, ["train", "--features", str(feats), "--labels",
                              str(feats / "labels.csv"), "--out", str(out), "--folds", "3",
                              "--epochs", "15", "--batch-size", "8", "--bootstrap", "100",
                              "--val-frac", "0", "-o", "dropout=0", "-o", "hidden=64", *extra])
    assert res.exit_code == 0, res.output
    return json.loads((out / "summary.json").read_text())


def test_survival_learns_the_planted_hazard(outcome_bags: Path, tmp_path: Path) -> None:
    truth = _labels(outcome_bags)
    # the 4 per-bin hazard heads of nll learn more slowly than Cox's one risk
    for loss, lr in (("nll", "1e-2"), ("cox", "2e-3")):
        summary = _train(outcome_bags, tmp_path / loss, "--task", "survival",
                         "--survival-loss", loss, "--lr", lr)
        pooled = summary["pooled"]["metrics"]["c_index"]
        rows = _pooled_predictions(tmp_path / loss)
        t = np.array([float(r["time"]) for r in rows])
        e = np.array([float(r["event"]) for r in rows])
        oracle = concordance_index(t, np.array([float(truth[r["slide_id"]]["frac0"])
                                                for r in rows]), e)
        risk = np.array([float(r["risk"]) for r in rows])
        assert pooled["value"] == pytest.approx(concordance_index(t, risk, e))
        assert pooled["ci95"][0] <= pooled["value"] <= pooled["ci95"][1]
        print(f"survival {loss}: C-index {pooled['value']:.3f} (oracle {oracle:.3f})")
        assert pooled["value"] > 0.6 and pooled["value"] > oracle - 0.2, (loss, pooled, oracle)
        assert (tmp_path / loss / "km.png").is_file()
    report = runner.invoke(app, ["eval", str(tmp_path / "nll"), "--bootstrap", "50", "--json"])
    assert report.exit_code == 0, report.output
    assert (tmp_path / "nll" / "eval" / "km.png").is_file()


def test_regression_learns_the_planted_value(outcome_bags: Path, tmp_path: Path) -> None:
    summary = _train(outcome_bags, tmp_path / "run", "--task", "regression", "--target",
                     "score", "--monitor", "loss", "--lr", "1e-2")
    truth = _labels(outcome_bags)
    rows = _pooled_predictions(tmp_path / "run")
    y = np.array([float(r["value"]) for r in rows])
    pred = np.array([float(r["pred"]) for r in rows])
    frac = np.array([float(truth[r["slide_id"]]["frac1"]) for r in rows])
    oracle = regression_metrics(y, 40 * frac)["r2"]
    got = summary["pooled"]["metrics"]
    assert got["r2"]["value"] == pytest.approx(regression_metrics(y, pred)["r2"])
    print(f"regression: R² {got['r2']['value']:.3f} (oracle {oracle:.3f}), "
          f"MAE {got['mae']['value']:.2f}")
    assert got["r2"]["value"] > 0.5, got
    assert set(got) == {"r2", "mae", "rmse", "pearson"}


def test_several_targets_one_model_with_masked_cells(outcome_bags: Path, tmp_path: Path) -> None:
    summary = _train(outcome_bags, tmp_path / "run", "--target", "msi,cms,braf,score:regression",
                     "--target-weights", "1,1,1,0.5", "--lr", "1e-2")
    truth = _labels(outcome_bags)
    rows = _pooled_predictions(tmp_path / "run")
    assert len(rows) == len(truth)  # slides with an empty braf cell are kept
    blank = [r for r in rows if truth[r["slide_id"]]["braf"] == ""]
    assert blank and all(r["braf_target"] == "" for r in blank)
    m = summary["pooled"]["metrics"]
    frac = {k: np.array([float(truth[r["slide_id"]][k]) for r in rows]) for k in
            ("frac0", "frac2")}
    msi = np.array([truth[r["slide_id"]]["msi"] == "high" for r in rows])
    oracle_msi = binary_auroc(msi, frac["frac2"])
    print(f"multi-target: msi AUROC {m['msi_auroc']['value']:.3f} (oracle {oracle_msi:.3f}), "
          f"cms {m['cms_auroc']['value']:.3f}, braf {m['braf_auroc']['value']:.3f}, "
          f"score R² {m['score_r2']['value']:.3f}")
    for name, floor in (("msi", 0.7), ("cms", 0.7), ("braf", 0.6)):  # braf: f0 + f2 > 0.4
        assert m[f"{name}_auroc"]["value"] > floor, (name, m[f"{name}_auroc"])
    assert m["score_r2"]["value"] > 0.2
    best = torch.load(tmp_path / "run/checkpoints/fold0/best.pt", weights_only=True)
    assert [t["name"] for t in best["meta"]["targets"]] == ["msi", "cms", "braf", "score"]
    assert best["meta"]["n_outputs"] == 2 + 3 + 2 + 1


@pytest.mark.parametrize(("column", "cells", "message"), [
    ("time", ["-3", "5"], "negative"),
    ("event", ["2", "1"], "not 0 or 1"),
    ("time", ["abc", "5"], "not a number"),
])
def test_bad_survival_labels_get_one_clear_error(outcome_bags: Path, tmp_path: Path,
                                                 column: str, cells: list[str],
                                                 message: str) -> None:
    rows = list(csv.DictReader(open(outcome_bags / "labels.csv")))
    rows[0][column], rows[1][column] = cells
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    res = runner.invoke(app, ["train", "--features", str(outcome_bags), "--labels", str(bad),
                              "--out", str(tmp_path / "r"), "--task", "survival"])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert "line 2" in " ".join(res.output.split())


def test_missing_target_column_and_single_class_are_refused(outcome_bags: Path,
                                                            tmp_path: Path) -> None:
    res = runner.invoke(app, ["train", "--features", str(outcome_bags), "--labels",
                              str(outcome_bags / "labels.csv"), "--out", str(tmp_path / "r"),
                              "--target", "msi,kras"])
    flat = " ".join(res.output.split())
    assert res.exit_code == 2 and "no column kras" in flat, res.output
    rows = list(csv.DictReader(open(outcome_bags / "labels.csv")))
    for r in rows:
        r["msi"] = "low"
    one = tmp_path / "one.csv"
    with open(one, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    res = runner.invoke(app, ["train", "--features", str(outcome_bags), "--labels", str(one),
                              "--out", str(tmp_path / "r2"), "--target", "msi"])
    assert res.exit_code == 2 and "single class" in " ".join(res.output.split()), res.output
    with pytest.raises(UsageError, match="needs --target"):
        TrainConfig(features="f", labels="l", out="o", task="regression")
    res = runner.invoke(app, ["train", "--features", str(outcome_bags), "--labels",
                              str(outcome_bags / "labels.csv"), "--out", str(tmp_path / "r3"),
                              "--task", "survival", "--monitor", "auroc"])
    assert res.exit_code == 2 and "not a metric of survival" in " ".join(res.output.split())


def _scaled_copy(src: Path, dst: Path, scales: np.ndarray, shift: np.ndarray) -> Path:
    dst.mkdir()
    for p in sorted(src.glob("*.h5")):
        bag = read_bag(p)
        write_bag(dst / p.name, (bag.features * scales + shift).astype(np.float32), bag.coords,
                  {"mpp": 0.5, "patch_size": 256, "encoder": "synthetic"})
    (dst / "labels.csv").write_bytes((src / "labels.csv").read_bytes())
    return dst


def test_standardization_makes_accuracy_independent_of_feature_scale(tmp_path: Path) -> None:
    src = tmp_path / "bags"
    make_feature_bags(src, n_slides=48, dim=16, bag_size=(20, 80), signal=0.8, seed=5)
    rng = np.random.default_rng(0)
    scales = 10 ** rng.uniform(-1, 3, size=16)  # 0.1 … 1000 per dimension
    scaled = _scaled_copy(src, tmp_path / "scaled", scales, rng.normal(0, 50, size=16) * scales)
    common = ["--epochs", "15", "--folds", "3", "--lr", "1e-3", "--bootstrap", "20",
              "--val-frac", "0"]
    auroc = {}
    for name, feats, mode in (("plain", src, "auto"), ("scaled", scaled, "auto"),
                              ("scaled_off", scaled, "off")):
        res = runner.invoke(app, ["train", "--features", str(feats), "--labels",
                                  str(feats / "labels.csv"), "--out", str(tmp_path / name),
                                  "--standardize", mode, *common])
        assert res.exit_code == 0, res.output
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        auroc[name] = summary["pooled"]["metrics"]["auroc"]["value"]
        best = torch.load(tmp_path / name / "checkpoints/fold0/best.pt", weights_only=True)
        assert best["meta"]["standardize"] == (name == "scaled"), name
    print("AUROC by feature scale:", auroc)
    assert auroc["scaled"] >= auroc["plain"] - 0.08, auroc
    assert auroc["scaled"] > 0.8


def _cfg(feats: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict = dict(features=str(feats), labels=str(feats / "labels.csv"), out=str(out),
                      folds=2, epochs=3, lr=1e-3, batch_size=8, bootstrap=20, early_stop=None,
                      val_frac=0.15)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [
    dict(task="survival", survival_loss="cox"),
    dict(target=("msi", "cms", "braf", "score:regression")),
], ids=["survival-cox", "multi-target"])
def test_stop_then_resume_is_bitwise_equal(outcome_bags: Path, tmp_path: Path, kw: dict) -> None:
    """Stopped (as on SIGTERM) mid-run and resumed: the same weights, bit for bit."""
    from gigamil.cluster.checkpoint import CheckpointManager
    from gigamil.errors import TrainingInterrupted
    from gigamil.mil.fold import StopRequest
    from gigamil.mil.train import train

    torch.set_num_threads(1)

    def go(out: Path, resume: bool, stop: StopRequest | None = None, on_epoch=None) -> dict:
        ckpts = lambda k: CheckpointManager(out / "checkpoints" / f"fold{k}")  # noqa: E731
        return train(_cfg(outcome_bags, out, **kw), ckpts, torch.device("cpu"), resume=resume,
                     stop=stop, on_epoch=on_epoch)

    go(tmp_path / "ref", False)
    stop = StopRequest()
    with pytest.raises(TrainingInterrupted):
        go(tmp_path / "run", False, stop,
           lambda e: stop.request("SIGTERM", True) if e["epoch"] == 2 else None)
    go(tmp_path / "run", True)
    for fold in (0, 1):
        a = torch.load(tmp_path / f"ref/checkpoints/fold{fold}/best.pt", weights_only=True)
        b = torch.load(tmp_path / f"run/checkpoints/fold{fold}/best.pt", weights_only=True)
        assert a["meta"]["targets"] == b["meta"]["targets"]
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (fold, k)
    for name in ("metrics.csv", "predictions_fold0.csv", "predictions_fold1.csv"):
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "run" / name).read_bytes()


@pytest.mark.slow
def test_two_rank_gloo_cox_matches_one_rank(outcome_bags: Path, tmp_path: Path) -> None:
    """The Cox risk set is the global batch, gathered from both ranks: 2 ranks = 1 rank."""
    import os
    import subprocess
    import sys

    def run(nproc: int, out: Path) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(29700 + nproc + os.getpid() % 1000), "-m", "gigamil",
               "train", "--features", str(outcome_bags), "--labels",
               str(outcome_bags / "labels.csv"), "--out", str(out), "--epochs", "3",
               "--folds", "2", "--batch-size", "8", "--lr", "1e-3", "--bootstrap", "20",
               "-o", "dropout=0", "--task", "survival", "--survival-loss", "cox"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr[-3000:]

    run(1, tmp_path / "one")
    run(2, tmp_path / "two")
    for fold in (0, 1):
        wa, wb = (torch.load(tmp_path / d / f"checkpoints/fold{fold}/best.pt",
                             weights_only=True)["model"] for d in ("one", "two"))
        for k in wa:
            if k.endswith("classifier.bias"):
                # the partial likelihood ignores a shift of the risk: this bias gets round-off
                # for a gradient, which Adam scales up to steps (it never changes a ranking)
                continue
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)
    ha, hb = (list(csv.DictReader(open(tmp_path / d / "metrics.csv"))) for d in ("one", "two"))
    for ra, rb in zip(ha, hb, strict=True):
        if ra["train_loss"]:
            assert abs(float(ra["train_loss"]) - float(rb["train_loss"])) < 1e-5


def test_infer_table_keeps_a_single_regression_prediction(tmp_path: Path) -> None:
    """Review finding: the value of a one-target regression run is named ``pred``, which
    the table once dropped as a classification column."""
    from gigamil.layout import PredictionsDir
    from gigamil.mil.infer_outputs import write_outputs
    from gigamil.mil.infer_spec import InferenceSpec
    from gigamil.wsi.extract_config import ExtractConfig

    spec = InferenceSpec(run=str(tmp_path), classes=[], model_files=[], encoder="tiny-cnn",
                         encoder_weights=None, extract=ExtractConfig(),
                         targets=[{"kind": "regression", "name": "tmb"}])
    preds = PredictionsDir(tmp_path / "p")
    preds.slides.mkdir(parents=True)
    (preds.slide_json("a")).write_text(json.dumps(
        {"slide_id": "a", "pred": "3.25", "n_patches": 4, "qc": "", "model": "m",
         "seconds": 1.0}))
    csv_path, _ = write_outputs(tmp_path / "p", spec, [])
    row = next(csv.DictReader(open(csv_path)))
    assert row["pred"] == "3.25" and row["n_patches"] == "4"


def test_a_run_from_before_targets_resumes_with_its_own_settings(tmp_path: Path) -> None:
    """Review finding: an old run's identity lacks the target options; resuming it must
    compare against what it did (no standardization), not refuse every new key."""
    from gigamil.errors import UsageError as Usage
    from gigamil.mil.train import BEFORE_TARGETS, _prepare_run

    out = tmp_path / "run"
    out.mkdir()
    old_cfg = TrainConfig(features="f", labels="l", out=str(out), standardize="off",
                          calibrate="off")
    identity = {k: v for k, v in old_cfg.identity().items() if k not in BEFORE_TARGETS}
    (out / "config.json").write_text(json.dumps({"identity": identity}))
    with pytest.raises(Usage, match=r"other settings \(calibrate, standardize\)"):
        _prepare_run(TrainConfig(features="f", labels="l", out=str(out)), out, True, {})
    _prepare_run(old_cfg, out, True, {})  # the old settings: accepted


# -- kill -9 and resume, in a real process ------------------------------------------------------

#: Both sides of a bitwise comparison run with the same thread count (float32 sums depend on it).
_FIXED_THREADS_ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


@pytest.fixture(scope="module")
def heavy_outcome_bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Outcome bags large enough that a training step is not instant (for kill tests)."""
    out = tmp_path_factory.mktemp("heavy_outcomes")
    make_outcome_bags(out, n_slides=24, dim=64, bag_size=(800, 1200), signal=1.5, seed=4)
    return out


def _kill_cmd(feats: Path, out: Path, *extra: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "gigamil", "train", "--features", str(feats), "--labels",
            str(feats / "labels.csv"), "--out", str(out), "--folds", "2", "--epochs", "3",
            "--batch-size", "2", "--lr", "1e-3", "--checkpoint-every", "1", "--bootstrap", "20",
            "--early-stop", "0", "--max-instances", "512", "--val-frac", "0.3",
            "-o", "hidden=128", *extra]  # 12 steps per fold


def _final_step_weights(out: Path, fold: int) -> dict[str, torch.Tensor]:
    ckpt = sorted((out / f"checkpoints/fold{fold}").glob("step_*.pt"))[-1]
    return torch.load(ckpt, weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "kill_fold", "kill_step"), [
    (("--task", "survival", "--survival-loss", "cox"), 0, 5),
    (("--target", "msi,cms,braf,score:regression", "--target-weights", "1,1,1,0.5"), 1, 4),
], ids=["survival-cox", "multi-target"])
def test_kill9_then_resume_is_bitwise_equal(heavy_outcome_bags: Path, tmp_path: Path,
                                            extra: tuple[str, ...], kill_fold: int,
                                            kill_step: int) -> None:
    """SIGKILL mid-fold (no chance to checkpoint), then ``--resume auto``: the final and the
    best weights, predictions and metrics are those of an uninterrupted run, bit for bit."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, **_FIXED_THREADS_ENV}
    ref, out = tmp_path / "ref", tmp_path / "run"
    res = subprocess.run(_kill_cmd(heavy_outcome_bags, ref, *extra), capture_output=True,
                         text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    n_steps = max(int(p.stem[5:]) for p in (ref / "checkpoints/fold0").glob("step_*.pt"))
    assert kill_step < n_steps - 2, n_steps  # the kill lands before the fold's last steps

    proc = subprocess.Popen(_kill_cmd(heavy_outcome_bags, out, *extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    target = out / f"checkpoints/fold{kill_fold}" / f"step_{kill_step:08d}.json"
    t0 = time.time()
    while not target.exists():
        assert proc.poll() is None, f"training ended before fold {kill_fold} step {kill_step}"
        assert time.time() - t0 < 120
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    last = max(int(p.stem[5:]) for p in (out / f"checkpoints/fold{kill_fold}").glob("step_*.pt"))
    assert last < n_steps  # killed mid-fold, not after it

    res = subprocess.run(_kill_cmd(heavy_outcome_bags, out, *extra, "--resume", "auto"),
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"fold {kill_fold} resumes from step_" in " ".join(res.stderr.split()), res.stderr

    for name in ("metrics.csv", "predictions_fold0.csv", "predictions_fold1.csv", "splits.csv"):
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    assert (json.loads((ref / "summary.json").read_text())
            == json.loads((out / "summary.json").read_text()))
    for fold in (0, 1):
        ba, bb = (torch.load(d / f"checkpoints/fold{fold}/best.pt", weights_only=True)
                  for d in (ref, out))
        assert ba["meta"]["targets"] == bb["meta"]["targets"]
        for which, wa, wb in (("best", ba["model"], bb["model"]),
                              ("final", _final_step_weights(ref, fold),
                               _final_step_weights(out, fold))):
            assert wa.keys() == wb.keys()
            for k in wa:
                assert torch.equal(wa[k], wb[k]), (fold, which, k)
