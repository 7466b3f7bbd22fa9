"""Shared fixtures: small synthetic pyramidal slides (real TIFFs read by real openslide/cuCIM)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gigamil.synth.model import SynthConfig
from gigamil.synth.slides import make_cohort, save_masks, write_synthetic_slide

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Level-0 size of the test slides at 0.25 µm/px (1.5 mm × 1.2 mm).
W, H = 6144, 4864


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four slides s000…s003 (two with a planted tumour) + labels.csv + masks/."""
    out = tmp_path_factory.mktemp("cohort")
    make_cohort(out, n=4, width=W, height=H, mpp=0.25, seed=7, workers=2)
    return out


@pytest.fixture(scope="session")
def twin_slides(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same synthetic tissue written at 0.25 µm/px and at 0.5 µm/px."""
    out = tmp_path_factory.mktemp("twins")
    fine = SynthConfig(width=W, height=H, mpp=0.25, seed=11, tumor=True)
    coarse = SynthConfig(width=W // 2, height=H // 2, mpp=0.5, seed=11, tumor=True)
    write_synthetic_slide(out / "fine.svs", fine)
    write_synthetic_slide(out / "coarse.svs", coarse)
    return out / "fine.svs", out / "coarse.svs"


@pytest.fixture(scope="session")
def odd_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slide with Aperio-style odd dimensions: every reduced level has a fractional
    downsample (4.0007…, 16.01…), as real scanners write them."""
    out = tmp_path_factory.mktemp("odd") / "odd.svs"
    write_synthetic_slide(out, SynthConfig(width=W + 1, height=H - 3, seed=13, tumor=True,
                                           tissue_fraction=0.5))
    return out


@pytest.fixture(scope="session")
def bad_slides(tmp_path_factory: pytest.TempPathFactory, cohort: Path) -> Path:
    """A directory with one good slide and every kind of bad input the issue lists."""
    out = tmp_path_factory.mktemp("bad")
    shutil.copy(cohort / "s000.svs", out / "good.svs")
    (out / "notaslide.svs").write_bytes(b"this is a text file, not a slide\n" * 100)
    data = (cohort / "s001.svs").read_bytes()
    (out / "truncated.svs").write_bytes(data[: len(data) // 3])
    write_synthetic_slide(out / "nompp.tiff", SynthConfig(width=2048, height=2048, seed=3,
                                                          record_mpp=False))
    masks = write_synthetic_slide(out / "blank.svs", SynthConfig(width=3072, height=2048,
                                                                 seed=4, empty=True))
    save_masks(out / "blank_masks", masks)
    write_synthetic_slide(out / "tiny.svs", SynthConfig(width=300, height=300, seed=5))
    # two files with the same slide id "dup"
    shutil.copy(cohort / "s002.svs", out / "dup.svs")
    shutil.copy(cohort / "s003.svs", out / "dup.tif")
    return out


def tiff_tile(path: Path, x: int, y: int, size: int) -> np.ndarray:
    """Level-0 pixels decoded straight from the TIFF (reference for reader tests)."""
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].asarray()[y : y + size, x : x + size]


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A real one-node SLURM cluster on localhost (tests/slurm_cluster.sh), torn down after.

    Skipped where slurm-wlm/munge are missing or we are not root (CI installs them).
    """
    import subprocess

    script = Path(__file__).parent / "slurm_cluster.sh"
    res = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True)
    if res.returncode == 3:
        pytest.skip(f"no local SLURM: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    conf = res.stdout.strip().split("=", 1)[1]
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    subprocess.run(["bash", str(script), "stop"], capture_output=True)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
