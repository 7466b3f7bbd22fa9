"""Review-driven regressions: each test here failed on an earlier version."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from gigamil.cluster.extract_cohort import extract_slides
from gigamil.synth.model import SynthConfig
from gigamil.synth.slides import write_synthetic_slide
from gigamil.wsi.extract import ELSEWHERE, extract_slide
from gigamil.wsi.extract_config import ExtractConfig, SlideResult
from gigamil.wsi.reader import open_slide
from gigamil.wsi.slide import resize_area
from gigamil.wsi.store import PatchStore


def test_wsi_never_imports_torch() -> None:
    code = ("import sys, gigamil.wsi.extract, gigamil.wsi.stain, gigamil.cli.main; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_odd_sized_slide_patches_equal_direct_reads(tmp_path: Path) -> None:
    """Level 1 of a 4099-px-wide slide has downsample 4.0007: each patch is read on its own."""
    path = tmp_path / "odd.svs"
    write_synthetic_slide(path, SynthConfig(width=4099, height=3077, seed=9))
    cfg = ExtractConfig(mpp=2.0, patch_size=64, encoding="raw", backend="openslide",
                        min_tissue=0.3)
    assert extract_slide(path, tmp_path, cfg).status == "ok"
    with PatchStore(tmp_path / "patches" / "odd.lmdb") as store, \
            open_slide(path, "openslide") as slide:
        level = store.meta["read_level"]
        assert level == 1 and slide.levels[1].downsample != 4.0
        ds = slide.levels[1].downsample
        for i in range(len(store)):
            x, y = (int(round(c / ds)) for c in store.coords[i])
            direct = resize_area(slide.read_region(level, x, y, 128, 128), 64)
            np.testing.assert_array_equal(store[i], direct)


def test_mpp_override_never_replaces_a_recorded_mpp(cohort: Path, tmp_path: Path) -> None:
    res = extract_slide(cohort / "s000.svs", tmp_path, ExtractConfig(mpp_override=0.5))
    with PatchStore(tmp_path / "patches" / "s000.lmdb") as store:
        assert store.meta["level0_mpp"] == 0.25 and store.meta["mpp_source"] == "slide"
    assert "override" not in res.note


def test_72_dpi_tiff_counts_as_missing_mpp(tmp_path: Path) -> None:
    path = tmp_path / "photo.tif"
    tifffile.imwrite(path, np.zeros((512, 512, 3), np.uint8), tile=(256, 256),
                     resolution=(72, 72), resolutionunit="INCH")
    with open_slide(path, "openslide") as slide:
        with pytest.raises(Exception, match="--mpp-override"):
            _ = slide.mpp


def test_changed_source_is_redone(cohort: Path, tmp_path: Path) -> None:
    src = tmp_path / "in" / "s.svs"
    src.parent.mkdir()
    src.write_bytes((cohort / "s000.svs").read_bytes())
    out = tmp_path / "out"
    assert extract_slides([src], out, ExtractConfig())[0].status == "ok"
    os.utime(src, (1, 1))  # touched: a new scan copied over the old one
    assert extract_slides([src], out, ExtractConfig())[0].status == "ok"
    assert extract_slides([src], out, ExtractConfig())[0].status == "skipped"


def test_coords_h5_is_never_stale(cohort: Path, tmp_path: Path) -> None:
    s = cohort / "s000.svs"
    extract_slide(s, tmp_path, ExtractConfig(mpp=0.5, coords_h5=True))
    extract_slide(s, tmp_path, ExtractConfig(mpp=1.0))  # redone without h5: old h5 removed
    assert not (tmp_path / "coords" / "s000.h5").exists()
    extract_slide(s, tmp_path, ExtractConfig(mpp=1.0, coords_h5=True))  # skipped, h5 rewritten
    with PatchStore(tmp_path / "patches" / "s000.lmdb") as store, \
            h5py.File(tmp_path / "coords" / "s000.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], store.coords)
        assert f["coords"].attrs["mpp"] == 1.0


def test_corrupt_tiles_fail_the_slide_cleanly(cohort: Path, tmp_path: Path) -> None:
    """IFDs intact, level-0 tile data garbage: the read fails, the batch goes on."""
    path = tmp_path / "in" / "corrupt.svs"
    path.parent.mkdir()
    data = bytearray((cohort / "s001.svs").read_bytes())
    with tifffile.TiffFile(cohort / "s001.svs") as tif:
        page = tif.pages[0]
        for off, n in zip(page.dataoffsets, page.databytecounts):
            data[off : off + n] = b"\xff" * n
    path.write_bytes(bytes(data))
    (path.parent / "good.svs").write_bytes((cohort / "s002.svs").read_bytes())
    res = {r.file: r for r in extract_slides([path.parent], tmp_path / "o",
                                             ExtractConfig(backend="openslide"))}
    assert res["corrupt.svs"].status == "failed" and res["corrupt.svs"].error
    assert str(tmp_path) not in res["corrupt.svs"].error
    assert res["good.svs"].status == "ok"


@pytest.mark.slow
def test_a_worker_that_dies_fails_only_its_slide(cohort: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A real process death (os._exit in the worker, as a segfault in a slide library would)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        if os.environ.get("GIGAMIL_TEST_DIE_ON"):
            import gigamil.wsi.extract as ex
            real = ex.extract_slide
            def dying(path, *a, **k):
                if os.path.basename(str(path)) == os.environ["GIGAMIL_TEST_DIE_ON"]:
                    os._exit(3)
                return real(path, *a, **k)
            ex.extract_slide = dying
    """))
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("GIGAMIL_TEST_DIE_ON", "s001.svs")
    results = extract_slides([cohort], tmp_path / "out", ExtractConfig(), workers=2)
    by = {r.file: r for r in results}
    assert by["s001.svs"].status == "failed" and "died" in by["s001.svs"].error
    assert [by[f"s00{i}.svs"].status for i in (0, 2, 3)] == ["ok", "ok", "ok"]
    assert len(results) == 4


def test_two_runs_at_once_on_one_output_write_each_slide_once(cohort: Path,
                                                              tmp_path: Path) -> None:
    """Two extractions of the same slides into the same --out at the same time (a job
    submitted twice): every slide is extracted by exactly one of them."""
    import threading

    cfg = ExtractConfig(mpp=1.0, patch_size=64, encoding="raw")
    results: dict[str, list] = {}
    start = threading.Barrier(2)

    def run(name: str) -> None:
        start.wait()
        results[name] = extract_slides([cohort], tmp_path, cfg, workers=0)

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
    claims = [p for p in (tmp_path / "patches").glob("*.lock") if not p.name.startswith(".")]
    assert not claims  # released and removed
    # the run that met the other's claims waited for them: its manifest is true as well
    assert not [r for r in (*results["a"], *results["b"]) if r.note == ELSEWHERE]
    rows = list(csv.DictReader(open(tmp_path / "extract.csv")))
    assert sorted(r["slide_id"] for r in rows) == sorted(by_slide) and not any(
        r["note"] == ELSEWHERE for r in rows)
    for sid in by_slide:
        with PatchStore(tmp_path / "patches" / f"{sid}.lmdb") as store:
            assert len(store) > 0


def test_a_slide_claimed_by_a_run_that_dies_is_extracted_once_it_is_gone(
        cohort: Path, tmp_path: Path) -> None:
    store = tmp_path / "patches" / "s001.lmdb"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from gigamil.io import work_lock\n"
        f"with work_lock({str(store)!r}) as mine:\n"
        "    print(mine, flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
    seen: list[str] = []

    def on_result(res: SlideResult) -> None:
        seen.append(res.slide_id)
        if len(seen) == 2:  # s000 done, s001 met the claim: the holder dies without it
            holder.kill()

    cfg = ExtractConfig(mpp=1.0, patch_size=64, encoding="raw")
    try:
        results = extract_slides([cohort / "s000.svs", cohort / "s001.svs"], tmp_path, cfg,
                                 workers=0, on_result=on_result)
    finally:
        holder.kill()
        holder.wait()
    assert [(r.slide_id, r.status, r.note) for r in results] == [
        ("s000", "ok", ""), ("s001", "ok", "")]  # waited for the claim, then extracted it
    with PatchStore(store) as s:
        assert len(s) > 0


def test_a_claim_left_by_a_killed_process_never_blocks_a_rerun(tmp_path: Path) -> None:
    from gigamil.io import work_lock

    target = tmp_path / "s.lmdb"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, sys; from gigamil.io import work_lock\n"
        f"with work_lock({str(target)!r}) as mine:\n"
        "    print(mine, flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
    with work_lock(target) as mine:
        assert mine is False  # held by a live process
    holder.kill()
    holder.wait()
    assert (tmp_path / "s.lmdb.lock").exists()  # left behind by the kill ...
    with work_lock(target) as mine:
        assert mine is True  # ... and no obstacle


@pytest.fixture
def small_fs(tmp_path: Path):
    """An 8 MB tmpfs: room for two of the cohort's stores (about 3.4 MB each, raw)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_stops_with_one_error_and_a_rerun_with_space_finishes(
        cohort: Path, small_fs: Path) -> None:
    from typer.testing import CliRunner

    from gigamil.cli.main import app

    runner = CliRunner()
    out = small_fs / "out"
    args = ["extract", str(cohort), "--out", str(out), "--mpp", "1.0", "--patch-size", "64",
            "--format", "raw", "--workers", "1"]
    res = runner.invoke(app, args)
    flat = " ".join(res.output.split())
    assert res.exit_code == 2 and f"no space left on the device of {out}" in flat, res.output
    assert flat.count("no space left") == 1  # one error, not one per slide
    leftovers = [p.name for p in out.rglob("*") if ".partial" in p.name or ".tmp-" in p.name]
    assert not leftovers  # nothing truncated stays behind
    for store in (out / "patches").glob("*.lmdb"):
        with PatchStore(store) as s:  # what was written is complete
            assert len(s) > 0 and s[len(s) - 1].shape == (64, 64, 3)
    done_before = len(list((out / "patches").glob("*.lmdb")))
    assert done_before < 4
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    res = runner.invoke(app, args)  # with space: only the rest is done
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "extract.csv")))
    assert sorted(r["status"] for r in rows) == ["ok"] * (4 - done_before) + \
        ["skipped"] * done_before
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    for cmd in (args, ["embed", str(out), "--encoder", "tiny-cnn", "--workers", "0",
                       "--device", "cpu"]):
        res = runner.invoke(app, [*cmd[:1], *cmd[1:], "--overwrite"])  # read-only: at once
        flat = " ".join(res.output.split())
        assert res.exit_code == 2 and "cannot write to" in flat and "Read-only" in flat, \
            res.output


def test_training_on_a_full_disk_stops_with_one_error_and_resumes(small_fs: Path,
                                                                 tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gigamil.cli.main import app
    from gigamil.synth.bags import make_feature_bags

    bags = tmp_path / "bags"
    make_feature_bags(bags, n_slides=12, dim=16, bag_size=(10, 30), seed=0)
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (8 * 2**20 - 600 * 2**10))  # ~600 KB left
    out = small_fs / "run"
    args = ["train", "--features", str(bags), "--labels", str(bags / "labels.csv"), "--out",
            str(out), "--folds", "2", "--epochs", "3", "--batch-size", "2", "--bootstrap",
            "10", "--val-frac", "0", "--device", "cpu", "-o", "hidden=512"]
    res = CliRunner().invoke(app, args)
    flat = " ".join(res.output.split())
    assert res.exit_code == 2 and "no space left on the device of" in flat, res.output
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    filler.unlink()
    res = CliRunner().invoke(app, [*args, "--resume", "auto"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["complete"]


def test_temporary_files_left_by_a_killed_job_are_cleaned_up(cohort: Path,
                                                             tmp_path: Path) -> None:
    """A write killed between mkstemp and rename leaves ``.NAME.tmp-*``: the next claimant
    of NAME removes it at once; a stray manifest temp goes once it is an hour old; a
    fresh one (perhaps another live run's) stays."""
    import os
    import time

    from gigamil.io import work_lock

    patches = tmp_path / "patches"
    patches.mkdir()
    beside = patches / ".s000.lmdb.tmp-dead1"
    beside.write_bytes(b"half a store")
    other = patches / ".s0001.lmdb.tmp-keep"  # another target's: not s000's to remove
    other.write_bytes(b"x")
    old = tmp_path / ".extract.csv.tmp-dead2"
    old.write_text("slide_id,sta")
    fresh = tmp_path / ".extract.csv.tmp-live"
    fresh.write_text("slide_id,sta")
    hour_ago = time.time() - 7200
    os.utime(old, (hour_ago, hour_ago))
    with work_lock(patches / "s000.lmdb") as mine:
        assert mine and not beside.exists() and other.exists()
    cfg = ExtractConfig(mpp=1.0, patch_size=64, encoding="raw")
    assert all(r.status == "ok" for r in extract_slides([cohort / "s000.svs"], tmp_path, cfg,
                                                        workers=0))
    assert not old.exists() and fresh.exists()
