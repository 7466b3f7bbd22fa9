"""QuPath interchange: GeoJSON out (tissue, patches, scores) and regions of interest in.

QuPath's GeoJSON is in level-0 pixels (y down): a ``FeatureCollection`` of features
whose ``properties`` carry ``objectType`` (``annotation``, ``detection``, ``tile``…),
an optional ``classification`` ``{"name", "color"}`` and ``measurements`` as a flat
``{name: number}`` object. :func:`tissue_features` outlines a tissue mask as
"Tissue" annotations; :func:`patch_features` makes one square per patch with its
measurements (tissue fraction, attention, probabilities); :func:`write_geojson`
writes them crash-safely. :func:`load_roi` reads a QuPath export (collection,
feature, list of features or bare geometry) into a :class:`Roi`, the union of its
polygon annotations clipped to the slide, which selects patches with :meth:`Roi.keep`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import cv2
import numpy as np
import shapely
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box, mapping, shape
from shapely.geometry.base import BaseGeometry

from gigamil.errors import UsageError
from gigamil.io import atomic_open
from gigamil.wsi.tissue import TissueMask

__all__ = [
    "OBJECT_TYPES",
    "Roi",
    "tissue_geometry",
    "tissue_features",
    "patch_features",
    "write_geojson",
    "roi_path",
    "load_roi",
]

#: QuPath object types a feature may be written as.
OBJECT_TYPES = ("annotation", "detection", "tile", "cell")
#: QuPath <= 0.2 names the object type in the feature ``id``.
_LEGACY_TYPES = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
                 "PathTileObject": "tile", "PathCellObject": "cell"}
_GEOMETRY_TYPES = {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon",
                   "MultiPolygon", "GeometryCollection"}
_EXPORT_HINT = "export it from QuPath with File → Export objects → GeoJSON"
_POLYGONAL = (shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON)


# --------------------------------------------------------------------------- output


def tissue_geometry(
    tissue: TissueMask,
    level0_mpp: float,
    min_area_um2: float = 10_000.0,
    tolerance_px: float = 0.4,
) -> Polygon | MultiPolygon:
    """The tissue of ``tissue`` as (Multi)Polygon in level-0 px.

    Outlines follow the mask's pixel edges; pieces and holes smaller than
    ``min_area_um2`` are dropped and outlines are simplified by ``tolerance_px``
    mask pixels (below half a pixel, every mask pixel keeps its side).
    """
    if not level0_mpp > 0:
        raise ValueError(f"level0_mpp must be positive, got {level0_mpp}")
    min_px = min_area_um2 / (tissue.mpp * tissue.mpp)
    mask = _without_small(np.asarray(tissue.mask, dtype=np.uint8), min_px)
    if mask.ndim != 2 or not mask.any():
        return MultiPolygon()
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    tree = hierarchy[0]  # per contour: next, previous, first child, parent
    parts: list[BaseGeometry] = []
    for i, contour in enumerate(contours):
        if tree[i][3] != -1:  # a hole: added with its outer contour
            continue
        shell = contour[:, 0, :].astype(np.float64) + 0.5  # pixel centres, edges on integers
        holes = []
        child = tree[i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                holes.append(contours[child][:, 0, :].astype(np.float64) + 0.5)
            child = tree[child][0]
        parts.append(shapely.make_valid(Polygon(shell, holes)) if len(shell) >= 3
                     else LineString(shell) if len(shell) == 2 else Point(shell[0]))
    # the contours pass through the centres of the border pixels: grow by half a pixel
    merged = shapely.GeometryCollection(parts).simplify(tolerance_px)
    outline = merged.buffer(0.5, cap_style="square", join_style="mitre")  # also unions
    kept = []
    for poly in _polygons(outline):
        if poly.area < min_px:
            continue
        holes = [r for r in poly.interiors if Polygon(r).area >= min_px]
        kept.append(Polygon(poly.exterior, holes))
    f = tissue.mpp / level0_mpp  # level-0 px per mask px, as TissueMask.coverage uses it
    geom = shapely.transform(MultiPolygon(kept), lambda xy: xy * f)
    return geom.geoms[0] if len(geom.geoms) == 1 else geom


def _without_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """``mask`` (uint8) without pieces or enclosed holes smaller than ``min_px`` pixels."""
    if mask.ndim != 2 or not mask.any() or min_px <= 1:
        return mask
    out = mask.copy()
    for value in (1, 0):  # pieces of tissue, then holes (background not touching the border)
        _, labels, stats, _ = cv2.connectedComponentsWithStats((out == value).astype(np.uint8))
        x, y, w, h, area = stats.T
        small = area < min_px
        if value == 0:
            small &= (x > 0) & (y > 0) & (x + w < out.shape[1]) & (y + h < out.shape[0])
        small[0] = False  # label 0 is the complement
        out[small[labels]] = 1 - value
    return out


def tissue_features(
    tissue: TissueMask,
    level0_mpp: float,
    classification: str = "Tissue",
    split: bool = True,
    min_area_um2: float = 10_000.0,
) -> list[dict[str, Any]]:
    """The tissue outline as QuPath annotations, one per piece (``split``) or one in all."""
    geom = tissue_geometry(tissue, level0_mpp, min_area_um2)
    if geom.is_empty:
        return []
    pieces: list[BaseGeometry] = list(_polygons(geom)) if split else [geom]
    color = _color(classification)
    return [{"type": "Feature",
             "geometry": mapping(shapely.transform(p, lambda xy: np.round(xy, 1))),
             "properties": {"objectType": "annotation",
                            "classification": {"name": classification, "color": color}}}
            for p in pieces]


def patch_features(
    coords: np.ndarray,
    size_level0: float,
    measurements: Mapping[str, np.ndarray] | None = None,
    classification: str | None = "Patch",
    object_type: str = "tile",
) -> list[dict[str, Any]]:
    """One square per patch (level-0 top-left ``coords`` (N, 2), side ``size_level0`` px).

    ``measurements`` maps names to (N,) arrays written as plain floats per patch
    (non-finite values are left out; QuPath shows them as missing).
    """
    if object_type not in OBJECT_TYPES:
        raise UsageError(f"unknown QuPath object type {object_type!r}",
                         f"use one of {', '.join(OBJECT_TYPES)}")
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    columns: dict[str, list[float]] = {}
    for name, values in (measurements or {}).items():
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (n,):
            raise ValueError(f"measurement {name!r} has shape {arr.shape}, expected ({n},)")
        columns[str(name)] = arr.tolist()
    s = float(size_level0)
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = x0 + s, y0 + s
    corners = np.stack([x0, y0, x1, y0, x1, y1, x0, y1, x0, y0], axis=1)
    rings: list[Any] = np.round(corners, 2).reshape(n, 5, 2).tolist()
    color = _color(classification) if classification is not None else None
    features: list[dict[str, Any]] = []
    for i, ring in enumerate(rings):
        props: dict[str, Any] = {"objectType": object_type}
        if classification is not None:
            props["classification"] = {"name": classification, "color": color}
        if columns:
            props["measurements"] = {k: v[i] for k, v in columns.items() if math.isfinite(v[i])}
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": props})
    return features


def write_geojson(path: str | os.PathLike[str], features: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``features`` as a compact GeoJSON ``FeatureCollection`` (atomically)."""
    path = Path(path)
    doc = {"type": "FeatureCollection", "features": list(features)}
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False)  # C encoder; dump() is not
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.write("\n")
    return path


def _color(name: str) -> list[int]:
    """A stable RGB colour for a class name (green for tissue, blue for patches)."""
    fixed = {"tissue": [80, 180, 80], "patch": [40, 120, 220]}
    return fixed.get(name.lower()) or [64 + b % 160 for b in hashlib.sha256(name.encode()).digest()[:3]]


def _polygons(geom: BaseGeometry) -> list[Polygon]:
    """The non-empty polygons in ``geom`` (any geometry type)."""
    parts = shapely.get_parts(shapely.get_parts(geom))  # collections may hold multi-parts
    return [p for p in parts if isinstance(p, Polygon) and not p.is_empty]


# --------------------------------------------------------------------------- input


@dataclass(frozen=True)
class Roi:
    """A region of interest in level-0 px, clipped to the ``width`` x ``height`` slide."""

    geometry: Polygon | MultiPolygon
    width: int
    height: int
    classes: tuple[str, ...] = ()  # classification names of the annotations used

    @property
    def area_fraction(self) -> float:
        """Share of the slide's level-0 area inside the ROI."""
        return float(self.geometry.area) / float(self.width * self.height)

    def inside_fraction(self, coords: np.ndarray, size_level0: float) -> np.ndarray:
        """(N,) float32: share of each square patch's area inside the ROI."""
        xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        if len(xy) == 0:
            return np.zeros(0, np.float32)
        s = float(size_level0)
        boxes = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + s, xy[:, 1] + s)
        geom = self.geometry
        shapely.prepare(geom)
        frac = np.zeros(len(xy), np.float64)
        inside = shapely.contains_properly(geom, boxes)
        frac[inside] = 1.0
        edge = np.flatnonzero(~inside & shapely.intersects(geom, boxes))
        if len(edge):
            frac[edge] = _overlap_areas(geom, xy[edge], s) / (s * s)
        return np.clip(frac, 0.0, 1.0).astype(np.float32)

    def keep(self, coords: np.ndarray, size_level0: float, min_fraction: float = 0.5) -> np.ndarray:
        """(N,) bool: patches with at least ``min_fraction`` of their area inside the ROI."""
        if not 0.0 < min_fraction <= 1.0:
            raise UsageError(f"ROI minimum fraction {min_fraction} must be in (0, 1]",
                             "e.g. 0.5 keeps patches at least half inside the ROI")
        return self.inside_fraction(coords, size_level0) >= np.float32(min_fraction) - 1e-6


def _overlap_areas(geom: BaseGeometry, xy: np.ndarray, s: float) -> np.ndarray:
    """Area of ``geom`` inside each ``s``-sided square at ``xy``.

    A detailed outline is cut into quadrants first, so that each square meets
    only the few vertices near it (a per-square intersection with the whole
    outline costs its whole vertex count).
    """
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    if len(xy) <= 64 or shapely.get_num_coordinates(geom) <= 256 or (lo == hi).all():
        boxes = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + s, xy[:, 1] + s)
        return np.asarray(shapely.area(shapely.intersection(geom, boxes)), dtype=np.float64)
    areas = np.zeros(len(xy), np.float64)
    mid = (lo + hi) / 2  # squares on either side of the middle fall in different quadrants
    quadrant = (xy[:, 0] > mid[0]).astype(np.int64) + 2 * (xy[:, 1] > mid[1])
    for q in np.unique(quadrant):
        idx = np.flatnonzero(quadrant == q)
        qlo, qhi = xy[idx].min(axis=0), xy[idx].max(axis=0) + s
        part = shapely.intersection(geom, shapely.box(qlo[0], qlo[1], qhi[0], qhi[1]))
        areas[idx] = _overlap_areas(part, xy[idx], s)
    return areas


def roi_path(roi_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """Where the ROI of ``slide_id`` lives: ``<roi_dir>/<slide_id>.geojson``.

    A ``<slide_id>.json`` is used when only that exists. The path is returned
    whether or not it exists; :func:`load_roi` says when it is missing.
    """
    path, alt = Path(roi_dir) / f"{slide_id}.geojson", Path(roi_dir) / f"{slide_id}.json"
    return alt if not path.exists() and alt.exists() else path


def load_roi(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    classes: Sequence[str] | None = None,
) -> Roi:
    """The union of the polygon annotations in a QuPath GeoJSON file, clipped to the slide.

    ``width`` and ``height`` are the slide's level-0 size. With ``classes``, only
    annotations whose classification is one of them (case-insensitive) are used.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"ROI file {path} does not exist",
                         f"name it <slide_id>.geojson and {_EXPORT_HINT}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"ROI file {path} is not JSON ({exc})", _EXPORT_HINT) from exc
    features = _as_features(doc, path)
    wanted = {c.strip().lower() for c in classes} if classes else None
    geoms: list[BaseGeometry] = []
    found_classes: set[str] = set()
    used_classes: set[str] = set()
    skipped: dict[str, int] = {}
    for i, feat in enumerate(features):
        props = feat["properties"] if isinstance(feat.get("properties"), dict) else {}
        kind = _object_type(feat, props)
        geom = _shape(feat.get("geometry"), path, i)
        polys = [shapely.make_valid(g) for g in shapely.get_parts(geom)
                 if shapely.get_type_id(g) in _POLYGONAL]
        if kind != "annotation" or not polys:
            what = kind if kind != "annotation" else f"{geom.geom_type} annotation"
            skipped[what] = skipped.get(what, 0) + 1
            continue
        names = _class_names(props)
        found_classes.update(names[:1] or ["(unclassified)"])
        if wanted is not None and not wanted & {n.lower() for n in names}:
            continue
        used_classes.update(names[:1])
        geoms.extend(polys)
    union = MultiPolygon(_polygons(shapely.union_all(geoms))) if geoms else MultiPolygon()
    if union.is_empty or union.area <= 0:
        _raise_no_polygons(path, classes, found_classes, skipped)
    minx, miny, maxx, maxy = union.bounds
    clipped = MultiPolygon(_polygons(shapely.intersection(union, box(0, 0, width, height))))
    if clipped.is_empty or clipped.area <= 0:
        raise UsageError(
            f"ROI in {path} (x {minx:.0f}–{maxx:.0f}, y {miny:.0f}–{maxy:.0f} px) lies entirely "
            f"outside the slide (0–{width} x 0–{height} level-0 px)",
            "was it exported from another slide, or at another scale? QuPath exports "
            "level-0 pixel coordinates",
        )
    geometry = clipped.geoms[0] if len(clipped.geoms) == 1 else clipped
    return Roi(geometry, int(width), int(height), tuple(sorted(used_classes)))


def _as_features(doc: Any, path: Path) -> list[dict[str, Any]]:
    """The features of any GeoJSON shape QuPath writes."""
    not_geojson = UsageError(f"ROI file {path} is JSON but not GeoJSON", _EXPORT_HINT)
    collection = isinstance(doc, dict) and doc.get("type") == "FeatureCollection"
    items = doc.get("features") if collection else doc if isinstance(doc, list) else [doc]
    if not isinstance(items, list):
        raise not_geojson
    features = []
    for item in items:
        if isinstance(item, dict) and item.get("type") == "Feature":
            features.append(item)
        elif isinstance(item, dict) and item.get("type") in _GEOMETRY_TYPES:
            features.append({"type": "Feature", "geometry": item, "properties": {}})
        else:
            raise not_geojson
    return features


def _shape(geometry: Any, path: Path, index: int) -> BaseGeometry:
    if geometry is None:
        return Polygon()
    try:
        return shape(geometry)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError,
            shapely.errors.GEOSException) as exc:
        raise UsageError(f"ROI file {path}: feature {index} has an unreadable geometry ({exc})",
                         _EXPORT_HINT) from exc


def _object_type(feat: Mapping[str, Any], props: Mapping[str, Any]) -> str:
    kind = props.get("objectType") or props.get("object_type")
    if isinstance(kind, str):
        return kind.lower()
    legacy = feat.get("id")
    return _LEGACY_TYPES.get(legacy, "annotation") if isinstance(legacy, str) else "annotation"


def _class_names(props: Mapping[str, Any]) -> list[str]:
    """Full classification name first, then its parts ("Tumor: Positive" → Tumor, Positive)."""
    cls = props.get("classification")
    if isinstance(cls, str):
        full = cls
    elif isinstance(cls, dict) and isinstance(cls.get("name"), str):
        full = cls["name"]
    elif isinstance(cls, dict) and isinstance(cls.get("names"), list):
        full = ": ".join(str(n) for n in cls["names"])
    else:
        return []
    parts = [p.strip() for p in full.split(":") if p.strip()]
    return [full.strip(), *parts] if len(parts) > 1 else [full.strip()]


def _raise_no_polygons(path: Path, classes: Sequence[str] | None, found: set[str],
                       skipped: Mapping[str, int]) -> NoReturn:
    if classes and found:
        raise UsageError(
            f"ROI file {path} has no annotation of class {', '.join(classes)}",
            f"the classes there are: {', '.join(sorted(found))}")
    other = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items()))
    raise UsageError(
        f"ROI file {path} has no polygon annotation" + (f" (only {other})" if other else ""),
        f"draw the region as an area annotation (rectangle, polygon, brush) and {_EXPORT_HINT}")
