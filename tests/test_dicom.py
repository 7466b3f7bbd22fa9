"""DICOM WSI series: a real wsidicomizer conversion of a synthetic .svs, read by DicomReader.

wsidicom's own ``read_region`` is the reference for every level; the source .svs
decoded with tifffile is the reference for level 0 (its JPEG tiles are copied).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gigamil.errors import SlideOpenError, UnreadableRegionError
from gigamil.synth.dicom import FAKE_PHI, damage_frame, volume_files, write_dicom_series
from gigamil.synth.model import SynthConfig
from gigamil.synth.slides import write_synthetic_slide
from gigamil.wsi.dicom import (
    DicomReader,
    is_dicom_series_folder,
    is_wsi_dicom,
    series_image_type,
)

#: Aperio-like odd level-0 size; 256 px tiles leave partial edge tiles on every level.
W, H, TILE, MPP = 3001, 2199, 256, 0.25


@pytest.fixture(scope="module")
def svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dicom_src") / "slide.svs"
    write_synthetic_slide(path, SynthConfig(width=W, height=H, mpp=MPP, tile=TILE, seed=5,
                                            tumor=True))
    return path


@pytest.fixture(scope="module")
def series(svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dicom_series(svs, tmp_path_factory.mktemp("dicom") / "slide",
                              objective_power=40.0)


@pytest.fixture()
def series_copy(series: Path, tmp_path: Path) -> Path:
    """A private copy of the series, for tests that change files."""
    return Path(shutil.copytree(series, tmp_path / "slide"))


def _label_file(folder: Path) -> Path:
    return next(f for f in sorted(folder.iterdir()) if series_image_type(f) == "LABEL")


def _reference(reader: DicomReader, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """wsidicom's own read_region for the same pixels of the same level."""
    from wsidicom import WsiDicom

    lw, lh, _ = reader._level_dims_and_downsamples()[level]
    with WsiDicom.open(volume_files(reader.path)) as wsi:
        index = sorted(wsi.levels, key=lambda lv: -lv.size.width)[level].level
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        region = wsi.read_region((x0, y0), index, (x1 - x0, y1 - y0)).convert("RGB")
        out[y0 - y:y1 - y, x0 - x:x1 - x] = np.asarray(region)
    return out


# ---- opening and metadata -----------------------------------------------------------------


def test_series_opens_with_the_source_geometry(series: Path, svs: Path) -> None:
    import openslide

    with DicomReader(series) as r, openslide.OpenSlide(str(svs)) as src:
        assert r.format == "dicom" and r.backend == "wsidicom" and r.exact_levels
        assert r.dimensions == src.level_dimensions[0] == (W, H)
        assert r.mpp == pytest.approx(float(src.properties["openslide.mpp-x"])) == MPP
        levels = r._level_dims_and_downsamples()
        assert len(levels) >= 4
        for k, (lw, lh, ds) in enumerate(levels):  # about 2× apart: the svs's own levels
            assert ds == pytest.approx(2.0**k, rel=2e-3)  # (4.0013…) and the added ones
            assert ds == pytest.approx(W / lw, rel=5e-3) and abs(lh - H / ds) <= 2
        assert [lv.mpp for lv in r.levels] == pytest.approx([MPP * d for *_, d in levels])
        assert r.level_for_mpp(1.0) == (2, 1.0)
        assert r.objective_power == 40.0 and r.describe()["objective_power"] == 40.0


def test_a_file_of_the_series_opens_its_folder(series: Path) -> None:
    one = volume_files(series)[2]
    with DicomReader(one) as r:
        assert r.path == series and r.dimensions == (W, H)


def test_associated_images_are_listed_but_never_read(series_copy: Path) -> None:
    label = _label_file(series_copy)
    data = label.read_bytes()
    label.write_bytes(data[: data.find(b"\xe0\x7f\x10\x00")])  # keep the header, drop pixels
    with DicomReader(series_copy) as r:
        assert "label" in r.associated_names and "thumbnail" in r.associated_names
        assert r.describe()["associated_images"] == r.associated_names
        for level, (lw, lh, _) in enumerate(r._level_dims_and_downsamples()):
            assert r.read_region(level, 0, 0, min(lw, 300), min(lh, 300)).shape[2] == 3
        assert all("LABEL" not in series_image_type(f) for f in r._handle.files)


def test_no_phi_in_describe_repr_or_errors(series_copy: Path) -> None:
    damage_frame(series_copy, 0, 0, mode="zero")
    with DicomReader(series_copy) as r:
        with pytest.raises(UnreadableRegionError) as err:
            r.read_region(0, 0, 0, 64, 64)
        texts = [json.dumps(r.describe()), repr(r), str(r), str(err.value)]
    for value in FAKE_PHI.values():
        for text in texts:
            assert value not in text and value.split("^")[0] not in text
    # the PHI really is in the files (so the check above means something)
    assert FAKE_PHI["PatientName"].encode() in volume_files(series_copy)[0].read_bytes()


def test_missing_pyramid_level_still_opens(series_copy: Path) -> None:
    volume_files(series_copy)[1].unlink()
    with DicomReader(series_copy) as r:
        levels = r._level_dims_and_downsamples()
        assert [ds for *_, ds in levels][:3] == pytest.approx([1.0, 4.0, 8.0], rel=2e-3)
        lw, lh, _ = levels[1]
        assert np.array_equal(r.read_region(1, 0, 0, lw, lh), _reference(r, 1, 0, 0, lw, lh))


def test_frames_are_read_straight_from_the_files(series: Path) -> None:
    """Every level of a wsidicomizer series has a frame table (one file, full tiling),
    and each frame it reads is wsidicom's own bytes."""
    with DicomReader(series) as r:
        for lv in r._levels:
            assert lv.frames is not None, lv.index
            across = lv.frames.across
            down = len(lv.frames.frames) // across
            for tx, ty in ((0, 0), (across // 2, down // 2), (across - 1, down - 1)):
                assert lv.frames.read(tx, ty) == r._handle.read_encoded_tile(
                    lv.index, (tx, ty), crop_to_image_boundary=False)


def test_frame_cut_short_raises(tmp_path: Path) -> None:
    """A file cut short after the frame table was read (a copy still being written, a
    network filesystem hiccup): the frames past the end raise, the others read."""
    from gigamil.wsi.dicom_frames import FrameTable

    f = tmp_path / "level.dcm"
    f.write_bytes(bytes(range(15)))
    table = FrameTable(str(f), [(0, 10), (10, 10)], across=2)
    assert table.read(0, 0) == bytes(range(10))
    with pytest.raises(OSError, match="cut short"):
        table.read(1, 0)
    table.close()


def test_series_with_a_missing_level_is_extracted_from_the_levels_left(
        series: Path, series_copy: Path, tmp_path: Path) -> None:
    """A DICOM folder whose 2× level is gone: extraction at 0.5 µm/px reads the next finer
    level that is left (level 0, shrunk 2×) and keeps the same patches at the same places."""
    from gigamil.wsi.extract import extract_slide
    from gigamil.wsi.extract_config import ExtractConfig
    from gigamil.wsi.store import PatchStore

    volume_files(series_copy)[1].unlink()
    cfg = ExtractConfig(mpp=0.5, patch_size=64, encoding="raw")
    full = extract_slide(series, tmp_path / "full", cfg)
    gap = extract_slide(series_copy, tmp_path / "gap", cfg)
    assert full.status == gap.status == "ok", (full.error, gap.error)
    with PatchStore(tmp_path / "full" / "patches" / "slide.lmdb") as a, \
            PatchStore(tmp_path / "gap" / "patches" / "slide.lmdb") as b:
        assert (a.meta["read_level"], b.meta["read_level"]) == (1, 0)
        np.testing.assert_array_equal(a.coords, b.coords)
        assert len(b) == len(a) > 10
        diff = np.abs(np.stack([a[i] for i in range(len(a))]).astype(int)
                      - np.stack([b[i] for i in range(len(b))]))
        assert diff.mean() < 6  # the same tissue: the scanner's 2× level vs level 0 shrunk


def test_unopenable_series_raise_slide_open_error(series: Path, tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError, match="does not exist"):
        DicomReader(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideOpenError, match="no DICOM whole-slide VOLUME"):
        DicomReader(tmp_path / "empty")
    only_label = tmp_path / "label_only"
    only_label.mkdir()
    shutil.copy(_label_file(series), only_label / "label.dcm")
    with pytest.raises(SlideOpenError, match="VOLUME"):
        DicomReader(only_label)
    broken = tmp_path / "broken"
    broken.mkdir()
    data = volume_files(series)[0].read_bytes()
    (broken / "a.dcm").write_bytes(data[:2000])  # header cut short
    with pytest.raises(SlideOpenError):
        DicomReader(broken)


# ---- pixels -------------------------------------------------------------------------------


def test_every_level_equals_wsidicom_read_region(series: Path) -> None:
    with DicomReader(series) as r:
        for level, (lw, lh, _) in enumerate(r._level_dims_and_downsamples()):
            whole = r.read_region(level, 0, 0, lw, lh)
            assert np.array_equal(whole, _reference(r, level, 0, 0, lw, lh)), level
            # across the partial right/bottom edge frames, part outside the level
            x, y = lw - 150, lh - 90
            edge = r.read_region(level, x, y, 200, 130)
            assert np.array_equal(edge, _reference(r, level, x, y, 200, 130)), level
            assert (edge[:, 150:] == 255).all() and (edge[90:] == 255).all()
            assert edge[:90, :150].min() < 255 or whole.min() == 255
            # top-left outside, and entirely outside
            corner = r.read_region(level, -20, -10, 50, 40)
            assert (corner[:10] == 255).all() and (corner[:, :20] == 255).all()
            assert np.array_equal(corner, _reference(r, level, -20, -10, 50, 40))
            assert (r.read_region(level, lw + 5, 0, 16, 16) == 255).all()


def test_interior_region_spanning_tiles(series: Path) -> None:
    with DicomReader(series) as r:
        x, y, w, h = TILE - 37, 2 * TILE - 1, 3 * TILE + 75, TILE + 3
        assert np.array_equal(r.read_region(0, x, y, w, h), _reference(r, 0, x, y, w, h))
        # a wide region cut into patches equals the patches read alone
        wide = r.read_region(1, 100, 80, 512, 256)
        for px in range(0, 512, 128):
            for py in range(0, 256, 128):
                patch = r.read_region(1, 100 + px, 80 + py, 128, 128)
                assert np.array_equal(wide[py:py + 128, px:px + 128], patch)


def test_level0_equals_the_source_svs(series: Path, svs: Path) -> None:
    with tifffile.TiffFile(svs) as tif:
        source = tif.pages[0].asarray()
    with DicomReader(series) as r:
        assert np.array_equal(r.read_region(0, 0, 0, W, H), source)


def test_reading_from_four_threads_gives_the_same_pixels(series: Path) -> None:
    rng = np.random.default_rng(0)
    with DicomReader(series) as r:
        dims = r._level_dims_and_downsamples()
        jobs = []
        for _ in range(48):
            level = int(rng.integers(0, len(dims)))
            lw, lh, _ = dims[level]
            jobs.append((level, int(rng.integers(-50, lw)), int(rng.integers(-50, lh)),
                         int(rng.integers(1, 400)), int(rng.integers(1, 400))))
        alone = [r.read_region(*job) for job in jobs]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda job: r.read_region(*job), jobs * 2))
    for a, b in zip(alone * 2, together):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("mode", ["zero", "garbage"])
def test_damaged_frame_raises_unreadable_region(series_copy: Path, mode: str) -> None:
    tiles_across = -(-W // TILE)
    damage_frame(series_copy, 0, 1 * tiles_across + 2, mode=mode)  # frame (2, 1) of level 0
    with DicomReader(series_copy) as r:
        with pytest.raises(UnreadableRegionError, match=r"frame \(2,1\) of level 0"):
            r.read_region(0, 2 * TILE + 10, TILE + 10, 64, 64)
        with pytest.raises(UnreadableRegionError):
            r.read_region(0, 0, 0, 4 * TILE, 3 * TILE)  # a larger region over it
        good = r.read_region(0, 5 * TILE, 4 * TILE, 300, 300)  # elsewhere
        assert np.array_equal(good, _reference(r, 0, 5 * TILE, 4 * TILE, 300, 300))
        lw, lh, _ = r._level_dims_and_downsamples()[1]
        r.read_region(1, 0, 0, lw, lh)  # other levels are intact


# ---- discovery ----------------------------------------------------------------------------


def test_discovery_helpers(series: Path, svs: Path, tmp_path: Path) -> None:
    volume = volume_files(series)[0]
    label = _label_file(series)
    assert is_wsi_dicom(volume) and is_wsi_dicom(label)
    assert series_image_type(volume) == "VOLUME"
    assert series_image_type(label) == "LABEL"
    assert is_dicom_series_folder(series)
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file\n" * 20)
    for path in (svs, text, tmp_path / "missing.dcm", series):
        assert not is_wsi_dicom(path)
    with pytest.raises(SlideOpenError, match="not a DICOM whole-slide"):
        series_image_type(svs)
    assert not is_dicom_series_folder(svs.parent)  # an .svs folder
    assert not is_dicom_series_folder(series.parent)  # the series is one level below
    label_only = tmp_path / "label_only"
    label_only.mkdir()
    shutil.copy(label, label_only / label.name)
    assert not is_dicom_series_folder(label_only)


def test_write_dicom_series_refuses_a_non_empty_folder(svs: Path, series: Path) -> None:
    from gigamil.errors import UsageError

    with pytest.raises(UsageError, match="not empty"):
        write_dicom_series(svs, series)
    assert not [p for p in series.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_write_dicom_series_without_phi(svs: Path, tmp_path: Path) -> None:
    folder = write_dicom_series(svs, tmp_path / "clean", phi=False, include_thumbnail=False)
    data = b"".join(f.read_bytes() for f in folder.iterdir())
    assert not any(v.encode() in data for v in FAKE_PHI.values())
    with DicomReader(folder) as r:
        assert r.associated_names == ["label"] and r.dimensions == (W, H)
