"""Inference: ONNX parity, predictions on Ray and in one process, faults, heatmaps."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gigamil.cli.main import app
from gigamil.errors import UsageError
from gigamil.layout import ExtractDir
from gigamil.mil.export import PARITY_LENGTHS, OnnxMIL, export_onnx
from gigamil.mil.infer_config import InferConfig
from gigamil.mil.models import create_model
from gigamil.synth.slides import make_cohort

runner = CliRunner()


def _state(name: str, dim: int = 24, classes: int = 3) -> dict:
    torch.manual_seed(0)
    model = create_model(name, in_dim=dim, n_classes=classes)
    return {"model": model.state_dict(), "epoch": 0,
            "meta": {"model": name, "model_options": {}, "in_dim": dim,
                     "classes": [f"c{k}" for k in range(classes)], "evidential": False,
                     "fold": 0}}


@pytest.mark.parametrize("name", ["abmil", "abmil_gated", "clam_sb", "clam_mb", "mean", "max"])
def test_onnx_matches_torch_at_every_bag_length(name: str, tmp_path: Path) -> None:
    state = _state(name)
    report = export_onnx(state, tmp_path / "m.onnx")
    assert report["max_abs_diff"] < 1e-5 and report["lengths"] == list(PARITY_LENGTHS)
    onnx_model = OnnxMIL(tmp_path / "m.onnx")
    assert onnx_model.meta["model"] == name
    from gigamil.mil.predict import load_model

    model, _ = load_model(state)
    for n in (3, 250, 1000):  # lengths other than those checked at export
        x = np.random.default_rng(n).normal(size=(n, 24)).astype(np.float32)
        probs, attention = onnx_model(x)
        with torch.no_grad():
            out = model(torch.from_numpy(x)[None])
        np.testing.assert_allclose(probs, torch.softmax(out.logits, -1)[0].numpy(), atol=1e-5)
        ref = out.attention if out.attention.dim() == 2 else out.attention.mean(1)
        np.testing.assert_allclose(attention, ref[0].numpy(), atol=1e-5)


def test_a_model_without_dynamic_length_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not export with a dynamic bag length"):
        export_onnx(_state("transmil"), tmp_path / "t.onnx")
    assert not (tmp_path / "t.onnx").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """6 synthetic slides → extract → embed (tiny-cnn) → a 2-fold run."""
    root = tmp_path_factory.mktemp("infer")
    slides = root / "slides"
    make_cohort(slides, n=6, width=4096, height=3072, seed=11, workers=1)
    steps = [
        ["extract", str(slides), "--out", str(root / "data"), "--mpp", "1.0", "--patch-size",
         "128", "--workers", "1"],
        ["embed", str(root / "data"), "--encoder", "tiny-cnn", "--workers", "0", "--device",
         "cpu"],
        ["train", "--features", str(root / "data/features/tiny-cnn"), "--labels",
         str(slides / "labels.csv"), "--out", str(root / "run"), "--folds", "2", "--epochs",
         "3", "--batch-size", "2", "--bootstrap", "20", "--val-frac", "0"],
    ]
    for args in steps:
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    return {"slides": slides, "run": root / "run", "root": root}


def _preds(out: Path) -> dict[str, dict]:
    return {r["slide_id"]: r for r in csv.DictReader(open(out / "predictions.csv"))}


@pytest.mark.slow
def test_ray_and_one_process_agree_and_reruns_skip(trained: dict[str, Path], tmp_path: Path
                                                   ) -> None:
    args = ["infer", str(trained["slides"]), "--run", str(trained["run"])]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--ray-address", "none",
                              "--heatmaps"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--workers", "2"])
    assert res.exit_code == 0, res.output
    a, b = _preds(tmp_path / "a"), _preds(tmp_path / "b")
    assert sorted(a) == [f"s{i:03d}" for i in range(6)] and a.keys() == b.keys()
    for sid in a:
        assert abs(float(a[sid]["prob_tumor"]) - float(b[sid]["prob_tumor"])) < 1e-6
        assert int(a[sid]["n_patches"]) > 0 and a[sid]["model"].endswith("torch")
    assert len(list((tmp_path / "a" / "heatmaps").glob("*.png"))) == 6

    for d in ("a", "b"):  # the resolved settings are kept, without any directory in them
        text = (tmp_path / d / "infer_config.json").read_text()
        assert str(trained["root"]) not in text and str(tmp_path) not in text
    pipeline = json.loads((tmp_path / "b" / "infer_config.json").read_text())["pipeline"]
    assert pipeline["engine"] == "ray" and pipeline["predictors"] == 2
    assert pipeline["patches_encoded"] == sum(int(r["n_patches"]) for r in b.values())
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--workers", "2"])
    assert res.exit_code == 0 and "6 already done, 0 predicted" in " ".join(res.output.split())


def test_inference_in_this_process_leaves_the_callers_environment(
        trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug once: in-process inference exported OMP_NUM_THREADS=1 for the rest of the
    caller's life, so a SLURM test cluster started later saw one CPU (GNU nproc honours it)
    and its jobs pended for ever."""
    import os

    from gigamil.cluster.infer import infer_slides_local
    from gigamil.cluster.resources import THREAD_ENV_VARS
    from gigamil.mil.infer_spec import InferenceSpec
    from gigamil.wsi.discovery import discover_slides

    for var in THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    spec = InferenceSpec.from_run(trained["run"])
    rows, fails, _ = infer_slides_local(discover_slides([trained["slides"]])[:1], spec,
                                        tmp_path / "p")
    assert len(rows) == 1 and not fails
    assert not [v for v in THREAD_ENV_VARS if v in os.environ]


@pytest.mark.slow
def test_slides_cut_in_many_chunks_on_ray_match_one_process(
        trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks read by separate tasks and batched by the actor across chunk and slide
    borders give the one-process result: same coords in the same order, same scores;
    and the pipeline never holds more chunks than its bound."""
    import dataclasses

    from gigamil.cluster.infer import infer_slides_local
    from gigamil.cluster.ray import infer_slides
    from gigamil.mil.infer import plan_inference
    from gigamil.mil.infer_spec import InferenceSpec
    from gigamil.wsi.discovery import discover_slides

    spec = InferenceSpec.from_run(trained["run"])
    paths = discover_slides([trained["slides"]])
    small = dataclasses.replace(spec, chunk_patches=8, batch_size=8)
    chunks = [len(plan_inference(p, spec.extract, 8).chunks) for p in paths]
    assert min(chunks) >= 3  # every slide is really cut up
    one, fails1, _ = infer_slides_local(paths, spec, tmp_path / "one")
    # a local Ray inside a SLURM job takes the job's CPUs, not every core of the node
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    ray_rows, fails2, stats = infer_slides(paths, small, tmp_path / "ray", workers=1)
    assert stats["cpus"] == 2
    assert not fails1 and not fails2
    assert stats["chunks_read"] == sum(chunks)
    assert stats["patches_encoded"] == sum(r["n_patches"] for r in one)
    assert 0 < stats["peak_chunks_held"] <= stats["max_chunks_held"] == 2 + 2
    by_id = {r["slide_id"]: r for r in ray_rows}
    for r in one:
        assert abs(r["prob_tumor"] - by_id[r["slide_id"]]["prob_tumor"]) < 1e-5
        a = np.load(tmp_path / "one" / "slides" / f"{r['slide_id']}.npz")
        b = np.load(tmp_path / "ray" / "slides" / f"{r['slide_id']}.npz")
        np.testing.assert_array_equal(a["coords"], b["coords"])
        np.testing.assert_allclose(a["attention"], b["attention"], atol=1e-5)


def test_encoding_chunks_together_equals_encoding_them_apart(trained: dict[str, Path]) -> None:
    from gigamil.mil.infer import SlidePredictor
    from gigamil.mil.infer_spec import InferenceSpec

    predictor = SlidePredictor(InferenceSpec.from_run(trained["run"], InferConfig(batch_size=8)))
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 255, (n, 128, 128, 3), dtype=np.uint8) for n in (5, 13, 1)]
    together = predictor.encode(chunks)
    assert [len(f) for f in together] == [5, 13, 1]
    for chunk, feats in zip(chunks, together):
        np.testing.assert_allclose(predictor.encode([chunk])[0], feats, atol=1e-5)


@pytest.mark.slow
def test_onnx_engine_matches_torch(trained: dict[str, Path], tmp_path: Path) -> None:
    args = ["infer", str(trained["slides"]), "--run", str(trained["run"]), "--ray-address",
            "none"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "t")]).exit_code == 0
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--engine", "onnx"])
    assert res.exit_code == 0, res.output
    t, o = _preds(tmp_path / "t"), _preds(tmp_path / "o")
    for sid in t:
        assert abs(float(t[sid]["prob_tumor"]) - float(o[sid]["prob_tumor"])) < 1e-5
        assert o[sid]["model"].endswith(":onnx")


@pytest.mark.slow
def test_a_corrupt_slide_is_a_failure_row_and_the_rest_go_on(trained: dict[str, Path],
                                                             tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    shutil.copytree(trained["slides"], slides)
    (slides / "s001.svs").write_bytes((slides / "s001.svs").read_bytes()[:5000])
    res = runner.invoke(app, ["infer", str(slides), "--run", str(trained["run"]), "--out",
                              str(tmp_path / "p"), "--ray-address", "none"])
    assert res.exit_code == 1
    fails = list(csv.DictReader(open(tmp_path / "p" / "failures.csv")))
    assert [f["slide_id"] for f in fails] == ["s001"] and fails[0]["error"]
    assert sorted(_preds(tmp_path / "p")) == ["s000", "s002", "s003", "s004", "s005"]


@pytest.mark.slow
def test_a_worker_killed_mid_slide_is_retried_and_counted_once(trained: dict[str, Path],
                                                               tmp_path: Path) -> None:
    import ray

    from gigamil.cluster.ray import infer_slides
    from gigamil.mil.infer_outputs import write_outputs
    from gigamil.mil.infer_spec import InferenceSpec
    from gigamil.wsi.discovery import discover_slides

    spec = InferenceSpec.from_run(trained["run"])
    paths = discover_slides([trained["slides"]])
    actors: list = []
    killed: list[int] = []

    def on_result(_res: dict) -> None:
        if not killed:  # after the first result: the other actor is mid-slide, or about to be
            pid = ray.get(actors[1].pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    out = tmp_path / "p"
    rows, failures, _ = infer_slides(paths, spec, out, workers=2, on_workers=actors.extend,
                                     on_result=on_result)
    write_outputs(out, spec, failures)
    assert killed and not failures
    ids = [r["slide_id"] for r in csv.DictReader(open(out / "predictions.csv"))]
    assert sorted(ids) == [f"s{i:03d}" for i in range(6)]  # each exactly once


@pytest.mark.slow
def test_infer_joins_a_running_ray_cluster(trained: dict[str, Path], tmp_path: Path,
                                           ) -> None:
    """`--ray-address host:port` joins a cluster started apart (as the infer sbatch
    template does with `ray start --head`, which turns on token auth), and leaves it
    running."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"127.0.0.1:{port}"
        probe = [sys.executable, "-c", f"import ray; ray.init(address='{address}'); "
                 "print(int(ray.cluster_resources()['CPU']))"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = subprocess.run(probe, capture_output=True, text=True,
                                  env={**os.environ, "RAY_AUTH_MODE": "token"})
            if done.returncode == 0:
                break
            time.sleep(1)
        assert done.returncode == 0 and done.stdout.split()[-1] == "2", done.stderr[-2000:]
        # a process of its own, as on a cluster (Ray reads its auth mode when imported)
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
        res = subprocess.run([sys.executable, "-m", "gigamil", "infer", str(trained["slides"]),
                              "--run", str(trained["run"]), "--out", str(tmp_path / "p"),
                              "--ray-address", address], capture_output=True, text=True,
                             env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert len(_preds(tmp_path / "p")) == 6
        assert head.poll() is None  # the cluster is the user's: still up
        stats = json.loads((tmp_path / "p" / "infer_config.json").read_text())["pipeline"]
        assert stats["ray_address"] == address and stats["cpus"] == 2
        # and `local` starts its own cluster even with that one running (ray.init() alone
        # would have joined it, and refused the CPU count)
        res2 = runner.invoke(app, ["infer", str(trained["slides"]), "--run",
                                   str(trained["run"]), "--out", str(tmp_path / "q"),
                                   "--ray-address", "local", "--cpus", "1"])
        assert res2.exit_code == 0, res2.output
        stats = json.loads((tmp_path / "q" / "infer_config.json").read_text())["pipeline"]
        assert stats["cpus"] == 1
    finally:
        head.terminate()
        head.wait(timeout=60)


@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_slides_and_a_rerun_does_the_rest(trained: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    out = tmp_path / "p"
    cmd = [sys.executable, "-m", "gigamil", "infer", str(trained["slides"]), "--run",
           str(trained["run"]), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list((out / "slides").glob("*.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr
    kept = _preds(out)  # the CSV is written on the way out, with every finished slide
    assert 1 <= len(kept) <= 6
    for sid in kept:  # whatever was finished is whole
        assert len(np.load(out / "slides" / f"{sid}.npz")["coords"]) == int(kept[sid]["n_patches"])
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(kept)} already done, {6 - len(kept)} predicted" in " ".join(again.stderr.split())
    assert sorted(_preds(out)) == [f"s{i:03d}" for i in range(6)]


def _reader_pid() -> int | None:
    """A Ray worker process that is running a read task right now, if any."""
    for pid in os.listdir("/proc"):
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::") and "_read" in cmd.split("\0")[0]:
            return int(pid)
    return None


@pytest.mark.slow
def test_a_reader_killed_mid_chunk_is_retried_and_each_slide_written_once(
        trained: dict[str, Path], tmp_path: Path) -> None:
    import dataclasses
    import threading
    import time

    from gigamil.cluster.ray import infer_slides
    from gigamil.mil.infer_outputs import write_outputs
    from gigamil.mil.infer_spec import InferenceSpec
    from gigamil.wsi.discovery import discover_slides

    spec = dataclasses.replace(InferenceSpec.from_run(trained["run"]), chunk_patches=8)
    paths = discover_slides([trained["slides"]])
    killed: list[int] = []
    done = threading.Event()

    def killer() -> None:  # from the start: the reads may all be over by the first result
        while not killed and not done.is_set():
            pid = _reader_pid()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.001)

    out = tmp_path / "p"
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        rows, failures, stats = infer_slides(paths, spec, out, workers=1, cpus=2)
    finally:
        done.set()
        thread.join()
    write_outputs(out, spec, failures)
    assert killed and not failures
    ids = [r["slide_id"] for r in csv.DictReader(open(out / "predictions.csv"))]
    assert sorted(ids) == [f"s{i:03d}" for i in range(6)]  # each exactly once
    assert stats["patches_encoded"] == sum(r["n_patches"] for r in rows)


def test_export_and_heatmap_commands(trained: dict[str, Path], tmp_path: Path) -> None:
    res = runner.invoke(app, ["export", str(trained["run"]), "--onnx", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0 and "max |onnx − torch|" in res.output
    res = runner.invoke(app, ["heatmap", str(trained["slides"] / "s000.svs"), "--run",
                              str(trained["run"]), "--out", str(tmp_path / "h.png")])
    assert res.exit_code == 0, res.output
    import cv2

    img = cv2.imread(str(tmp_path / "h.png"))
    assert img is not None and img.shape[0] > 50 and img.shape[1] > 100


def test_patch_probabilities_are_each_patch_scored_as_a_bag_of_one(trained: dict[str, Path]
                                                                   ) -> None:
    from gigamil.mil.infer import SlidePredictor
    from gigamil.mil.infer_spec import InferenceSpec
    from gigamil.mil.predict import load_model

    spec = InferenceSpec.from_run(trained["run"], InferConfig(heatmap_values="probability"))
    predictor = SlidePredictor(spec)
    bag = np.random.default_rng(1).normal(size=(9, predictor.encoder.feature_dim))
    bag = bag.astype(np.float32)
    scores = predictor.mil([bag[:4], bag[4:]])
    assert scores.patch_probs is not None and scores.patch_probs.shape == (9, 2)
    expected = []
    for path in spec.model_files:
        model, _ = load_model(torch.load(path, map_location="cpu", weights_only=True))
        with torch.no_grad():
            expected.append([torch.softmax(model(torch.from_numpy(bag[i:i + 1])[None]).logits,
                                           -1)[0].numpy() for i in range(9)])
    np.testing.assert_allclose(scores.patch_probs, np.mean(expected, 0), atol=1e-5)
    assert SlidePredictor(InferenceSpec.from_run(trained["run"])).mil([bag]).patch_probs is None


def test_probability_heatmaps_from_infer_and_heatmap(trained: dict[str, Path], tmp_path: Path
                                                     ) -> None:
    res = runner.invoke(app, ["heatmap", str(trained["slides"] / "s000.svs"), "--run",
                              str(trained["run"]), "--out", str(tmp_path / "h.png"),
                              "--heatmap-values", "probability", "--heatmap-class", "tumor"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "h.png").stat().st_size > 1000
    res = runner.invoke(app, ["heatmap", str(trained["slides"] / "s000.svs"), "--run",
                              str(trained["run"]), "--out", str(tmp_path / "x.png"),
                              "--heatmap-values", "probability", "--heatmap-class", "cancer"])
    assert res.exit_code != 0 and "is not one of the run's classes" in res.output
    assert not (tmp_path / "x.png").exists()
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(trained["slides"] / "s001.svs", one)
    res = runner.invoke(app, ["infer", str(one), "--run", str(trained["run"]), "--out",
                              str(tmp_path / "p"), "--ray-address", "none", "--heatmaps",
                              "--heatmap-values", "probability"])
    assert res.exit_code == 0, res.output
    data = np.load(tmp_path / "p" / "slides" / "s001.npz")
    assert data["probability"].shape == (len(data["coords"]), 2)
    np.testing.assert_allclose(data["probability"].sum(1), 1, atol=1e-5)
    assert (tmp_path / "p" / "heatmaps" / "s001.png").exists()


def test_a_damaged_tile_leaves_out_its_patches_and_the_slide_is_predicted(
        trained: dict[str, Path], tmp_path: Path) -> None:
    """infer reads patches through extraction's reader: the unreadable ones are left out."""
    import tifffile

    from gigamil.synth.slides import damage_tile

    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(trained["slides"] / "s002.svs", slides / "s002.svs")
    with tifffile.TiffFile(slides / "s002.svs") as tif:
        level1 = next(i for i, p in enumerate(tif.pages) if p.is_tiled and i > 0)
        n = len(tif.pages[level1].dataoffsets)
    for k in range(n // 3, n // 3 + 4):  # the run reads 1 µm/px from level 1
        damage_tile(slides / "s002.svs", level1, k, "garbage")
    clean = runner.invoke(app, ["infer", str(trained["slides"] / "s002.svs"), "--run",
                                str(trained["run"]), "--out", str(tmp_path / "a"),
                                "--ray-address", "none"])
    hurt = runner.invoke(app, ["infer", str(slides), "--run", str(trained["run"]), "--out",
                               str(tmp_path / "b"), "--ray-address", "none"])
    assert clean.exit_code == 0 and hurt.exit_code == 0, hurt.output
    a, b = _preds(tmp_path / "a")["s002"], _preds(tmp_path / "b")["s002"]
    assert 0 < int(b["n_patches"]) < int(a["n_patches"])
    assert "unreadable=" in b.get("qc_rejected", "") or "unreadable" in json.dumps(b)


def test_infer_pseudonymized_and_slide_lists(trained: dict[str, Path], tmp_path: Path) -> None:
    """infer finds slides as extract does (lists; a missing file is a failure row), and
    with --pseudonymize no file name reaches predictions, failures, jsons or heatmaps."""
    slides = tmp_path / "PATIENT_SMITH"
    slides.mkdir()
    shutil.copy(trained["slides"] / "s003.svs", slides / "smith_john.svs")
    (slides / "broken_doe.svs").write_bytes(b"not a slide" * 100)
    listing = tmp_path / "cohort.csv"
    listing.write_text("path\nPATIENT_SMITH/smith_john.svs\nPATIENT_SMITH/broken_doe.svs\n"
                       "PATIENT_SMITH/missing_roe.svs\n")
    out, mapping = tmp_path / "preds", tmp_path / "secret" / "map.json"
    res = runner.invoke(app, ["infer", str(listing), "--run", str(trained["run"]), "--out",
                              str(out), "--ray-address", "none", "--heatmaps", "--pseudonymize",
                              "--pseudonym-map", str(mapping)])
    assert res.exit_code == 1, res.output  # two inputs are not usable slides
    data = b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())
    for word in ("smith", "SMITH", "broken_doe", "missing_roe", str(tmp_path)):
        assert word.encode() not in data, word
        assert word not in res.output.replace(str(out), "OUT"), word  # OUT: the user's own
    entries = {e["original_id"]: e["slide_id"] for e in json.loads(mapping.read_text())["slides"]}
    preds = _preds(out)
    assert list(preds) == [entries["smith_john"]]
    fails = {f["slide_id"] for f in csv.DictReader(open(out / "failures.csv"))}
    assert fails == {entries["broken_doe"], entries["missing_roe"]}
    assert (out / "heatmaps" / f"{entries['smith_john']}.png").is_file()
    # the same slide, not pseudonymized, gets the same prediction under its own name
    plain = runner.invoke(app, ["infer", str(slides / "smith_john.svs"), "--run",
                                str(trained["run"]), "--out", str(tmp_path / "plain"),
                                "--ray-address", "none"])
    assert plain.exit_code == 0, plain.output
    assert _preds(tmp_path / "plain")["smith_john"]["pred"] == preds[entries["smith_john"]]["pred"]


def test_embed_from_slides_pseudonymized(trained: dict[str, Path], tmp_path: Path) -> None:
    slides = tmp_path / "PATIENT_SMITH"
    slides.mkdir()
    shutil.copy(trained["slides"] / "s003.svs", slides / "smith_john.svs")
    (slides / "broken_doe.svs").write_bytes(b"not a slide" * 100)
    out = tmp_path / "data"
    res = runner.invoke(app, ["embed", str(slides), "--from-slides", "--out", str(out),
                              "--encoder", "tiny-cnn", "--device", "cpu", "--mpp", "1.0",
                              "--patch-size", "128", "--pseudonymize"])
    assert res.exit_code == 1, res.output  # the broken slide
    mapping = ExtractDir(out).pseudonyms
    entries = {e["original_id"]: e["slide_id"] for e in json.loads(mapping.read_text())["slides"]}
    data = b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())
    for word in ("smith", "SMITH", "broken_doe", str(tmp_path)):
        assert word.encode() not in data, word
        assert word not in res.output.replace(str(out), "OUT"), word
    h5 = out / "features" / "tiny-cnn" / f"{entries['smith_john']}.h5"
    assert h5.is_file()
    again = runner.invoke(app, ["embed", str(slides), "--from-slides", "--out", str(out),
                                "--encoder", "tiny-cnn", "--device", "cpu", "--mpp", "1.0",
                                "--patch-size", "128", "--pseudonymize"])
    assert "1 skipped" in " ".join(again.output.split()), again.output


def test_survival_and_several_targets_predict_export_and_eval(trained: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """A run with a class, a survival and a regression head: infer writes each target's
    cells, the ONNX export keeps parity, eval scores and plots it."""
    labels = list(csv.DictReader(open(trained["slides"] / "labels.csv")))
    rows = []
    for i, r in enumerate(labels):
        rows.append({"slide_id": r["slide_id"], "label": r["label"], "os_time": 100 + 50 * i,
                     "os_event": i % 2 if i < 4 else 1, "tmb": "" if i == 5 else 3.5 * i})
    cohort = tmp_path / "cohort.csv"
    with open(cohort, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--features", str(trained["root"] / "data/features/tiny-cnn"),
                              "--labels", str(cohort), "--out", str(run), "--folds", "2",
                              "--epochs", "2", "--batch-size", "2", "--bootstrap", "10",
                              "--val-frac", "0", "--target", "label,os:survival,tmb:regression"])
    assert res.exit_code == 0, res.output
    preds = tmp_path / "preds"
    res = runner.invoke(app, ["infer", str(trained["slides"] / "s001.svs"), "--run", str(run),
                              "--out", str(preds), "--ray-address", "none", "--heatmaps"])
    assert res.exit_code == 0, res.output
    row = _preds(preds)["s001"]
    assert {"label_pred", "label_prob_tumor", "os_risk", "tmb_pred"} <= set(row), row
    assert np.isfinite(float(row["os_risk"])) and np.isfinite(float(row["tmb_pred"]))
    report = export_onnx(torch.load(run / "checkpoints/fold0/best.pt", weights_only=True),
                         tmp_path / "m.onnx")
    assert report["max_abs_diff"] < 1e-4, report
    res = runner.invoke(app, ["infer", str(trained["slides"] / "s001.svs"), "--run", str(run),
                              "--out", str(tmp_path / "o"), "--engine", "onnx",
                              "--ray-address", "none"])  # every head through onnxruntime
    assert res.exit_code == 0, res.output
    onnx_row = _preds(tmp_path / "o")["s001"]
    for k in ("label_prob_tumor", "os_risk", "tmb_pred"):
        assert float(onnx_row[k]) == pytest.approx(float(row[k]), rel=1e-4, abs=1e-5), k
    assert onnx_row["label_pred"] == row["label_pred"]
    res = runner.invoke(app, ["eval", str(run), "--bootstrap", "10", "--json"])
    assert res.exit_code == 0, res.output
    assert (run / "eval" / "km_os.png").is_file() and (run / "km_os.png").is_file()


def test_geojson_top_patches_and_slide_embeddings(trained: dict[str, Path], tmp_path: Path
                                                  ) -> None:
    import cv2
    import h5py

    from gigamil.mil.explain import read_patches, top_and_bottom
    from gigamil.mil.infer_spec import InferenceSpec

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(trained["slides"] / "s002.svs", one)
    out = tmp_path / "p"
    args = ["infer", str(one), "--run", str(trained["run"]), "--out", str(out),
            "--ray-address", "none", "--geojson", "--top-patches", "3"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    data = np.load(out / "slides" / "s002.npz")
    coords, attention = data["coords"], data["attention"]
    doc = json.loads((out / "geojson" / "s002.geojson").read_text())
    spec = InferenceSpec.from_run(trained["run"])
    size0 = None
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(coords)
    for feat, (x, y), a, p in zip(doc["features"], coords, attention, data["probability"]):
        props = feat["properties"]
        assert props["objectType"] == "detection"
        m = props["measurements"]
        assert m["attention"] == pytest.approx(float(a), rel=1e-5)
        assert m["P(normal)"] == pytest.approx(float(p[0]), rel=1e-5)
        assert m["P(tumor)"] == pytest.approx(float(p[1]), rel=1e-5)
        assert 0 <= m["attention rank"] <= 1
        ring = np.array(feat["geometry"]["coordinates"][0])
        assert tuple(ring[0]) == (x, y)  # level-0 pixels, as QuPath reads them
        size0 = ring[2, 0] - x
    assert size0 and size0 > 0
    # the montage's first tile is the highest-attention patch, read from the slide
    top, bottom = top_and_bottom(attention, 3)
    assert attention[top[0]] == attention.max() and attention[bottom[0]] == attention.min()
    sheet = cv2.imread(str(out / "top_patches" / "s002.png"))[..., ::-1]
    first = read_patches(one / "s002.svs", coords[top[:1]], size0, 128, spec.extract)[0]
    tile = sheet[30 + 18:30 + 18 + 128, 4:4 + 128]
    assert np.abs(tile.astype(int) - first.astype(int)).mean() < 2
    with h5py.File(out / "embeddings.h5") as f:  # each fold model's pooled slide vector
        assert [s.decode() for s in f["slide_id"][:]] == ["s002"]
        emb = f["embedding"][:]
        assert emb.shape[:2] == (1, 2) and np.isfinite(emb).all()
        np.testing.assert_array_equal(emb[0], data["slide_embedding"])
    assert not (out / "heatmaps").exists()
    res = runner.invoke(app, [*args, "--heatmaps"])  # a new output: the slide is redone
    assert res.exit_code == 0, res.output
    assert (out / "heatmaps" / "s002.png").exists()
    for k in range(2):  # training saved the test folds' slide vectors too
        ids = [r["slide_id"] for r in csv.DictReader(open(trained["run"] /
                                                          f"predictions_fold{k}.csv"))]
        with h5py.File(trained["run"] / f"embeddings_fold{k}.h5") as f:
            assert [s.decode() for s in f["slide_id"][:]] == ids
            assert f["embedding"].shape[0] == len(ids)
