"""Real slide collections: discovery, slide lists, DICOM series, MIRAX, PHI, resolution.

DICOM series are made from synthetic slides with wsidicomizer (a real converter) and
read with wsidicom; every PHI check searches every output byte.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gigamil.cli.main import app
from gigamil.cluster.extract_cohort import extract_slides
from gigamil.synth.dicom import FAKE_PHI, write_dicom_series
from gigamil.synth.model import SynthConfig
from gigamil.synth.slides import write_synthetic_slide
from gigamil.wsi.discovery import Pseudonyms, find_slides
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.reader import open_slide
from gigamil.wsi.store import PatchStore

runner = CliRunner()


@pytest.fixture(scope="module")
def dicom_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same synthetic slide as an .svs and as a DICOM series folder (with fake PHI)."""
    root = tmp_path_factory.mktemp("pair")
    svs = root / "svs" / "case01.svs"
    svs.parent.mkdir()
    write_synthetic_slide(svs, SynthConfig(width=4001, height=3203, seed=21, tumor=True,
                                           tissue_fraction=0.5))
    series = write_dicom_series(svs, root / "dicom" / "DOE_JANE_case01", objective_power=40.0)
    return svs, series


def _tree(root: Path) -> list[str]:
    return sorted(str(s.path.relative_to(root)) for s in find_slides([root]).slides)


def test_folders_are_searched_recursively_and_junk_is_ignored(tmp_path: Path,
                                                              cohort: Path) -> None:
    root = tmp_path / "cohort"
    (root / "site_a" / "batch1").mkdir(parents=True)
    (root / "site_b").mkdir()
    shutil.copy(cohort / "s000.svs", root / "site_a" / "batch1" / "a.svs")
    shutil.copy(cohort / "s001.svs", root / "site_b" / "b.tif")
    (root / "site_b" / ".hidden.svs").write_bytes(b"x")
    (root / "site_b" / "c.svs.part").write_bytes(b"x")
    (root / "site_b" / "d.svs.crdownload").write_bytes(b"x")
    (root / ".trash").mkdir()
    shutil.copy(cohort / "s002.svs", root / ".trash" / "old.svs")
    out = root / "extracted"  # a previous output folder inside the cohort
    (out / "patches").mkdir(parents=True)
    (out / "extract_config.json").write_text("{}")
    shutil.copy(cohort / "s003.svs", out / "copy.svs")
    assert _tree(root) == ["site_a/batch1/a.svs", "site_b/b.tif"]
    assert [s.path.name for s in find_slides([root], recursive=False).slides] == []
    assert [s.path.name for s in find_slides([root / "site_b"], recursive=False).slides] == [
        "b.tif"]


def test_slide_lists_csv_and_txt(tmp_path: Path, cohort: Path) -> None:
    (tmp_path / "s").mkdir()
    for i in range(3):
        shutil.copy(cohort / f"s00{i}.svs", tmp_path / "s" / f"slide{i}.svs")
    (tmp_path / "list.csv").write_text("path,slide_id,label\ns/slide0.svs,P-0,1\n"
                                       "s/slide1.svs,,0\ns/missing.svs,P-9,1\n")
    found = find_slides([tmp_path / "list.csv"])
    assert [(s.path.name, s.slide_id) for s in found.slides] == [("slide0.svs", "P-0"),
                                                                   ("slide1.svs", "slide1")]
    assert len(found.failed) == 1 and "missing.svs (listed in list.csv) does not exist" in (
        found.failed[0].error)
    (tmp_path / "list.txt").write_text("# my cohort\ns/slide2.svs\n\ns/slide0.svs\n")
    both = find_slides([tmp_path / "list.txt", tmp_path / "s"])
    assert sorted(s.path.name for s in both.slides) == ["slide0.svs", "slide1.svs",
                                                         "slide2.svs"]
    assert any("given twice" in n for n in both.notes)
    (tmp_path / "bad.csv").write_text("file\ns/slide0.svs\n")
    result = runner.invoke(app, ["extract", str(tmp_path / "bad.csv"), "--out",
                                 str(tmp_path / "o")])
    assert result.exit_code != 0 and "no `path` column" in result.output


def test_mirax_file_and_folder_are_one_slide(tmp_path: Path) -> None:
    (tmp_path / "case.mrxs").write_bytes(b"not read by discovery")
    (tmp_path / "case").mkdir()
    (tmp_path / "case" / "Slidedat.ini").write_text("[GENERAL]\n")
    (tmp_path / "case" / "Data0000.dat").write_bytes(b"\0" * 10)
    (tmp_path / "lonely.mrxs").write_bytes(b"x")
    found = find_slides([tmp_path])
    assert [s.path.name for s in found.slides] == ["case.mrxs"]
    assert [r.slide_id for r in found.failed] == ["lonely"]
    assert "no companion folder" in found.failed[0].error


def test_dicom_series_is_one_slide_named_after_its_folder(dicom_pair: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    svs, series = dicom_pair
    for given in (series, series.parent, next(series.glob("*.dcm"))):
        found = find_slides([given])
        assert [(s.path, s.slide_id) for s in found.slides] == [(series, series.name)], given
    # a folder of series folders; and a series beside a plain slide of the same name
    root = tmp_path / "mixed"
    root.mkdir()
    shutil.copytree(series, root / "case01")
    shutil.copy(svs, root / "case01.svs")
    found = find_slides([root])
    assert not found.slides and len(found.failed) == 2
    assert all("shared by" in r.error and "DICOM series" in r.error for r in found.failed)


def test_dicom_series_extracts_like_the_svs(dicom_pair: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    svs, series = dicom_pair
    with open_slide(series) as slide:
        assert slide.backend == "wsidicom" and slide.format == "dicom"
        assert "PatientName" not in json.dumps(slide.describe())
    cfg = ExtractConfig(mpp=0.25, patch_size=256, encoding="raw")  # level 0 of both
    a = extract_slides([svs], tmp_path / "a", cfg, workers=1)[0]
    b = extract_slides([series], tmp_path / "b", cfg, workers=1)[0]
    assert a.status == b.status == "ok", (a.error, b.error)
    # tissue detection reads the coarse levels: on the series it keeps what the svs keeps
    assert abs(a.n_patches - b.n_patches) <= 0.02 * a.n_patches, (a.n_patches, b.n_patches)
    with PatchStore(tmp_path / "a" / "patches" / "case01.lmdb") as sa, \
            PatchStore(tmp_path / "b" / "patches" / f"{series.name}.lmdb") as sb:
        common = {tuple(c): i for i, c in enumerate(sa.coords.tolist())}
        n = 0
        for j, c in enumerate(sb.coords.tolist()):
            if tuple(c) in common:  # level 0 is the same JPEG tiles: the same pixels
                np.testing.assert_array_equal(sa[common[tuple(c)]], sb[j])
                n += 1
        assert n >= 0.98 * len(sb)
        assert sb.meta["format"] == "dicom" and sb.meta["backend"] == "wsidicom"
    again = extract_slides([series], tmp_path / "b", cfg, workers=1)[0]
    assert again.status == "skipped"  # the folder's signature is stable


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_pseudonymize_keeps_names_paths_and_patient_tags_out_of_every_output(
        dicom_pair: tuple[Path, Path], tmp_path: Path) -> None:
    svs, series = dicom_pair
    out = tmp_path / "out"
    mapping = tmp_path / "secret" / "map.json"
    result = runner.invoke(app, ["-v", "extract", str(svs), str(series), "--out", str(out),
                                 "--pseudonymize", "--pseudonym-map", str(mapping),
                                 "--coords-h5", "--previews", "--geojson", "--mpp", "1.0",
                                 "--patch-size", "64"])
    assert result.exit_code == 0, result.output
    data = _all_bytes(out)
    forbidden = [*FAKE_PHI.values(), "DOE", "JANE", "case01", series.name, str(tmp_path),
                 "svs" + os.sep]
    for word in forbidden:
        assert word.encode() not in data, word
        if word != str(tmp_path):  # the console may name the --out the user gave
            assert word not in result.output, word
    assert stat.S_IMODE(mapping.stat().st_mode) == 0o600
    entries = json.loads(mapping.read_text())["slides"]
    assert sorted(e["original_id"] for e in entries) == sorted(["case01", series.name])
    ids = sorted(p.stem for p in (out / "patches").glob("*.lmdb"))
    assert ids == sorted(e["slide_id"] for e in entries)
    # a rerun keeps the same ids (the salt lives in the mapping) and skips both
    again = runner.invoke(app, ["extract", str(svs), str(series), "--out", str(out),
                                "--pseudonymize", "--pseudonym-map", str(mapping),
                                "--coords-h5", "--previews", "--geojson", "--mpp", "1.0",
                                "--patch-size", "64"])
    assert again.exit_code == 0 and "2 skipped" in again.output, again.output


def test_mpp_csv_and_magnification(tmp_path: Path, bad_slides: Path) -> None:
    nompp = bad_slides / "nompp.tiff"
    out = tmp_path / "o"
    (tmp_path / "mpp.csv").write_text("slide_id,mpp\nother,0.5\n")
    res = extract_slides([nompp], out, ExtractConfig(mpp_csv=str(tmp_path / "mpp.csv")))[0]
    assert res.status == "failed" and "--mpp-csv" in res.error  # the slide is not listed
    (tmp_path / "mpp.csv").write_text("slide_id,mpp\nnompp,0.25\n")
    res = extract_slides([nompp], out, ExtractConfig(mpp_csv=str(tmp_path / "mpp.csv")))[0]
    assert res.status == "ok", res.error
    with PatchStore(out / "patches" / "nompp.lmdb") as store:
        assert store.meta["level0_mpp"] == 0.25 and store.meta["mpp_source"] == "override"
    (tmp_path / "bad.csv").write_text("slide_id,mpp\nnompp,352.8\n")
    with pytest.raises(Exception, match="not a plausible resolution"):
        extract_slides([nompp], out, ExtractConfig(mpp_csv=str(tmp_path / "bad.csv")))


def test_mpp_from_magnification_warns(tmp_path: Path) -> None:
    path = tmp_path / "mag.tiff"
    write_synthetic_slide(path, SynthConfig(width=2048, height=2048, seed=3, record_mpp=False))
    # a description with AppMag but no MPP, as some exporters write
    import tifffile

    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].description is not None
    with open_slide(path) as slide:
        slide.mpp_from_magnification = True
        slide.objective_power  # noqa: B018
    # without AppMag there is nothing to go on: the error names every way out
    res = extract_slides([path], tmp_path / "o", ExtractConfig(mpp_from_magnification=True))[0]
    assert res.status == "failed"
    assert "--mpp-override" in res.error and "--mpp-csv" in res.error


def test_roi_keeps_only_patches_inside_and_geojson_round_trips(
        cohort: Path, tmp_path: Path) -> None:
    from gigamil.wsi.qupath import load_roi

    src = cohort / "s000.svs"
    full = extract_slides([src], tmp_path / "full", ExtractConfig(geojson=True))[0]
    assert full.status == "ok"
    gj = tmp_path / "full" / "geojson" / "s000.geojson"
    doc = json.loads(gj.read_text())
    kinds = {f["properties"]["objectType"] for f in doc["features"]}
    assert kinds == {"annotation", "tile"}
    tiles = [f for f in doc["features"] if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == full.n_patches
    # the left half of the slide as a QuPath annotation of class Tumor
    with open_slide(src) as slide:
        w, h = slide.dimensions
    rois = tmp_path / "rois"
    rois.mkdir()
    poly = [[0, 0], [w // 2, 0], [w // 2, h], [0, h], [0, 0]]
    (rois / "s000.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [poly]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}))
    half = extract_slides([src], tmp_path / "half",
                          ExtractConfig(roi_dir=str(rois), roi_classes=("tumor",)))[0]
    assert half.status == "ok" and 0 < half.n_patches < full.n_patches
    with PatchStore(tmp_path / "half" / "patches" / "s000.lmdb") as store:
        size0 = store.meta["patch_size_level0"]
        assert (store.coords[:, 0] + size0 / 2 <= w // 2).all()
    roi = load_roi(rois / "s000.geojson", w, h)
    with PatchStore(tmp_path / "full" / "patches" / "s000.lmdb") as store:
        assert roi.keep(store.coords, size0).sum() == half.n_patches
    # a changed ROI file redoes the slide; an unchanged one is skipped
    assert extract_slides([src], tmp_path / "half", ExtractConfig(
        roi_dir=str(rois), roi_classes=("tumor",)))[0].status == "skipped"
    (rois / "s000.geojson").write_text("not json")
    bad = extract_slides([src], tmp_path / "half", ExtractConfig(roi_dir=str(rois)))[0]
    assert bad.status == "failed" and "GeoJSON" in bad.error
    far = [[w * 3, h * 3], [w * 4, h * 3], [w * 4, h * 4], [w * 3, h * 3]]
    (rois / "s000.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [far]}))
    bad = extract_slides([src], tmp_path / "half", ExtractConfig(roi_dir=str(rois)))[0]
    assert bad.status == "failed" and "outside the slide" in bad.error


def _ome_tiff(path: Path, src: Path) -> None:
    """An OME-TIFF pyramid (sub-resolutions in SubIFDs) of a synthetic slide, as
    bioformats2raw/QuPath write them; the resolution only in the OME-XML."""
    import tifffile

    with tifffile.TiffFile(src) as tif:
        levels = [tif.pages[0].asarray()]
    while max(levels[-1].shape[:2]) > 600:
        h, w = levels[-1].shape[:2]
        from gigamil.wsi.slide import resize_area

        levels.append(resize_area(levels[-1], (w // 2, h // 2)))
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, tile=(256, 256), compression="jpeg",
                  photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.25,
                                               "PhysicalSizeY": 0.25})
        for lv in levels[1:]:
            tif.write(lv, subfiletype=1, tile=(256, 256), compression="jpeg",
                      photometric="rgb")


def test_ome_tiff_pyramid_is_read_tile_by_tile(cohort: Path, tmp_path: Path) -> None:
    import tifffile

    path = tmp_path / "ome.ome.tif"
    _ome_tiff(path, cohort / "s001.svs")
    with open_slide(path) as slide:
        assert slide.backend == "tiles" and slide.format == "ome-tiff"
        assert slide.mpp == 0.25 and len(slide.levels) >= 3
        with tifffile.TiffFile(path) as tif:
            ref = tif.series[0].levels[1].asarray()
        np.testing.assert_array_equal(slide.read_region(1, 100, 50, 300, 200),
                                      ref[50:250, 100:400])
    res = extract_slides([path], tmp_path / "o", ExtractConfig(mpp=1.0, patch_size=64))[0]
    assert res.status == "ok" and res.n_patches > 50, res.error


def test_flat_tiff_works_or_names_convert(tmp_path: Path, cohort: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import tifffile

    import gigamil.wsi.tiles as tiles

    with tifffile.TiffFile(cohort / "s002.svs") as tif:
        image = tif.pages[0].asarray()[:2048, :3072]
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, image, photometric="rgb", rowsperstrip=64,
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    res = extract_slides([flat], tmp_path / "o", ExtractConfig(mpp=0.5, patch_size=128))[0]
    assert res.status == "ok" and res.n_patches > 0, res.error  # levels made on the fly
    monkeypatch.setattr(tiles, "FLAT_TIFF_MAX_SEGMENT_PX", 64 * 3072 - 1)  # one strip too big
    res = extract_slides([flat], tmp_path / "o2", ExtractConfig(mpp=0.5, patch_size=128,
                                                                backend="tiles"),
                         workers=0)[0]  # in this process, where the limit is lowered
    assert res.status == "failed" and "gigamil convert" in res.error
    converted = tmp_path / "flat_pyramid.tif"
    result = runner.invoke(app, ["convert", str(flat), str(converted)])
    assert result.exit_code == 0, result.output
    with open_slide(converted) as slide:
        assert len(slide.levels) > 1 and slide.mpp == 0.25


def test_stage_dir_gives_the_same_stores_and_leaves_nothing(cohort: Path,
                                                            tmp_path: Path) -> None:
    slides = [cohort / "s000.svs", cohort / "s001.svs"]
    cfg = ExtractConfig(mpp=1.0, patch_size=64, encoding="raw")
    direct = extract_slides(slides, tmp_path / "a", cfg, workers=1)
    stage = tmp_path / "stage"
    staged = extract_slides(slides, tmp_path / "b",
                            ExtractConfig(mpp=1.0, patch_size=64, encoding="raw",
                                          stage_dir=str(stage)), workers=1)
    assert [r.n_patches for r in direct] == [r.n_patches for r in staged]
    assert all(r.status == "ok" for r in staged)
    for s in ("s000", "s001"):
        with PatchStore(tmp_path / "a" / "patches" / f"{s}.lmdb") as x, \
                PatchStore(tmp_path / "b" / "patches" / f"{s}.lmdb") as y:
            np.testing.assert_array_equal(x.coords, y.coords)
            np.testing.assert_array_equal(x[len(x) // 2], y[len(y) // 2])
            assert y.meta["source"]["name"] == f"{s}.svs"
    assert list(stage.iterdir()) == []  # every copy and the private folder removed
    again = extract_slides(slides, tmp_path / "b", ExtractConfig(
        mpp=1.0, patch_size=64, encoding="raw", stage_dir=str(stage)), workers=1)
    assert [r.status for r in again] == ["skipped", "skipped"]  # staged copies keep mtime


def test_a_series_folder_does_not_hide_other_slides_and_two_series_are_reported(
        dicom_pair: tuple[Path, Path], tmp_path: Path, cohort: Path) -> None:
    svs, series = dicom_pair
    root = tmp_path / "flat"
    shutil.copytree(series, root)  # the series' files right in the input folder ...
    shutil.copy(cohort / "s000.svs", root / "other.svs")  # ... beside a slide file
    (root / "_archive").mkdir()
    shutil.copy(cohort / "s001.svs", root / "_archive" / "old.svs")
    (root / "summary.json").write_text("{}")  # not an output folder marker on its own
    found = find_slides([root])
    assert sorted(s.path.name for s in found.slides) == ["flat", "old.svs", "other.svs"]
    two = tmp_path / "two"
    shutil.copytree(series, two)
    second = write_dicom_series(svs, tmp_path / "second")
    for f in second.glob("*.dcm"):
        shutil.copy(f, two / f"b_{f.name}")
    found = find_slides([tmp_path / "two"])
    assert not found.slides and "holds 2 DICOM series" in found.failed[0].error
    # review finding: under --pseudonymize the failure row named the folder
    secret = tmp_path / "DOE-JANE-1961"
    shutil.move(two, secret)
    found = find_slides([tmp_path], pseudonyms=Pseudonyms(tmp_path / "map.json"))
    row = next(r for r in found.failed if "holds 2 DICOM series" in r.error)
    assert "DOE-JANE" not in f"{row.slide_id} {row.file} {row.error}", row


def test_pseudonymized_notes_and_errors_name_no_file_or_roi(cohort: Path, tmp_path: Path
                                                           ) -> None:
    import tifffile

    from gigamil.synth.slides import damage_tile

    src = tmp_path / "in" / "DOE-JOHN-1970.svs"
    src.parent.mkdir()
    shutil.copy(cohort / "s002.svs", src)
    with tifffile.TiffFile(src) as tif:
        level1 = next(i for i, p in enumerate(tif.pages) if p.is_tiled and i > 0)
        n = len(tif.pages[level1].dataoffsets)
    for k in range(n):  # tissue detection falls back to level 0, with a note
        damage_tile(src, level1, k, "zero")
    cfg = ExtractConfig(mpp=0.5, patch_size=128, pseudonymize=True)
    res = extract_slides([src], tmp_path / "o", cfg)[0]
    assert res.status == "ok" and "read level 0 instead" in res.note
    rois = tmp_path / "roi_JaneClinic"
    rois.mkdir()
    (rois / "DOE-JOHN-1970.geojson").write_text("not json")
    bad = extract_slides([src], tmp_path / "o2", ExtractConfig(
        mpp=0.5, patch_size=128, pseudonymize=True, roi_dir=str(rois)))[0]
    assert bad.status == "failed" and "GeoJSON" in bad.error
    for out in (tmp_path / "o", tmp_path / "o2"):
        data = _all_bytes(out)
        for word in ("DOE-JOHN", "JaneClinic"):
            assert word.encode() not in data, (out, word)


def test_asking_for_geojson_on_a_rerun_writes_it(cohort: Path, tmp_path: Path) -> None:
    cfg = ExtractConfig(mpp=1.0, patch_size=64)
    assert extract_slides([cohort / "s000.svs"], tmp_path, cfg)[0].status == "ok"
    res = extract_slides([cohort / "s000.svs"], tmp_path, ExtractConfig(mpp=1.0, patch_size=64,
                                                                         geojson=True))[0]
    assert res.status == "ok" and (tmp_path / "geojson" / "s000.geojson").is_file()
    again = extract_slides([cohort / "s000.svs"], tmp_path, ExtractConfig(
        mpp=1.0, patch_size=64, geojson=True))[0]
    assert again.status == "skipped"


def test_inspect_shows_format_and_backend_of_a_dicom_folder(dicom_pair: tuple[Path, Path]
                                                            ) -> None:
    _, series = dicom_pair
    result = runner.invoke(app, ["inspect", "slide", str(series), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"] == "dicom" and info["backend"] == "wsidicom"
    assert not any(v in result.output for v in FAKE_PHI.values())
