"""Training: it learns, every model and precision runs, and it resumes bit for bit."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gigamil.cli.main import app
from gigamil.cluster.launch import run_training
from gigamil.mil.train_config import TrainConfig
from gigamil.synth.bags import make_feature_bags

runner = CliRunner()


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bags")
    make_feature_bags(out, n_slides=36, dim=16, bag_size=(10, 80), seed=0)
    return out


@pytest.fixture(scope="module")
def split_bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 bags with a split column: 16 train, 4 val, 4 test (batches divide evenly)."""
    out = tmp_path_factory.mktemp("split_bags")
    make_feature_bags(out, n_slides=24, dim=16, bag_size=(10, 60), seed=1)
    rows = list(csv.DictReader(open(out / "labels.csv")))
    for i, r in enumerate(rows):  # labels alternate by half: spread both over partitions
        r["split"] = "test" if i % 6 == 0 else "val" if i % 6 == 1 else "train"
    with open(out / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["slide_id", "label", "patient_id", "split"])
        w.writeheader()
        w.writerows(rows)
    return out


@pytest.fixture(scope="module")
def heavy_bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bags large enough that a training step takes milliseconds (for kill tests)."""
    out = tmp_path_factory.mktemp("heavy_bags")
    make_feature_bags(out, n_slides=20, dim=128, bag_size=(1500, 2500), seed=2)
    return out


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


def _cfg(feats: Path, out: Path, **kw) -> TrainConfig:
    base = dict(features=str(feats), labels=str(feats / "labels.csv"), out=str(out), folds=3,
                epochs=2, lr=1e-3, bootstrap=50)
    return TrainConfig(**{**base, **kw})


def test_training_learns_and_writes_the_run_directory(bags: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run_training(_cfg(bags, out, epochs=12, batch_size=4, early_stop=None))
    assert summary["complete"] and summary["pooled"]["metrics"]["auroc"]["value"] > 0.9
    for name in ("config.json", "splits.csv", "metrics.csv", "summary.json", "reliability.png",
                 "train.log", *(f"predictions_fold{k}.csv" for k in range(3))):
        assert (out / name).exists(), name
    preds = [r for k in range(3) for r in csv.DictReader(open(out / f"predictions_fold{k}.csv"))]
    assert sorted(r["slide_id"] for r in preds) == [f"b{i:03d}" for i in range(36)]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert sum(r["split"] == "epoch" for r in rows) == 3 * 12
    pooled = [r for r in rows if r["fold"] == "pooled"][0]
    assert float(pooled["auroc_lo"]) <= float(pooled["auroc"]) <= float(pooled["auroc_hi"])
    assert "f1_tumor_lo" in pooled
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["model"] == "abmil" and config["classes"] == ["normal", "tumor"]
    for k in range(3):  # each fold's model is complete and self-describing
        best = torch.load(out / f"checkpoints/fold{k}/best.pt", weights_only=True)
        assert best["meta"]["in_dim"] == 16 and best["meta"]["classes"] == ["normal", "tumor"]
        assert len(list((out / f"checkpoints/fold{k}").glob("step_*.pt"))) == 3  # keep_last


@pytest.mark.parametrize(("model", "extra"), [
    ("abmil_gated", {"model_options": {"heads": 2}}),
    ("clam_sb", {}), ("clam_mb", {}), ("transmil", {"model_options": {"dim": 32, "heads": 4}}),
    ("mean", {}), ("max", {}),
    ("abmil", {"loss": "evidential"}), ("abmil", {"precision": "bf16"}),
    ("abmil", {"precision": "fp16", "bucket": True, "balanced_sampler": True}),
    ("abmil", {"accumulate": 2, "max_instances": 8, "monitor": "auroc"}),
])
def test_every_model_and_option_trains(split_bags: Path, tmp_path: Path, model: str,
                                       extra: dict) -> None:
    summary = run_training(_cfg(split_bags, tmp_path / "run", model=model, batch_size=4, **extra))
    m = summary["pooled"]["metrics"]
    assert summary["complete"] and 0 <= m["acc"]["value"] <= 1 and np.isfinite(m["ece"]["value"])
    rows = list(csv.DictReader(open(tmp_path / "run" / "predictions_fold0.csv")))
    assert len(rows) == 4 and all(0 <= float(r["uncertainty"]) <= 1 for r in rows)


def _final_weights(out: Path, fold: int = 0) -> dict[str, torch.Tensor]:
    ckpt = sorted((out / f"checkpoints/fold{fold}").glob("step_*.pt"))[-1]
    return torch.load(ckpt, weights_only=True)["model"]


def test_gradient_accumulation_equals_the_larger_batch(split_bags: Path, tmp_path: Path) -> None:
    common = dict(epochs=3, clip_grad=None, model_options={"dropout": 0.0}, early_stop=None)
    run_training(_cfg(split_bags, tmp_path / "a", batch_size=8, **common))
    run_training(_cfg(split_bags, tmp_path / "b", batch_size=4, accumulate=2, **common))
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_cli_train_eval_and_refusals(split_bags: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--features", str(split_bags), "--labels", str(split_bags / "labels.csv"),
            "--out", str(out), "--epochs", "2", "--batch-size", "4", "--bootstrap", "20"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "pooled" in res.output and "auroc" in res.output
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "already holds a run" in _flat(res.output)
    res = runner.invoke(app, [*args, "--resume", "auto", "--lr", "0.5"])
    assert res.exit_code == 2 and "other settings (lr)" in _flat(res.output)
    res = runner.invoke(app, [*args, "--resume", "auto"])  # finished: nothing to do
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", str(out), "--bootstrap", "20", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["pooled"]["n"] == 4
    res = runner.invoke(app, ["eval", str(out), "--features", str(split_bags), "--labels",
                              str(split_bags / "labels.csv"), "--bootstrap", "20"])
    assert res.exit_code == 0, res.output
    ens = list(csv.DictReader(open(out / "eval" / split_bags.name / "predictions.csv")))
    assert len(ens) == 24 and ens[0]["fold"] == "ensemble"
    res = runner.invoke(app, ["train", "--features", str(split_bags), "--labels",
                              str(split_bags / "labels.csv"), "--out", str(tmp_path / "x"),
                              "--model", "abmil", "-o", "nonsense=1"])
    assert res.exit_code == 2 and "nonsense" in res.output


# -- fault tolerance (subprocesses) -----------------------------------------------------------

#: Runs compared bitwise use the same thread count on both sides (float32 sums depend on it).
FIXED_THREADS = {**os.environ, "OMP_NUM_THREADS": "2"}  # fixed, whatever the core count


def _train_cmd(feats: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gigamil", "train", "--features", str(feats), "--labels",
            str(feats / "labels.csv"), "--out", str(out), "--folds", "2", "--epochs", "4",
            "--batch-size", "2", "--lr", "1e-3", "--checkpoint-every", "1", "--bootstrap", "50",
            "--early-stop", "0", "--max-instances", "1024", "-o", "hidden=256", *extra]


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    target = out / "checkpoints/fold0" / f"step_{step:08d}.json"
    t0 = time.time()
    while not target.exists():
        assert proc.poll() is None, f"training ended before step {step}"
        assert time.time() - t0 < timeout
        time.sleep(0.002)


def _assert_same_run(a: Path, b: Path) -> None:
    for name in ("metrics.csv", "predictions_fold0.csv", "predictions_fold1.csv", "splits.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa == sb
    for fold in (0, 1):
        for which in ("best.pt", None):
            if which:
                wa = torch.load(a / f"checkpoints/fold{fold}/best.pt", weights_only=True)["model"]
                wb = torch.load(b / f"checkpoints/fold{fold}/best.pt", weights_only=True)["model"]
            else:
                wa, wb = _final_weights(a, fold), _final_weights(b, fold)
            for k in wa:
                assert torch.equal(wa[k], wb[k]), (fold, which, k)


@pytest.fixture(scope="module")
def reference_run(heavy_bags: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_train_cmd(heavy_bags, out), check=True, capture_output=True,
                   env=FIXED_THREADS)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("corrupt_latest", [False, True])
def test_kill9_then_resume_is_bitwise_equal(heavy_bags: Path, reference_run: Path,
                                            tmp_path: Path, corrupt_latest: bool) -> None:
    out = tmp_path / "run"
    step = random.Random(int(corrupt_latest)).randint(4, 20)  # 32 steps per fold
    proc = subprocess.Popen(_train_cmd(heavy_bags, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=FIXED_THREADS)
    _wait_for_step(out, step, proc)
    proc.kill()
    proc.wait()
    assert not (out / "summary.json").exists()
    if corrupt_latest:
        latest = sorted((out / "checkpoints/fold0").glob("step_*.pt"))[-1]
        data = bytearray(latest.read_bytes())
        data[len(data) // 2] ^= 0x55
        latest.write_bytes(bytes(data))
    res = subprocess.run(_train_cmd(heavy_bags, out, "--resume", "auto"), env=FIXED_THREADS,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumes from step_" in res.stderr
    if corrupt_latest:
        assert "is unusable" in res.stderr
    _assert_same_run(reference_run, out)


@pytest.mark.slow
def test_sigterm_checkpoints_and_stops_sigusr1_goes_on(heavy_bags: Path, reference_run: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = _train_cmd(heavy_bags, out)
    cmd[cmd.index("--checkpoint-every") + 1] = "1000"  # only epoch ends and signals checkpoint
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=FIXED_THREADS)
    t0 = time.time()
    while not list((out / "checkpoints/fold0").glob("step_*.json")):  # first epoch done
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.005)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--resume auto" in stderr, stderr
    steps = [int(p.stem[5:]) for p in (out / "checkpoints/fold0").glob("step_*.pt")]
    assert len(steps) >= 2 and any(s % 8 for s in steps)  # a mid-epoch checkpoint exists
    res = subprocess.run([*cmd, "--resume", "auto"], capture_output=True, text=True,
                         env=FIXED_THREADS)
    assert res.returncode == 0, res.stderr
    _assert_same_run(reference_run, out)


@pytest.mark.slow
def test_two_rank_gloo_ddp_matches_one_rank(split_bags: Path, tmp_path: Path) -> None:
    def run(nproc: int, out: Path) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(29500 + nproc + os.getpid() % 1000), "-m", "gigamil",
               "train", "--features", str(split_bags), "--labels",
               str(split_bags / "labels.csv"), "--out", str(out), "--epochs", "3",
               "--batch-size", "4", "--lr", "1e-3", "--bootstrap", "50", "-o", "dropout=0"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr[-3000:]

    run(1, tmp_path / "one")
    run(2, tmp_path / "two")
    wa, wb = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)
    pa, pb = (list(csv.DictReader(open(tmp_path / d / "predictions_fold0.csv")))
              for d in ("one", "two"))
    for ra, rb in zip(pa, pb, strict=True):
        assert ra["slide_id"] == rb["slide_id"] and ra["pred"] == rb["pred"]
        assert abs(float(ra["prob_tumor"]) - float(rb["prob_tumor"])) < 1e-5
    ha, hb = (list(csv.DictReader(open(tmp_path / d / "metrics.csv"))) for d in ("one", "two"))
    for ra, rb in zip(ha, hb, strict=True):
        if ra["train_loss"]:
            assert abs(float(ra["train_loss"]) - float(rb["train_loss"])) < 1e-5
    ma, mb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert ma["pooled"]["metrics"]["auroc"] == mb["pooled"]["metrics"]["auroc"]


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.mark.parametrize("device", DEVICES)
def test_stop_request_then_resume_in_process(split_bags: Path, tmp_path: Path, device: str
                                             ) -> None:
    """Stop (as on SIGTERM) after an epoch, resume, and match an uninterrupted run.

    On CUDA the bags are preloaded on the GPU, training is bf16, and the checkpoint is
    loaded with map_location=cuda (RNG states must come back to the host).
    """
    from gigamil.cluster.checkpoint import CheckpointManager
    from gigamil.errors import TrainingInterrupted
    from gigamil.mil.fold import StopRequest
    from gigamil.mil.train import train

    extra = dict(device=device, preload=True, precision="bf16") if device == "cuda" else {}
    dev = torch.device(device)

    def go(out: Path, resume: bool, stop: StopRequest | None = None, on_epoch=None) -> dict:
        cfg = _cfg(split_bags, out, epochs=3, batch_size=4, early_stop=None, **extra)
        ckpts = lambda k: CheckpointManager(out / "checkpoints" / f"fold{k}")  # noqa: E731
        return train(cfg, ckpts, dev, resume=resume, stop=stop, on_epoch=on_epoch)

    go(tmp_path / "ref", False)
    stop = StopRequest()
    with pytest.raises(TrainingInterrupted, match="--resume auto"):
        go(tmp_path / "run", False, stop,
           lambda e: stop.request("SIGTERM", True) if e["epoch"] == 1 else None)
    go(tmp_path / "run", True)
    wa, wb = _final_weights(tmp_path / "ref"), _final_weights(tmp_path / "run")
    for k in wa:
        if device == "cpu":
            assert torch.equal(wa[k], wb[k]), k
        else:  # GPU kernels may reorder sums
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)


def test_an_undefined_validation_monitor_still_leaves_a_model(split_bags: Path,
                                                              tmp_path: Path) -> None:
    """Bug: with a one-class validation split the AUROC monitor is NaN every epoch, no
    epoch 'improved', no best.pt was written and the fold failed after training."""
    import shutil

    feats = tmp_path / "bags"
    shutil.copytree(split_bags, feats)
    rows = list(csv.DictReader(open(feats / "labels.csv")))
    for r in rows:  # validation: normal slides only
        if r["split"] == "val" and r["label"] == "tumor":
            r["split"] = "train"
        elif r["split"] == "train" and r["label"] == "normal" and \
                sum(x["split"] == "val" for x in rows) < 4:
            r["split"] = "val"
    with open(feats / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert {r["label"] for r in rows if r["split"] == "val"} == {"normal"}
    summary = run_training(_cfg(feats, tmp_path / "run", monitor="auroc", epochs=3,
                                batch_size=4))
    assert summary["complete"] and summary["folds"]["0"]["best_epoch"] == 2
    assert (tmp_path / "run" / "checkpoints/fold0/best.pt").exists()
