from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from gigamil.cluster.extract_cohort import extract_slides
from gigamil.errors import UsageError
from gigamil.wsi.extract import extract_slide
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.reader import open_slide
from gigamil.wsi.slide import resize_area
from gigamil.wsi.store import PatchStore


def _manifest(out: Path) -> dict[str, dict[str, str]]:
    return {r["file"]: r for r in csv.DictReader(open(out / "extract.csv"))}


def _stores_equal(a: Path, b: Path) -> None:
    with PatchStore(a) as sa, PatchStore(b) as sb:
        assert len(sa) == len(sb) > 0
        np.testing.assert_array_equal(sa.coords, sb.coords)
        for i in range(len(sa)):
            assert sa.get_encoded(i) == sb.get_encoded(i)


@pytest.mark.parametrize("backend", ["openslide", "auto"])
def test_raw_patches_equal_direct_reads(cohort: Path, tmp_path: Path, backend: str) -> None:
    cfg = ExtractConfig(mpp=0.5, patch_size=224, encoding="raw", backend=backend)
    res = extract_slide(cohort / "s000.svs", tmp_path, cfg)
    assert res.status == "ok" and res.n_patches > 50
    rng = np.random.default_rng(0)
    with PatchStore(tmp_path / "patches" / "s000.lmdb") as store, \
            open_slide(cohort / "s000.svs", backend) as slide:
        level, scale = slide.level_for_mpp(0.5)
        read = int(round(224 * scale))
        assert store.meta["read_level"] == level and store.meta["read_size"] == read == 448
        for i in rng.choice(len(store), 12, replace=False):
            x, y = store.coords[i]
            direct = resize_area(slide.read_region(level, int(x), int(y), read, read), 224)
            np.testing.assert_array_equal(store[int(i)], direct)


def test_jpeg_patches_are_close_to_direct_reads(cohort: Path, tmp_path: Path) -> None:
    extract_slide(cohort / "s001.svs", tmp_path, ExtractConfig(encoding="jpeg", jpeg_quality=90))
    with PatchStore(tmp_path / "patches" / "s001.lmdb") as store, \
            open_slide(cohort / "s001.svs") as slide:
        for i in (0, len(store) // 2, len(store) - 1):
            x, y = store.coords[i]
            direct = resize_area(slide.read_region(0, int(x), int(y), 512, 512), 256)
            assert np.abs(store[i].astype(int) - direct).mean() < 4.0  # JPEG q90 4:4:4 on grainy tissue


def test_patches_on_a_coarser_level(cohort: Path, tmp_path: Path) -> None:
    """At 2 µm/px the 1 µm/px level is read and halved: coords stay level-0."""
    cfg = ExtractConfig(mpp=2.0, patch_size=64, encoding="raw", backend="openslide")
    extract_slide(cohort / "s002.svs", tmp_path, cfg)
    with PatchStore(tmp_path / "patches" / "s002.lmdb") as store, \
            open_slide(cohort / "s002.svs", "openslide") as slide:
        assert store.meta["read_level"] == 1 and store.meta["read_size"] == 128
        assert (store.coords % 4 == 0).all()  # multiples of the level's downsample
        x, y = store.coords[len(store) // 2]
        direct = resize_area(slide.read_region(1, int(x) // 4, int(y) // 4, 128, 128), 64)
        np.testing.assert_array_equal(store[len(store) // 2], direct)


def test_same_micrometres_at_two_scan_resolutions(twin_slides: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    fine, coarse = twin_slides
    cfg = ExtractConfig(mpp=0.5, patch_size=256, encoding="raw", backend="openslide")
    extract_slides([fine, coarse], tmp_path, cfg)
    with PatchStore(tmp_path / "patches" / "fine.lmdb") as a, \
            PatchStore(tmp_path / "patches" / "coarse.lmdb") as b:
        assert a.meta["patch_size_level0"] * 0.25 == b.meta["patch_size_level0"] * 0.5 == 128
        um_a = {tuple(c): i for i, c in enumerate((a.coords * 0.25).astype(int).tolist())}
        um_b = {tuple(c): i for i, c in enumerate((b.coords * 0.5).astype(int).tolist())}
        shared = um_a.keys() & um_b.keys()
        assert len(shared) >= 0.9 * len(um_a.keys() | um_b.keys())  # same tissue, same grid
        for pos in sorted(shared)[:: max(1, len(shared) // 20)]:
            pa, pb = a[um_a[pos]].mean(axis=2).ravel(), b[um_b[pos]].mean(axis=2).ravel()
            # the same µm of tissue: only the JPEG tiles of the two scans differ
            assert np.corrcoef(pa, pb)[0, 1] > 0.98, pos
            assert np.abs(pa - pb).mean() < 8.0, pos


def test_rerun_skips_complete_and_redoes_changed(cohort: Path, tmp_path: Path) -> None:
    cfg = ExtractConfig(encoding="raw")
    first = extract_slides([cohort / "s000.svs", cohort / "s001.svs"], tmp_path, cfg)
    assert [r.status for r in first] == ["ok", "ok"]
    again = extract_slides([cohort / "s000.svs", cohort / "s001.svs"], tmp_path, cfg)
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert [r.n_patches for r in again] == [r.n_patches for r in first]
    changed = extract_slides([cohort / "s000.svs"], tmp_path, ExtractConfig(encoding="raw",
                                                                            min_tissue=0.9))
    assert changed[0].status == "ok" and changed[0].n_patches < first[0].n_patches
    forced = extract_slides([cohort / "s001.svs"], tmp_path, cfg, overwrite=True)
    assert forced[0].status == "ok"
    assert json.loads((tmp_path / "extract_config.json").read_text())["config"]["encoding"] == "raw"


@pytest.mark.slow
def test_two_workers_give_the_same_stores(cohort: Path, tmp_path: Path) -> None:
    cfg = ExtractConfig(encoding="raw")
    one = extract_slides([cohort], tmp_path / "one", cfg, workers=1)
    two = extract_slides([cohort], tmp_path / "two", cfg, workers=2)
    assert [r.row()["status"] for r in one] == [r.row()["status"] for r in two] == ["ok"] * 4
    for r in one:
        _stores_equal(tmp_path / "one" / "patches" / f"{r.slide_id}.lmdb",
                      tmp_path / "two" / "patches" / f"{r.slide_id}.lmdb")


def test_bad_inputs_are_reported_and_the_batch_goes_on(bad_slides: Path, tmp_path: Path) -> None:
    results = extract_slides([bad_slides], tmp_path, ExtractConfig(backend="openslide"))
    rows = _manifest(tmp_path)
    assert set(rows) == {"good.svs", "notaslide.svs", "truncated.svs", "nompp.tiff",
                         "blank.svs", "tiny.svs", "dup.svs", "dup.tif"}
    assert rows["good.svs"]["status"] == "ok" and int(rows["good.svs"]["n_patches"]) > 0
    assert rows["blank.svs"]["status"] == "ok" and rows["blank.svs"]["n_patches"] == "0"
    assert "no tissue" in rows["blank.svs"]["note"]
    assert rows["notaslide.svs"]["status"] == "failed"
    assert "not a readable slide" in rows["notaslide.svs"]["error"]
    assert rows["truncated.svs"]["status"] == "failed"
    assert rows["nompp.tiff"]["status"] == "failed"
    assert "--mpp-override" in rows["nompp.tiff"]["error"]
    assert rows["tiny.svs"]["status"] == "failed"
    assert "smaller than one" in rows["tiny.svs"]["error"]
    for name in ("dup.svs", "dup.tif"):
        assert rows[name]["status"] == "failed" and "rename" in rows[name]["error"]
    assert not (tmp_path / "patches" / "dup.lmdb").exists()
    assert sorted(p.name for p in (tmp_path / "patches").glob("[!.]*.lmdb*")) == ["blank.lmdb", "good.lmdb"]
    assert len(results) == 8


def test_truncated_slide_fails_with_auto_backend_too(bad_slides: Path, tmp_path: Path) -> None:
    res = extract_slide(bad_slides / "truncated.svs", tmp_path, ExtractConfig())
    assert res.status == "failed" and res.error
    assert not list((tmp_path / "patches").glob("*.lmdb"))


def test_mpp_override_rescues_a_slide_without_mpp(bad_slides: Path, tmp_path: Path) -> None:
    res = extract_slide(bad_slides / "nompp.tiff", tmp_path,
                        ExtractConfig(mpp_override=0.25, backend="openslide", min_tissue=0.1))
    assert res.status == "ok" and res.n_patches > 0


def test_output_paths_that_are_files(cohort: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        extract_slides([cohort / "s000.svs"], tmp_path / "file", ExtractConfig())
    (tmp_path / "o" / "patches" / "s000.lmdb").mkdir(parents=True)  # a directory in the way
    res = extract_slides([cohort / "s000.svs", cohort / "s001.svs"], tmp_path / "o", ExtractConfig())
    assert [r.status for r in res] == ["failed", "ok"]
    assert "not a file" in res[0].error


def test_coords_h5_is_clam_and_trident_readable(cohort: Path, tmp_path: Path) -> None:
    extract_slide(cohort / "s000.svs", tmp_path, ExtractConfig(coords_h5=True))
    with PatchStore(tmp_path / "patches" / "s000.lmdb") as store, \
            h5py.File(tmp_path / "coords" / "s000.h5", "r") as f:
        ds = f["coords"]
        np.testing.assert_array_equal(ds[:], store.coords)
        attrs = dict(ds.attrs)
    # TRIDENT
    assert attrs["patch_size"] == 256 and attrs["patch_size_level0"] == 512
    assert attrs["level0_magnification"] == 40 and attrs["target_magnification"] == 20
    assert attrs["overlap"] == 0 and attrs["name"] == "s000"
    assert (attrs["level0_width"], attrs["level0_height"]) == (6144, 4864)
    assert attrs["mpp"] == 0.5 and attrs["patch_size_um"] == 128
    # CLAM reads `patch_size` px at `patch_level`: only written where that is the truth
    assert "patch_level" not in attrs
    extract_slide(cohort / "s000.svs", tmp_path / "native", ExtractConfig(mpp=0.25, coords_h5=True))
    with h5py.File(tmp_path / "native" / "coords" / "s000.h5", "r") as f:
        assert f["coords"].attrs["patch_level"] == 0 and f["coords"].attrs["patch_size"] == 256


def test_no_paths_in_outputs_unless_asked(cohort: Path, tmp_path: Path) -> None:
    extract_slide(cohort / "s000.svs", tmp_path / "a", ExtractConfig())
    with PatchStore(tmp_path / "a" / "patches" / "s000.lmdb") as store:
        text = json.dumps(store.meta)
        assert str(cohort) not in text and store.meta["source"]["name"] == "s000.svs"
    extract_slide(cohort / "s000.svs", tmp_path / "b", ExtractConfig(record_paths=True))
    with PatchStore(tmp_path / "b" / "patches" / "s000.lmdb") as store:
        assert store.meta["source"]["path"] == str((cohort / "s000.svs").resolve())


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted(cohort: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for sid in ("s000", "s001", "s002", "s003"):
        shutil.copy(cohort / f"{sid}.svs", slides / f"{sid}.svs")
    args = [sys.executable, "-m", "gigamil", "extract", str(slides), "--format", "raw",
            "--backend", "openslide"]
    subprocess.run(args + ["--out", str(tmp_path / "ref")], check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed_mid_write = False
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        done = list((out / "patches").glob("*.lmdb")) if (out / "patches").exists() else []
        partial = list((out / "patches").glob("*.partial")) if done else []
        if partial and partial[0].stat().st_size > 0:
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_write = True
            break
        time.sleep(0.002)
    proc.wait()
    assert killed_mid_write, "extraction finished before it could be killed"
    # the interrupted store is not visible as a store
    complete = {p.name for p in (out / "patches").glob("*.lmdb")}
    assert 1 <= len(complete) < 4

    rerun = subprocess.run(args + ["--out", str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    rows = _manifest(out)
    assert {rows[f"{n[:-5]}.svs"]["status"] for n in complete} == {"skipped"}
    assert not list((out / "patches").glob("*.partial"))
    for sid in ("s000", "s001", "s002", "s003"):
        _stores_equal(tmp_path / "ref" / "patches" / f"{sid}.lmdb", out / "patches" / f"{sid}.lmdb")


def test_multiscale_grids_nest_exactly(cohort: Path, tmp_path: Path) -> None:
    """A 1.0 µm/px patch covers exactly the 2×2 block of 0.5 µm/px patches under it."""
    cfg = ExtractConfig(mpp=(0.5, 1.0, 2.0), patch_size=128, min_tissue=0.0, encoding="raw",
                        backend="openslide")
    res = extract_slide(cohort / "s002.svs", tmp_path, cfg)
    assert res.status == "ok", res.error
    path = tmp_path / "patches" / "s002.lmdb"
    with PatchStore(path) as s05, PatchStore(path, mpp=1.0) as s1, \
            PatchStore(path, mpp=2.0) as s2:
        assert s05.scales == [0.5, 1.0, 2.0]
        assert s05.meta["patch_size_level0"] == 256
        fine = {tuple(c): i for i, c in enumerate(s05.coords.tolist())}
        assert len(s1) > 0 and len(s2) > 0
        compared = 0
        for j, (x, y) in enumerate(s1.coords.tolist()):
            assert x % 512 == 0 and y % 512 == 0  # on the fine grid
            block = [fine.get((x + dx, y + dy)) for dy in (0, 256) for dx in (0, 256)]
            if None in block:
                continue
            # the coarse patch shows the 2×2 fine block, halved; it is read from the slide's
            # own 1 µm/px level, so pixels differ by that level's JPEG, not by position
            quad = np.vstack([np.hstack([s05[block[0]], s05[block[1]]]),
                              np.hstack([s05[block[2]], s05[block[3]]])])
            a, b = resize_area(quad, 128).mean(-1).ravel(), s1[j].mean(-1).ravel()
            assert np.abs(a - b).mean() < 6
            if a.std() > 5:
                assert np.corrcoef(a, b)[0, 1] > 0.9
            compared += 1
        assert compared >= 10
        assert (s2.coords % 1024 == 0).all()  # every 2.0 patch sits on 2×2 1.0 patches


def test_multiscale_needs_integer_ratios(cohort: Path, tmp_path: Path) -> None:
    res = extract_slide(cohort / "s000.svs", tmp_path, ExtractConfig(mpp=(0.5, 0.75)))
    assert res.status == "failed" and "integer multiple" in res.error


def test_coarse_scale_first_is_fine(cohort: Path, tmp_path: Path) -> None:
    """--mpp 1.0,0.5: the extra scale's keys sort below the primary's (no LMDB append)."""
    res = extract_slide(cohort / "s002.svs", tmp_path, ExtractConfig(mpp=(1.0, 0.5)))
    assert res.status == "ok", res.error
    path = tmp_path / "patches" / "s002.lmdb"
    with PatchStore(path) as a, PatchStore(path, mpp=0.5) as b:
        assert a.mpp == 1.0 and len(b) > len(a) > 0
        assert b[len(b) - 1].shape == (256, 256, 3)


def test_threads_give_identical_stores(cohort: Path, tmp_path: Path) -> None:
    cfg = ExtractConfig(encoding="png", read_block_px=1024)
    extract_slide(cohort / "s003.svs", tmp_path / "one", cfg, threads=1)
    extract_slide(cohort / "s003.svs", tmp_path / "three", cfg, threads=3)
    _stores_equal(tmp_path / "one" / "patches" / "s003.lmdb",
                  tmp_path / "three" / "patches" / "s003.lmdb")


def test_array_tasks_merge_their_manifests_once_every_part_is_there(
        cohort: Path, tmp_path: Path) -> None:
    """Each task of an sbatch array merges as it ends: the first to end leaves its part,
    the last merges them all; tasks that end at once neither fail nor lose rows (found:
    two tasks of the template job removed each other's parts, and one failed)."""
    from concurrent.futures import ThreadPoolExecutor

    from gigamil.cluster.extract_cohort import merge_extract_manifests

    slides = sorted(cohort.glob("*.svs"))
    cfg = ExtractConfig(mpp=2.0, patch_size=64)
    extract_slides(slides, tmp_path, cfg, workers=0, shard=(0, 2))
    assert merge_extract_manifests(tmp_path, complete_only=True) is None  # task 1 not done
    assert (tmp_path / "extract.shard0of2.csv").is_file()
    assert not (tmp_path / "extract.csv").exists()
    extract_slides(slides, tmp_path, cfg, workers=0, shard=(1, 2))
    parts = {p.name: p.read_bytes() for p in tmp_path.glob("extract.shard*.csv")}
    for _ in range(3):  # both tasks (and more) merging at the same moment
        for name, data in parts.items():
            (tmp_path / name).write_bytes(data)
        with ThreadPoolExecutor(6) as pool:
            merged = list(pool.map(lambda _: merge_extract_manifests(tmp_path, True), range(6)))
        assert sum(m is not None for m in merged) >= 1
        with open(tmp_path / "extract.csv", newline="") as fh:
            assert sorted(r["slide_id"] for r in csv.DictReader(fh)) == [p.stem for p in slides]
        assert not list(tmp_path.glob("extract.shard*"))
