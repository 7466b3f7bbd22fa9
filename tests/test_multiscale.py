"""Multi-scale features and the hierarchical model: embed --scales all, hier_abmil."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gigamil.cli.main import app
from gigamil.cluster.launch import run_training
from gigamil.errors import UsageError
from gigamil.mil.models import create_model
from gigamil.mil.train_config import TrainConfig
from gigamil.synth.bags import make_multiscale_bags
from gigamil.synth.slides import make_cohort
from gigamil.wsi.features import parent_index, read_scales

runner = CliRunner()


def test_hier_abmil_pools_within_regions_then_across_them() -> None:
    torch.manual_seed(0)
    model = create_model("hier_abmil", in_dim=8, n_classes=2, dropout=0.0).eval()
    rng = np.random.default_rng(0)
    coarse = rng.normal(size=(3, 4)).astype(np.float32)
    region = np.array([0, 0, 1, 2, 2, 2, 1])
    x = torch.from_numpy(np.concatenate([rng.normal(size=(7, 4)).astype(np.float32),
                                         coarse[region]], 1))[None]
    with torch.no_grad():
        out = model(x)
        assert out.attention.shape == (1, 7)
        assert float(out.attention.sum()) == pytest.approx(1.0, abs=1e-6)
        perm = torch.randperm(7)  # a bag is a set
        torch.testing.assert_close(model(x[:, perm]).logits, out.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x[:, perm]).attention, out.attention[:, perm],
                                   atol=1e-6, rtol=0)
        padded = torch.cat([x, torch.zeros(1, 3, 8)], 1)  # in a batch with a longer bag
        batch = torch.cat([padded, torch.randn(1, 10, 8)])
        mask = torch.ones(2, 10, dtype=torch.bool)
        mask[0, 7:] = False
        got = model(batch, mask)
        torch.testing.assert_close(got.logits[0], out.logits[0], atol=1e-5, rtol=0)
        assert float(got.attention[0, 7:].abs().sum()) == 0.0


def test_parent_index_finds_the_covering_coarse_patch() -> None:
    fine = np.array([[0, 0], [256, 0], [1024, 256], [1280, 1280], [3000, 0]])
    coarse = np.array([[0, 0], [1024, 0], [1024, 1024]])
    np.testing.assert_array_equal(parent_index(fine, 256.0, coarse, 1024.0), [0, 0, 1, 2, -1])


@pytest.mark.slow
def test_hier_abmil_finds_what_single_scale_abmil_cannot(tmp_path: Path) -> None:
    """The label lives only in fine foci seen with their region: abmil on the fine patches
    scores chance on the same folds, hier_abmil near perfect."""
    torch.set_num_threads(1)
    bags = tmp_path / "bags"
    make_multiscale_bags(bags, n_slides=64, signal=2.0, seed=0)
    auroc = {}
    for model in ("hier_abmil", "abmil"):
        cfg = TrainConfig(features=str(bags), labels=str(bags / "labels.csv"),
                          out=str(tmp_path / model), model=model, folds=2, epochs=30, lr=2e-3,
                          batch_size=8, bootstrap=20, early_stop=None, preload=True)
        auroc[model] = run_training(cfg)["pooled"]["metrics"]["auroc"]["value"]
    assert (tmp_path / "hier_abmil/splits.csv").read_text() == \
        (tmp_path / "abmil/splits.csv").read_text()  # the same folds
    assert auroc["hier_abmil"] >= 0.9 and auroc["abmil"] <= 0.7, auroc


@pytest.mark.slow
def test_embed_scales_all_train_hier_and_eval(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    make_cohort(slides, n=6, width=3072, height=2048, seed=5, workers=1)
    data = tmp_path / "data"
    res = runner.invoke(app, ["extract", str(slides), "--out", str(data), "--mpp", "1.0,4.0",
                              "--patch-size", "64", "--workers", "1"])
    assert res.exit_code == 0, res.output
    embed = ["embed", str(data), "--encoder", "tiny-cnn", "--workers", "0", "--device", "cpu"]
    res = runner.invoke(app, [*embed, "--scales", "all"])
    assert res.exit_code == 0, res.output
    feats = data / "features" / "tiny-cnn"
    for h5 in sorted(feats.glob("*.h5")):
        with h5py.File(h5) as f:
            fine = f["coords"][:]
            fine_size = float(f["coords"].attrs["patch_size_level0"])
        (sc,) = read_scales(h5)
        assert sc.mpp == 4.0 and len(sc.features) == len(sc.coords) > 0
        assert sc.size_level0 == pytest.approx(4 * fine_size, rel=1e-6)
        has = sc.parent >= 0
        assert has.mean() > 0.5
        centre = fine[has] + fine_size / 2  # each parent's square holds its patch's centre
        top_left = sc.coords[sc.parent[has]]
        assert ((centre >= top_left) & (centre < top_left + sc.size_level0)).all()
    res = runner.invoke(app, [*embed, "--scales", "all"])  # a rerun skips every slide
    assert res.exit_code == 0 and "0 embedded" in res.output, res.output
    labels = slides / "labels.csv"
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--features", str(feats), "--labels", str(labels),
                              "--out", str(run), "--model", "hier_abmil", "--folds", "2",
                              "--epochs", "2", "--batch-size", "2", "--bootstrap", "10",
                              "--val-frac", "0"])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["model"] == "hier_abmil"
    res = runner.invoke(app, ["eval", str(run), "--features", str(feats), "--labels",
                              str(labels), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "ev" / "predictions.csv")))
    assert len(rows) == 6
    res = runner.invoke(app, ["infer", str(slides), "--run", str(run), "--out",
                              str(tmp_path / "p"), "--ray-address", "none"])
    assert res.exit_code != 0 and "--scales all" in " ".join(res.output.split())
    res = runner.invoke(app, [*embed, "--overwrite"])  # one scale only: hier refuses it
    assert res.exit_code == 0, res.output
    with pytest.raises(UsageError, match="holds one scale"):
        run_training(TrainConfig(features=str(feats), labels=str(labels),
                                 out=str(tmp_path / "run2"), model="hier_abmil", folds=2,
                                 epochs=1))


def test_hier_abmil_is_refused_by_the_onnx_export(tmp_path: Path) -> None:
    from gigamil.mil.export import export_onnx

    torch.manual_seed(0)
    model = create_model("hier_abmil", in_dim=24, n_classes=2)
    state = {"model": model.state_dict(), "epoch": 0,
             "meta": {"model": "hier_abmil", "model_options": {}, "in_dim": 24,
                      "classes": ["a", "b"], "evidential": False, "fold": 0}}
    with pytest.raises(UsageError, match="does not export with a dynamic bag length"):
        export_onnx(state, tmp_path / "h.onnx")
    assert not (tmp_path / "h.onnx").exists()
