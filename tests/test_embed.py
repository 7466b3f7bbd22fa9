from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import lmdb
import numpy as np
import pytest
import torch
import typer

from gigamil.cli.options import parse_shard
from gigamil.cluster.extract_cohort import extract_slides
from gigamil.errors import UsageError
from gigamil.mil.embed import embed_stores, select_share
from gigamil.mil.embed_config import EmbedConfig, EmbedResult
from gigamil.mil.encoders import create_encoder, list_encoders
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.features import read_bag, write_bag
from gigamil.wsi.store import PatchStore


@pytest.fixture(scope="module")
def data(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embed_data")
    cfg = ExtractConfig(mpp=1.0, patch_size=64, encoding="jpeg")
    assert all(r.status == "ok" for r in extract_slides([cohort], out, cfg, workers=2))
    return out


def _copy(data: Path, dst: Path) -> Path:
    shutil.copytree(data / "patches", dst / "patches",
                    ignore=shutil.ignore_patterns(".*"))
    return dst


@pytest.mark.parametrize("workers", [0, 1])
def test_features_equal_a_direct_forward(data: Path, tmp_path: Path, workers: int) -> None:
    """fp32 on CPU: the pipeline's features equal the model applied to the stored patches."""
    d = _copy(data, tmp_path)
    enc = create_encoder("tiny-vit")
    w = tmp_path / "w.safetensors"  # one random init, shared by the pipeline and the reference
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(w))
    cfg = EmbedConfig(encoder="tiny-vit", weights=str(w), batch_size=17, workers=workers,
                      device="cpu", overwrite=True)
    assert [r.status for r in embed_stores(d, cfg)] == ["ok"] * 4
    for sid in ("s000", "s003"):
        bag = read_bag(d / "features" / "tiny-vit" / f"{sid}.h5")
        with PatchStore(d / "patches" / f"{sid}.lmdb") as store:
            x = torch.from_numpy(np.stack(list(store)))
            np.testing.assert_array_equal(bag.coords, store.coords)
        with torch.no_grad():
            ref = enc.model(enc.preprocess(x)).numpy()
        np.testing.assert_allclose(bag.features, ref, atol=1e-5, rtol=0)
        assert bag.attrs["encoder_sha256"] == hashlib.sha256(w.read_bytes()).hexdigest()


def test_h5_layout_is_what_clam_and_trident_read(data: Path, tmp_path: Path) -> None:
    d = _copy(data, tmp_path)
    embed_stores(d, EmbedConfig(encoder="tiny-cnn", workers=0, device="cpu"))
    path = d / "features" / "tiny-cnn" / "s001.h5"
    with h5py.File(path, "r") as f:
        # CLAM's Dataset_All_Bags / TRIDENT's readers: f['features'][:], f['coords'][:]
        assert f["features"].dtype == np.float32 and f["features"].ndim == 2
        assert f["coords"].dtype == np.int64 and f["coords"].shape[1] == 2
        assert f["features"].shape[0] == f["coords"].shape[0] > 0
        assert f["features"].chunks[0] > 1  # row blocks, not single rows
        attrs = dict(f["coords"].attrs)
    for key in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
                "overlap", "name", "level0_width", "level0_height", "mpp", "patch_size_um",
                "encoder", "encoder_sha256", "schema_version"):
        assert key in attrs, key
    assert attrs["patch_size"] == 64 and attrs["mpp"] == 1.0 and attrs["encoder"] == "tiny-cnn"


def test_reader_opens_clam_trident_and_stamp_files(tmp_path: Path) -> None:
    feats = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    coords = np.arange(10, dtype=np.int64).reshape(5, 2)
    with h5py.File(tmp_path / "clam.h5", "w") as f:
        f["features"] = feats
        f["coords"] = coords
        f["coords"].attrs["patch_level"] = 0
        f["coords"].attrs["patch_size"] = 256
    with h5py.File(tmp_path / "trident.h5", "w") as f:
        f["features"] = feats
        f["coords"] = coords
        f["coords"].attrs["level0_magnification"] = 40
    with h5py.File(tmp_path / "stamp.h5", "w") as f:
        f["feats"] = feats
        f["coords"] = coords.astype(np.float64)
    for name, layout in (("clam", "clam"), ("trident", "trident"), ("stamp", "stamp")):
        bag = read_bag(tmp_path / f"{name}.h5")
        assert bag.layout == layout
        np.testing.assert_array_equal(bag.features, feats)
        np.testing.assert_array_equal(bag.coords, coords)
    write_bag(tmp_path / "ours.h5", feats, coords, {"encoder": "x"})
    assert read_bag(tmp_path / "ours.h5").layout == "gigamil"


def test_rerun_skips_and_shards_split_the_slides(data: Path, tmp_path: Path) -> None:
    d = _copy(data, tmp_path)
    cfg = EmbedConfig(encoder="tiny-cnn", workers=0, device="cpu")
    assert [r.status for r in embed_stores(d, cfg)] == ["ok"] * 4
    assert [r.status for r in embed_stores(d, cfg)] == ["skipped"] * 4
    paths = [Path(f"s{i:03d}.lmdb") for i in range(10)]
    shares = [select_share(paths, (k, 3)) for k in (0, 1, 2)]  # 0-based, as SLURM array task ids
    assert sorted(p for s in shares for p in s) == paths  # disjoint, complete, deterministic
    assert shares[0] == select_share(list(reversed(paths)), (0, 3))
    assert parse_shard("3/16") == (3, 16)
    for bad in ("16/16", "x/2", "-1/4"):
        with pytest.raises(typer.BadParameter):
            parse_shard(bad)
    with pytest.raises(UsageError):
        EmbedConfig(shard=(16, 16))


def test_corrupt_patch_is_skipped_and_reported(data: Path, tmp_path: Path) -> None:
    d = _copy(data, tmp_path)
    path = d / "patches" / "s002.lmdb"
    with PatchStore(path) as store:
        n = len(store)
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"00000003", b"\xff\xd8 not a jpeg")
    env.close()
    results = {r.slide_id: r for r in embed_stores(d, EmbedConfig(encoder="tiny-cnn", workers=1,
                                                                  device="cpu"))}
    assert results["s002"].status == "ok" and results["s002"].n_bad == 1
    assert "corrupt" in results["s002"].error
    bag = read_bag(d / "features" / "tiny-cnn" / "s002.h5")
    assert len(bag) == n - 1 and np.isfinite(bag.features).all()
    with PatchStore(path) as store:
        assert not (bag.coords == store.coords[3]).all(axis=1).any()  # its row is gone


def test_checkpoint_wrappers_and_prefixes_load(tmp_path: Path) -> None:
    ref = create_encoder("tiny-cnn")
    sd = ref.model.state_dict()
    x = torch.zeros(2, 64, 64, 3, dtype=torch.uint8) + 120
    want = ref.model(ref.preprocess(x)).detach()
    for i, obj in enumerate([
        {"model": sd},
        {"teacher": {f"backbone.{k}": v for k, v in sd.items()} | {"head.mlp.weight": torch.ones(2)}},
        {f"_orig_mod.{k}": v for k, v in sd.items()},
        {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ]):
        torch.save(obj, tmp_path / f"w{i}.pth")
        enc = create_encoder("tiny-cnn", tmp_path / f"w{i}.pth")
        torch.testing.assert_close(enc.model(enc.preprocess(x)).detach(), want)


def test_wrong_weights_name_the_encoder_and_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in create_encoder("tiny-cnn").model.state_dict().items()}
    save_file(sd, str(tmp_path / "cnn.safetensors"))
    with pytest.raises(UsageError, match=r"cnn\.safetensors.*tiny-vit"):
        create_encoder("tiny-vit", tmp_path / "cnn.safetensors")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(UsageError, match="bad.pth"):
        create_encoder("tiny-cnn", tmp_path / "bad.pth")
    sd = create_encoder("tiny-cnn").model.state_dict()
    k = next(k for k, v in sd.items() if v.ndim == 4)
    torch.save({**sd, k: torch.zeros(1, 1, 1, 1)}, tmp_path / "shape.pth")
    with pytest.raises(UsageError, match="shape mismatch"):
        create_encoder("tiny-cnn", tmp_path / "shape.pth")
    torch.save({kk: v for kk, v in sd.items() if kk != k}, tmp_path / "partial.pth")
    with pytest.raises(UsageError, match="missing"):
        create_encoder("tiny-cnn", tmp_path / "partial.pth")


def test_presets_declare_their_size() -> None:
    specs = {s.name: s for s in list_encoders()}
    assert {"uni", "uni2-h", "virchow2", "phikon", "h-optimus-0", "gigapath"} <= set(specs)
    for name in ("tiny-vit", "tiny-cnn"):
        assert create_encoder(name).feature_dim == specs[name].feature_dim


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_same_features(data: Path, tmp_path: Path) -> None:
    ref = _copy(data, tmp_path / "ref")
    killed = _copy(data, tmp_path / "killed")
    w = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in create_encoder("tiny-vit").model.state_dict().items()}, str(w))
    args = [sys.executable, "-m", "gigamil", "embed", "--encoder", "tiny-vit", "--weights", str(w),
            "--workers", "0", "--batch-size", "8", "--device", "cpu"]
    subprocess.run([*args, str(ref)], check=True, capture_output=True)
    proc = subprocess.Popen([*args, str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    out = killed / "features" / "tiny-vit"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and len(list(out.glob("s*.h5"))) >= 1:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "finished before it could be killed"
    done = len(list(out.glob("s*.h5")))
    assert 1 <= done < 4
    subprocess.run([*args, str(killed)], check=True, capture_output=True)
    for sid in ("s000", "s001", "s002", "s003"):
        a = read_bag(ref / "features" / "tiny-vit" / f"{sid}.h5")
        b = read_bag(out / f"{sid}.h5")
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.coords, b.coords)


def test_from_slides_matches_the_store_path(cohort: Path, tmp_path: Path) -> None:
    """--from-slides: the same patches as extract → embed, without a store."""
    from safetensors.torch import save_file

    from gigamil.mil.embed_slides import embed_slides

    w = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in create_encoder("tiny-cnn").model.state_dict().items()}, str(w))
    ecfg = ExtractConfig(mpp=1.0, patch_size=64, encoding="png")  # lossless: identical pixels
    cfg = EmbedConfig(encoder="tiny-cnn", weights=str(w), workers=2, device="cpu", batch_size=16)
    extract_slides([cohort / "s001.svs"], tmp_path / "a", ecfg)
    embed_stores(tmp_path / "a", cfg)
    res = embed_slides([cohort / "s001.svs"], tmp_path / "b", cfg, ecfg)
    assert [r.status for r in res] == ["ok"]
    a = read_bag(tmp_path / "a" / "features" / "tiny-cnn" / "s001.h5")
    b = read_bag(tmp_path / "b" / "features" / "tiny-cnn" / "s001.h5")
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_allclose(a.features, b.features, atol=1e-5)
    assert b.attrs["mpp"] == 1.0 and b.attrs["patch_size"] == 64


def test_ranks_take_disjoint_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    from gigamil.cluster.distributed import dist_env

    paths = [Path(f"s{i:03d}.lmdb") for i in range(7)]
    shares = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        env = dist_env()
        shares.append(select_share(paths, (0, 1), env.rank, env.world_size))
    assert sorted(shares[0] + shares[1]) == paths and not set(shares[0]) & set(shares[1])
    cfg = EmbedConfig(shard=(2, 4), rank=1, world_size=2)
    assert cfg.manifest_name == "embed.shard2of4.rank1.csv"


def test_stain_norm_at_embed_time(data: Path, tmp_path: Path) -> None:
    d = _copy(data, tmp_path)
    plain = embed_stores(d, EmbedConfig(encoder="tiny-cnn", workers=0, device="cpu"))
    a = read_bag(d / "features" / "tiny-cnn" / "s001.h5")
    normed = embed_stores(d, EmbedConfig(encoder="tiny-cnn", workers=0, device="cpu",
                                         stain_norm="macenko"))
    assert [r.status for r in plain] == [r.status for r in normed] == ["ok"] * 4  # not skipped
    b = read_bag(d / "features" / "tiny-cnn" / "s001.h5")
    assert b.attrs["stain_norm"] == "macenko" and np.isfinite(b.features).all()
    assert a.features.shape == b.features.shape and not np.allclose(a.features, b.features)


def test_from_slides_leaves_out_unreadable_patches(cohort: Path, tmp_path: Path) -> None:
    """A damaged tile: --from-slides embeds the rest of the slide, as extract stores it."""
    import tifffile

    from gigamil.mil.embed_slides import embed_slides
    from gigamil.synth.slides import damage_tile

    bad = tmp_path / "slides" / "s003.svs"
    bad.parent.mkdir()
    shutil.copy(cohort / "s003.svs", bad)
    with tifffile.TiffFile(bad) as tif:
        n = len(tif.pages[0].dataoffsets)
    for k in range(n // 2, n // 2 + 6):
        damage_tile(bad, 0, k, "zero")
    ecfg = ExtractConfig(mpp=0.5, patch_size=64, encoding="png")
    cfg = EmbedConfig(encoder="tiny-cnn", workers=1, device="cpu", batch_size=16)
    stored = extract_slides([bad], tmp_path / "a", ecfg)[0]
    assert stored.status == "ok" and stored.qc["unreadable"] > 0
    res = embed_slides([bad], tmp_path / "b", cfg, ecfg)
    assert [r.status for r in res] == ["ok"]
    bag = read_bag(tmp_path / "b" / "features" / "tiny-cnn" / "s003.h5")
    assert len(bag.coords) == stored.n_patches
    with PatchStore(tmp_path / "a" / "patches" / "s003.lmdb") as store:
        np.testing.assert_array_equal(bag.coords, store.coords)


def test_from_slides_manifest_on_every_share_with_failures_once(cohort: Path,
                                                                tmp_path: Path) -> None:
    """Review findings: an input list's unusable rows were repeated in every rank's
    manifest, and a share with nothing to embed (or only skips) wrote no manifest."""
    import csv

    from gigamil.mil.embed_slides import embed_slides

    listing = tmp_path / "slides.txt"
    listing.write_text(f"{cohort / 's000.svs'}\nmissing.svs\n")
    ecfg = ExtractConfig(mpp=2.0, patch_size=64)
    out = tmp_path / "o"
    feats = out / "features" / "tiny-cnn"
    for rank in (0, 1):
        cfg = EmbedConfig(encoder="tiny-cnn", device="cpu", workers=0, rank=rank, world_size=2)
        embed_slides([listing], out, cfg, ecfg)
    rows = {rank: list(csv.DictReader(open(feats / f"embed.rank{rank}.csv")))
            for rank in (0, 1)}
    failed = [r for part in rows.values() for r in part if r["status"] == "failed"]
    assert len(failed) == 1 and "does not exist" in failed[0]["error"]
    assert [r["status"] for r in rows[0]] == ["failed", "ok"] and rows[1] == []
    cfg = EmbedConfig(encoder="tiny-cnn", device="cpu", workers=0, rank=0, world_size=2)
    embed_slides([listing], out, cfg, ecfg)  # a rerun: the manifest lists the skip
    again = list(csv.DictReader(open(feats / "embed.rank0.csv")))
    assert [r["status"] for r in again] == ["failed", "skipped"]


def test_two_runs_at_once_embed_each_slide_once_and_both_manifests_are_true(
        data: Path, tmp_path: Path) -> None:
    """Two embeds of one output at the same time (a job submitted twice): each slide's bag
    is written by exactly one of them, the other waits and finds it done."""
    import threading

    d = _copy(data, tmp_path)
    cfg = EmbedConfig(encoder="tiny-cnn", workers=0, device="cpu")
    results: dict[str, list[EmbedResult]] = {}
    start = threading.Barrier(2)

    def run(name: str) -> None:
        start.wait()
        results[name] = embed_stores(d, cfg)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_slide: dict[str, list[str]] = {}
    for res in (*results["a"], *results["b"]):
        by_slide.setdefault(res.slide_id, []).append(res.status)
    assert sorted(by_slide) == [f"s{i:03d}" for i in range(4)]
    for sid, statuses in by_slide.items():
        assert sorted(statuses) == ["ok", "skipped"], (sid, statuses)
    feats = d / "features" / "tiny-cnn"
    rows = list(csv.DictReader(open(feats / "embed.csv")))  # the last run's: all true
    assert sorted(r["slide_id"] for r in rows) == sorted(by_slide)
    assert {r["status"] for r in rows} <= {"ok", "skipped"}
    assert not list(feats.glob("*.lock"))  # released and removed


def test_a_slide_claimed_by_a_run_that_dies_is_embedded_once_it_is_gone(
        data: Path, tmp_path: Path) -> None:
    d = _copy(data, tmp_path)
    feats = d / "features" / "tiny-cnn"
    feats.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from gigamil.io import work_lock\n"
        f"with work_lock({str(feats / 's001.h5')!r}) as mine:\n"
        "    print(mine, flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
    seen: list[str] = []

    def on_result(res: object) -> None:
        seen.append(res.slide_id)  # type: ignore[attr-defined]
        if len(seen) == 3:  # the other three are done: the holder dies without its bag
            holder.kill()

    try:
        res = embed_stores(d, EmbedConfig(encoder="tiny-cnn", workers=0, device="cpu"),
                           on_result=on_result)
    finally:
        holder.kill()
        holder.wait()
    assert [r.slide_id for r in res] == ["s000", "s002", "s003", "s001"]  # waited for it
    assert [r.status for r in res] == ["ok"] * 4
    assert len(read_bag(feats / "s001.h5")) > 0
