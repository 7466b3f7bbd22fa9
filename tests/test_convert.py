"""`gigamil convert`: slides and flat TIFFs → pyramidal JPEG TIFFs, read back by real readers."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import openslide
import pytest
import tifffile
from typer.testing import CliRunner

from gigamil.cli.main import app
from gigamil.errors import MissingMppError, UsageError
from gigamil.synth.model import SynthConfig
from gigamil.synth.slides import write_synthetic_slide
from gigamil.wsi.convert import convert_slide, pyramid_sizes
from gigamil.wsi.reader import cucim_available, open_slide

runner = CliRunner()


def _smooth(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (JPEG-friendly, so round-trip errors stay small)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 230, (max(2, h // 64), max(2, w // 64), 3)).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _band(w: int, y0: int, y1: int) -> np.ndarray:
    """Rows y0…y1-1 of a smooth synthetic image of width ``w``, computed from coordinates."""
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(y0, y1, dtype=np.float32)[:, None]
    out = np.empty((y1 - y0, w, 3), np.uint8)
    out[..., 0] = 140 + 60 * np.sin(x / 97) * np.cos(y / 131)
    out[..., 1] = 110 + 25 * np.cos(x / 173) + 25 * np.sin(y / 151)
    out[..., 2] = 170 + 40 * np.sin(x / 251) * np.sin(y / 199 + 0.5)
    return out


def _read_level(path: Path, level: int) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        w, h = s.level_dimensions[level]
        return np.asarray(s.read_region((0, 0), level, (w, h)))[..., :3]


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2400x1800 Aperio-like slide (levels 1 and 4) at 0.25 µm/px with a fake PHI label."""
    path = tmp_path_factory.mktemp("convert") / "small.svs"
    write_synthetic_slide(path, SynthConfig(width=2400, height=1800, seed=3, tumor=True))
    return path


def _check_output(path: Path, size: tuple[int, int], mpp: float) -> None:
    """openslide, tifffile (and cuCIM when installed) all open it with the same size and mpp."""
    with openslide.OpenSlide(str(path)) as s:
        assert s.dimensions == size
        assert s.level_count >= 2
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp)
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(mpp)
        assert dict(s.associated_images) == {}  # no label, macro or thumbnail
        ds = s.level_downsamples
        assert all(b > a for a, b in zip(ds, ds[1:]))
        assert max(s.level_dimensions[-1]) <= 1024
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG
        assert (page.imagewidth, page.imagelength) == size
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        num, den = page.tags["XResolution"].value
        assert 1e4 / (num / den) == pytest.approx(mpp, rel=1e-4)
        assert f"MPP = {mpp:g}" in page.description
        assert len(tif.pages) >= 2 and all(p.is_tiled for p in tif.pages)
    with open_slide(path) as slide:  # our own default reader
        assert slide.dimensions == size and slide.mpp == pytest.approx(mpp)
        assert len(slide.levels) >= 2 and slide.associated_names == []
    if cucim_available():
        from cucim import CuImage  # type: ignore[attr-defined, unused-ignore]

        img = CuImage(str(path))
        assert tuple(img.resolutions["level_dimensions"][0]) == size
        assert float(img.metadata["aperio"]["MPP"]) == pytest.approx(mpp)


def test_pyramid_sizes() -> None:
    assert pyramid_sizes(2000, 1500) == [(2000, 1500), (1000, 750)]
    assert pyramid_sizes(8001, 6000, 4) == [(8001, 6000), (2001, 1500), (501, 375)]
    assert pyramid_sizes(800, 600) == [(800, 600)]


def test_convert_synthetic_svs(svs: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out.tif"
    calls: list[tuple[int, int]] = []
    res = convert_slide(svs, dst, on_progress=lambda d, t: calls.append((d, t)))
    assert res.levels[0] == (2400, 1800) and len(res.levels) >= 2
    assert res.mpp == pytest.approx(0.25) and res.mpp_source == "source"
    assert res.reader.startswith("slide/")  # a pyramid: read through our slide readers
    assert res.levels == ((2400, 1800), (1200, 900), (600, 450))
    assert calls[-1][0] == calls[-1][1] == sum(-(-h // 256) for _, h in res.levels)
    _check_output(dst, (2400, 1800), 0.25)
    assert _mad(_read_level(dst, 0), _read_level(svs, 0)) < 2.0
    # level 1 is level 0 shrunk by 2 with area interpolation
    ref = cv2.resize(_read_level(svs, 0), res.levels[1], interpolation=cv2.INTER_AREA)
    assert _mad(_read_level(dst, 1), ref) < 2.0
    assert b"DOE^JANE" not in dst.read_bytes() and b"synthetic" not in dst.read_bytes()


def test_convert_through_slide_reader_with_aperio_layout(svs: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out.svs"
    res = convert_slide(svs, dst, backend="openslide", downsample=4, tile=512, quality=80)
    assert res.reader == "slide/openslide"
    assert res.levels == ((2400, 1800), (600, 450))
    _check_output(dst, (2400, 1800), 0.25)
    with openslide.OpenSlide(str(dst)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert s.properties["openslide.level[0].tile-width"] == "512"
    assert _mad(_read_level(dst, 0), _read_level(svs, 0)) < 3.0


@pytest.mark.parametrize("layout", ["stripped", "tiled", "zlib-strips", "grey"])
def test_convert_flat_tiff(layout: str, tmp_path: Path) -> None:
    w, h = 1900, 1300
    img = _smooth(w, h, seed=1)
    src = tmp_path / f"{layout}.tif"
    kw: dict[str, Any] = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}
    if layout == "tiled":
        tifffile.imwrite(src, img, photometric="rgb", tile=(512, 512), compression="zlib", **kw)
    elif layout == "zlib-strips":
        tifffile.imwrite(src, img, photometric="rgb", rowsperstrip=100, compression="zlib", **kw)
    elif layout == "grey":
        img = np.ascontiguousarray(np.repeat(img[..., 1:2], 3, axis=2))
        tifffile.imwrite(src, img[..., 0], photometric="minisblack", **kw)
    else:  # one uncompressed strip: read by rows, not whole
        tifffile.imwrite(src, img, photometric="rgb", **kw)
    dst = tmp_path / "out.tif"
    res = convert_slide(src, dst)
    assert res.reader == "flat-tiff" and res.mpp == pytest.approx(0.5)
    _check_output(dst, (w, h), 0.5)
    assert _mad(_read_level(dst, 0), img) < 2.0
    ref = cv2.resize(img, res.levels[1], interpolation=cv2.INTER_AREA)
    assert _mad(_read_level(dst, 1), ref) < 2.0


def test_flat_tiff_without_resolution_needs_mpp(tmp_path: Path) -> None:
    src = tmp_path / "nores.tif"
    img = _smooth(1500, 1100, seed=2)
    tifffile.imwrite(src, img, photometric="rgb", tile=(256, 256))
    with pytest.raises(MissingMppError, match="--mpp"):
        convert_slide(src, tmp_path / "out.tif")
    assert not (tmp_path / "out.tif").exists()
    res = convert_slide(src, tmp_path / "out.tif", mpp=0.5)
    assert res.mpp_source == "option"
    _check_output(tmp_path / "out.tif", (1500, 1100), 0.5)
    with pytest.raises(UsageError, match="--mpp"):
        convert_slide(src, tmp_path / "bad.tif", mpp=500.0)


def test_options_are_checked(svs: Path, tmp_path: Path) -> None:
    for kw, word in (({"tile": 100}, "--tile"), ({"quality": 0}, "--quality"),
                     ({"downsample": 3}, "--downsample")):
        with pytest.raises(UsageError, match=word):
            convert_slide(svs, tmp_path / "x.tif", **kw)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="source itself"):
        convert_slide(svs, svs, overwrite=True)


def test_cli_convert(svs: Path, tmp_path: Path) -> None:
    dst = tmp_path / "cli.tif"
    res = runner.invoke(app, ["convert", str(svs), str(dst), "--quality", "85"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "0.25 µm/px" in res.output and "3 levels" in res.output
    _check_output(dst, (2400, 1800), 0.25)
    before = dst.stat().st_mtime_ns

    res = runner.invoke(app, ["convert", str(svs), str(dst)])
    assert res.exit_code == 2 and "--overwrite" in res.output and "Traceback" not in res.output
    assert dst.stat().st_mtime_ns == before

    res = runner.invoke(app, ["convert", str(svs), str(dst), "--overwrite", "--mpp", "0.5"])
    assert res.exit_code == 0, res.output
    assert "kept it" in res.output  # the recorded 0.25 wins over --mpp

    res = runner.invoke(app, ["convert", str(tmp_path / "missing.svs"), str(tmp_path / "m.tif")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    text = " ".join(res.output.split())  # one message (rich wraps it at the terminal width)
    assert text.startswith("error:") and text.count("error:") == 1
    assert "missing.svs does not exist" in text
    assert not (tmp_path / "m.tif").exists()


def test_cli_missing_mpp(tmp_path: Path) -> None:
    src = tmp_path / "flat.tif"
    tifffile.imwrite(src, _smooth(1200, 900), photometric="rgb", rowsperstrip=64)
    res = runner.invoke(app, ["convert", str(src), str(tmp_path / "out.tif")])
    assert res.exit_code == 2 and "--mpp" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["convert", str(src), str(tmp_path / "out.tif"), "--mpp", "0.25"])
    assert res.exit_code == 0, res.output
    _check_output(tmp_path / "out.tif", (1200, 900), 0.25)
    assert not list(tmp_path.glob(".*tmp-*"))  # no temporary file left behind


def _write_large_flat(path: Path, w: int, h: int, layout: str) -> None:
    """A w×h stripped RGB TIFF written strip by strip: zlib strips of 64 rows, or one raw strip."""
    rows = h if layout == "one-strip" else 64
    compression = "zlib" if layout == "zlib" else None

    def strips() -> Iterator[bytes]:
        for y in range(0, h, rows):
            data = b"".join(_band(w, y0, min(h, y0 + 64, y + rows)).tobytes()
                            for y0 in range(y, min(h, y + rows), 64))
            yield zlib.compress(data, 1) if compression else data

    tifffile.imwrite(path, strips(), shape=(h, w, 3), dtype=np.uint8, photometric="rgb",
                     rowsperstrip=rows, compression=compression, resolution=(4e4, 4e4),
                     resolutionunit="CENTIMETER")


_PEAK_SCRIPT = """
import json, resource, sys
from pathlib import Path
import numpy as np, tifffile, zarr, cv2, imagecodecs, openslide
from gigamil.wsi.convert import convert_slide

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")

base = rss()
with open("/proc/self/clear_refs", "w") as fh:  # reset the high-water mark to now
    fh.write("5")
res = convert_slide(Path(sys.argv[1]), Path(sys.argv[2]))
print(json.dumps({"peak": hwm() - base, "levels": res.levels, "seconds": res.seconds}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("layout", ["zlib", "one-strip"])  # zarr chunks; pread
def test_large_flat_tiff_memory_is_bounded(layout: str, tmp_path: Path) -> None:
    """8000x6000 RGB (144 MB raw): peak RSS growth must stay far below the image size."""
    w, h = 8000, 6000
    src, dst = tmp_path / "large.tif", tmp_path / "large_out.tif"
    _write_large_flat(src, w, h, layout)
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(src), str(dst)], text=True,
                          capture_output=True, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\npeak RSS growth {info['peak'] / 2**20:.1f} MiB for {w * h * 3 / 2**20:.0f} MiB "
          f"of pixels ({layout}), {info['seconds']:.1f} s")
    assert info["peak"] < 64 * 2**20, info  # under half of the 137 MiB of pixels
    assert [tuple(s) for s in info["levels"]][:2] == [(8000, 6000), (4000, 3000)]
    with openslide.OpenSlide(str(dst)) as s:
        assert s.dimensions == (w, h)
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        region = np.asarray(s.read_region((3000, 4000), 0, (512, 512)))[..., :3]
    assert _mad(region, _band(w, 4000, 4512)[:, 3000:3512]) < 2.0
