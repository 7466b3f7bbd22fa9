"""QuPath GeoJSON: tissue/patch export and ROI import (real shapely, real files)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import box, shape

from gigamil.errors import UsageError
from gigamil.wsi.qupath import (
    Roi,
    load_roi,
    patch_features,
    roi_path,
    tissue_features,
    tissue_geometry,
    write_geojson,
)
from gigamil.wsi.tissue import TissueMask

W, H = 8192, 6144


def _annotation(geometry: dict[str, Any], cls: str | None = None) -> dict[str, Any]:
    props: dict[str, Any] = {"objectType": "annotation"}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    return {"type": "Feature", "id": "0b1f", "geometry": geometry, "properties": props}


def _poly(x0: float, y0: float, x1: float, y1: float) -> dict[str, Any]:
    return {"type": "Polygon",
            "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def _write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _grid(step: int, size: int = 256, width: int = W, height: int = H) -> np.ndarray:
    xs = np.arange(0, width - size + 1, step, dtype=np.int64)
    ys = np.arange(0, height - size + 1, step, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def _overlap(c: np.ndarray, s: float, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Exact share of each patch inside an axis-aligned rectangle."""
    ox = np.clip(np.minimum(c[:, 0] + s, x1) - np.maximum(c[:, 0], x0), 0, None)
    oy = np.clip(np.minimum(c[:, 1] + s, y1) - np.maximum(c[:, 1], y0), 0, None)
    return ox * oy / (s * s)


# --------------------------------------------------------------------------- ROI selection


@pytest.mark.parametrize("min_fraction", [0.05, 0.25, 0.5, 0.9, 1.0])
def test_square_roi_keeps_exactly_the_patches_inside(tmp_path: Path, min_fraction: float) -> None:
    rect = (1000.0, 1100.0, 3000.0, 2950.0)
    roi = load_roi(_write(tmp_path / "s.geojson", {"type": "FeatureCollection",
                                                   "features": [_annotation(_poly(*rect))]}), W, H)
    coords = _grid(200)
    frac = _overlap(coords, 256, *rect)
    np.testing.assert_allclose(roi.inside_fraction(coords, 256), frac, atol=1e-5)
    kept = roi.keep(coords, 256, min_fraction)
    np.testing.assert_array_equal(kept, frac >= min_fraction - 1e-9)
    assert 0 < kept.sum() < len(coords)
    assert roi.area_fraction == pytest.approx(2000 * 1850 / (W * H))


def test_holes_are_excluded(tmp_path: Path) -> None:
    outer = [[0, 0], [4000, 0], [4000, 4000], [0, 4000], [0, 0]]
    hole = [[1000, 1000], [3000, 1000], [3000, 3000], [1000, 3000], [1000, 1000]]
    geom = {"type": "Polygon", "coordinates": [outer, hole]}
    roi = load_roi(_write(tmp_path / "h.geojson", [_annotation(geom)]), W, H)
    coords = np.array([[100, 100], [1500, 1500], [2700, 2700], [3900, 200], [900, 1500],
                       [2850, 1500]])
    np.testing.assert_allclose(roi.inside_fraction(coords, 256),
                               [1, 0, 0, 100 / 256, 100 / 256, 106 / 256], atol=1e-5)
    np.testing.assert_array_equal(roi.keep(coords, 256), [True, False, False, False, False, False])
    np.testing.assert_array_equal(roi.keep(coords, 256, 0.4), [True, 0, 0, 0, 0, True])


def test_class_filter_is_case_insensitive_and_matches_derived_classes(tmp_path: Path) -> None:
    doc = {"type": "FeatureCollection", "features": [
        _annotation(_poly(0, 0, 1000, 1000), "Tumor"),
        _annotation(_poly(2000, 0, 3000, 1000), "Stroma"),
        _annotation(_poly(4000, 0, 5000, 1000), "Tumor: Positive"),
        _annotation(_poly(6000, 0, 7000, 1000)),  # unclassified
    ]}
    path = _write(tmp_path / "c.geojson", doc)
    assert load_roi(path, W, H).geometry.area == pytest.approx(4e6)
    tumor = load_roi(path, W, H, classes=["TUMOR"])
    assert tumor.geometry.area == pytest.approx(2e6)
    assert tumor.classes == ("Tumor", "Tumor: Positive")
    stroma = load_roi(path, W, H, classes=["stroma", "necrosis"])
    assert stroma.geometry.equals(box(2000, 0, 3000, 1000))
    with pytest.raises(UsageError, match=r"no annotation of class Necrosis.*Stroma, Tumor"):
        load_roi(path, W, H, classes=["Necrosis"])


def test_multipolygon_and_overlapping_annotations_are_unioned(tmp_path: Path) -> None:
    multi = {"type": "MultiPolygon", "coordinates": [_poly(0, 0, 1000, 1000)["coordinates"],
                                                     _poly(5000, 5000, 6000, 6000)["coordinates"]]}
    doc = [_annotation(multi), _annotation(_poly(500, 0, 1500, 1000))]
    roi = load_roi(_write(tmp_path / "m.geojson", doc), W, H)
    assert roi.geometry.geom_type == "MultiPolygon"
    assert roi.geometry.area == pytest.approx(1500 * 1000 + 1000 * 1000)
    coords = np.array([[1200, 300], [5300, 5300], [3000, 3000]])
    np.testing.assert_array_equal(roi.keep(coords, 256), [True, True, False])


def test_every_shape_qupath_writes_is_read(tmp_path: Path) -> None:
    geom = _poly(100, 100, 900, 900)
    legacy = {"type": "Feature", "id": "PathAnnotationObject", "geometry": geom,
              "properties": {"classification": {"name": "Tumor", "colorRGB": -3670016},
                             "isLocked": False, "measurements": []}}
    detection = {"type": "Feature", "id": "PathDetectionObject",
                 "geometry": _poly(0, 0, 5000, 5000), "properties": {}}
    for i, doc in enumerate([_annotation(geom), [_annotation(geom)], geom, legacy,
                             [legacy, detection], {"type": "FeatureCollection",
                                                   "features": [geom]}]):
        roi = load_roi(_write(tmp_path / f"{i}.geojson", doc), W, H)
        assert roi.geometry.equals(box(100, 100, 900, 900)), doc


def test_invalid_polygon_is_made_valid(tmp_path: Path) -> None:
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [2000, 2000], [2000, 0], [0, 2000],
                                                  [0, 0]]]}
    roi = load_roi(_write(tmp_path / "b.geojson", _annotation(bowtie)), W, H)
    assert roi.geometry.is_valid
    assert roi.geometry.area == pytest.approx(2_000_000)


def test_roi_partly_outside_is_clipped(tmp_path: Path) -> None:
    roi = load_roi(_write(tmp_path / "p.geojson", _annotation(_poly(-500, 5000, 1000, 9000))),
                   W, H)
    assert roi.geometry.equals(box(0, 5000, 1000, H))


# --------------------------------------------------------------------------- errors


def test_missing_file_and_roi_path(tmp_path: Path) -> None:
    assert roi_path(tmp_path, "s1") == tmp_path / "s1.geojson"
    (tmp_path / "s2.json").write_text("{}")
    assert roi_path(tmp_path, "s2") == tmp_path / "s2.json"
    with pytest.raises(UsageError, match=r"s1\.geojson does not exist.*Export objects"):
        load_roi(roi_path(tmp_path, "s1"), W, H)


@pytest.mark.parametrize(("content", "pattern"), [
    ("<xml>not json</xml>", r"bad\.geojson is not JSON.*Export objects → GeoJSON"),
    (b"\xff\xfe\x00garbage", r"bad\.geojson is not JSON"),
    ('{"name": "something else"}', r"bad\.geojson is JSON but not GeoJSON.*Export objects"),
    ("42", r"not GeoJSON"),
    ('{"type": "FeatureCollection", "features": 3}', r"not GeoJSON"),
    ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": 5}}]',
     r"feature 0 has an unreadable geometry"),
])
def test_not_geojson(tmp_path: Path, content: str | bytes, pattern: str) -> None:
    path = tmp_path / "bad.geojson"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(UsageError, match=pattern):
        load_roi(path, W, H)


def test_no_polygon_annotation(tmp_path: Path) -> None:
    point = _annotation({"type": "Point", "coordinates": [10, 10]})
    tile = {"type": "Feature", "geometry": _poly(0, 0, 256, 256),
            "properties": {"objectType": "tile"}}
    path = _write(tmp_path / "pts.geojson", {"type": "FeatureCollection", "features": [point, tile]})
    with pytest.raises(UsageError, match=r"no polygon annotation \(only 1 Point annotation, 1 tile\)"):
        load_roi(path, W, H)
    empty = _write(tmp_path / "empty.geojson", {"type": "FeatureCollection", "features": []})
    with pytest.raises(UsageError, match=r"empty\.geojson has no polygon annotation"):
        load_roi(empty, W, H)


def test_roi_entirely_outside_the_slide(tmp_path: Path) -> None:
    path = _write(tmp_path / "far.geojson", _annotation(_poly(20000, 30000, 21000, 31000)))
    with pytest.raises(UsageError, match=r"x 20000–21000, y 30000–31000.*entirely outside the slide "
                                         r"\(0–8192 x 0–6144.*another slide, or at another scale"):
        load_roi(path, W, H)


def test_keep_checks_min_fraction(tmp_path: Path) -> None:
    roi = Roi(box(0, 0, 10, 10), 10, 10)
    with pytest.raises(UsageError, match="must be in"):
        roi.keep(np.zeros((1, 2), np.int64), 4, 0.0)
    assert roi.keep(np.zeros((0, 2), np.int64), 4).shape == (0,)


# --------------------------------------------------------------------------- output


def test_patch_geojson_is_what_qupath_reads(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [512, 256], [1024, 1024]], np.int64)
    attention = np.array([0.1, np.nan, 0.7], np.float32)
    feats = patch_features(coords, 362.04, {"tissue": np.array([1.0, 0.5, 0.75]),
                                            "attention": attention})
    path = write_geojson(tmp_path / "out" / "s.geojson", feats)
    text = path.read_text()
    assert "NaN" not in text and ": " not in text  # strict, compact JSON
    doc = json.loads(text)
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 3
    for f, (x, y) in zip(doc["features"], coords):
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) == 5
        assert shape(f["geometry"]).equals(box(x, y, x + 362.04, y + 362.04))
        props = f["properties"]
        assert props["objectType"] == "tile"
        assert props["classification"]["name"] == "Patch"
        assert len(props["classification"]["color"]) == 3
        assert all(isinstance(v, float) for v in props["measurements"].values())
    assert doc["features"][1]["properties"]["measurements"] == {"tissue": 0.5}
    assert doc["features"][2]["properties"]["measurements"]["attention"] == pytest.approx(0.7)
    bare = patch_features(coords[:1], 256, classification=None, object_type="detection")
    assert bare[0]["properties"] == {"objectType": "detection"}
    assert not list(tmp_path.glob("out/.*tmp*"))  # atomic write leaves no temporary


def test_patch_features_reject_bad_input() -> None:
    with pytest.raises(UsageError, match="object type"):
        patch_features(np.zeros((1, 2)), 256, object_type="cells")
    with pytest.raises(ValueError, match="shape"):
        patch_features(np.zeros((2, 2)), 256, {"a": np.zeros(3)})


def test_written_patches_load_back_as_roi(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [256, 0], [4096, 4096]], np.int64)
    feats = patch_features(coords, 256, object_type="annotation", classification="Tumor")
    roi = load_roi(write_geojson(tmp_path / "r.geojson", feats), W, H, classes=["tumor"])
    assert roi.geometry.equals(shapely.union_all([box(0, 0, 512, 256), box(4096, 4096, 4352, 4352)]))
    np.testing.assert_array_equal(roi.keep(_grid(256), 256).sum(), 3)


def _synthetic_mask() -> np.ndarray:
    m = np.zeros((300, 400), np.uint8)
    cv2.ellipse(m, (150, 150), (100, 70), 20, 0, 360, 1, -1)
    cv2.circle(m, (150, 150), 25, 0, -1)  # a hole (about 1 mm²)
    cv2.rectangle(m, (280, 40), (380, 260), 1, -1)
    cv2.circle(m, (330, 150), 12, 0, -1)  # another hole
    m[5, 5] = 1  # a speck
    return m.astype(bool)


def test_tissue_features_cover_the_tissue_and_not_the_background(tmp_path: Path) -> None:
    mask, mpp, mpp0 = _synthetic_mask(), 8.0, 0.25
    tissue = TissueMask(mask, mpp)
    feats = tissue_features(tissue, mpp0)
    assert len(feats) == 2  # ellipse and rectangle; the speck is dropped
    assert all(f["properties"]["objectType"] == "annotation"
               and f["properties"]["classification"]["name"] == "Tissue" for f in feats)
    assert all(len(f["geometry"]["coordinates"]) == 2 for f in feats)  # each with its hole
    roi = load_roi(write_geojson(tmp_path / "t.geojson", feats), W * 2, H * 2)
    geom = roi.geometry
    f = mpp / mpp0
    rows, cols = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    inside = shapely.contains_xy(geom, (cols.ravel() + 0.5) * f,
                                 (rows.ravel() + 0.5) * f).reshape(mask.shape)
    expected = mask.copy()
    expected[5, 5] = False
    assert inside[expected].all()  # every tissue pixel
    near = cv2.dilate(expected.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert not inside[~near].any()  # no background pixel away from the outline
    assert (inside & ~expected).sum() < 0.001 * expected.sum()
    assert geom.area == pytest.approx(expected.sum() * f * f, rel=0.01)
    n_vertices = sum(len(r) for ft in feats for r in ft["geometry"]["coordinates"])
    assert n_vertices < 0.5 * int(cv2.Canny(expected.astype(np.uint8) * 255, 0, 1).astype(bool).sum())
    # one feature in all, and an empty mask gives none
    single = tissue_features(tissue, mpp0, split=False)
    assert len(single) == 1 and single[0]["geometry"]["type"] == "MultiPolygon"
    assert tissue_features(TissueMask(np.zeros((10, 10), bool), mpp), mpp0) == []
    assert math.isclose(tissue_geometry(tissue, mpp0).area, geom.area, rel_tol=1e-4)


def test_keep_100k_patches_is_fast() -> None:
    size0 = 316.0
    ring = shapely.Point(50_000, 50_000).buffer(40_000, quad_segs=256)
    roi = Roi(ring.difference(shapely.Point(50_000, 50_000).buffer(10_000)), 100_000, 100_000)
    coords = _grid(316, 316, 100_000, 100_000)
    assert len(coords) >= 99_000
    t0 = time.process_time()
    kept = roi.keep(coords, size0)
    elapsed = time.process_time() - t0
    centres = coords + size0 / 2
    r = np.hypot(centres[:, 0] - 50_000, centres[:, 1] - 50_000)
    clear = (np.abs(r - 40_000) > size0) & (np.abs(r - 10_000) > size0)
    np.testing.assert_array_equal(kept[clear], ((r > 10_000) & (r < 40_000))[clear])
    assert elapsed < 3.0, elapsed  # CPU seconds: a busy machine does not inflate them


def test_keep_with_a_detailed_outline_is_fast_and_exact() -> None:
    t = np.linspace(0, 2 * np.pi, 20_000, endpoint=False)
    r = 40_000 + 3_000 * np.sin(37 * t) + 1_000 * np.sin(211 * t)  # a brush-like outline
    outline = shapely.Polygon(np.c_[50_000 + r * np.cos(t), 50_000 + r * np.sin(t)])
    roi = Roi(outline, 100_000, 100_000)
    coords = _grid(316, 316, 100_000, 100_000)
    t0 = time.process_time()
    frac = roi.inside_fraction(coords, 316)
    elapsed = time.process_time() - t0
    edge = np.flatnonzero((frac > 0) & (frac < 1))
    sample = np.random.default_rng(0).choice(edge, 150, replace=False)
    x, y = coords[sample, 0], coords[sample, 1]
    exact = shapely.area(shapely.intersection(outline, shapely.box(x, y, x + 316, y + 316)))
    np.testing.assert_allclose(frac[sample], exact / 316**2, atol=1e-5)
    assert elapsed < 3.0, elapsed  # CPU seconds: a busy machine does not inflate them
