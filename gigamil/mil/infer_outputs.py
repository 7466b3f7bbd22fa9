"""What inference writes: one slide's ``.json``/``.npz``/heatmap, and the run's tables.

    write_slide(spec, "preds/", path, row, coords, scores, patch_size_level0)
    write_outputs("preds/", spec, failures)          # predictions.csv + failures.csv

Each slide's result is written atomically, its ``.json`` last: the json marks it done
(:func:`slide_done`), so a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gigamil.errors import SlideError
from gigamil.io import atomic_path, write_csv, write_json, write_slide_vectors
from gigamil.layout import PredictionsDir
from gigamil.mil.infer_spec import InferenceSpec

if TYPE_CHECKING:
    from gigamil.mil.infer import SlideScores

__all__ = ["SlideFailure", "SlideOutcome", "slide_done", "headline", "prediction_row",
           "write_slide", "slide_heatmap", "write_outputs", "write_embeddings",
           "PREDICTION_FIELDS", "FAILURE_FIELDS"]

log = logging.getLogger(__name__)

PREDICTION_FIELDS = ["slide_id", "pred", "uncertainty", "n_patches", "qc", "model", "seconds"]
FAILURE_FIELDS = ["slide_id", "file", "error"]


@dataclass(frozen=True)
class SlideFailure:
    """A slide that could not be predicted: a row of ``failures.csv``."""

    slide_id: str
    file: str
    error: str

    def row(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SlideOutcome:
    """What became of one slide: its prediction row, or its failure."""

    row: dict[str, Any] | None = None
    failure: SlideFailure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def describe(self) -> str:
        """``s001 tumor``, or ``s002.svs failed``: one line for a progress bar."""
        if self.row is not None:
            return f"{self.row['slide_id']} {headline(self.row)}"
        return f"{self.failure.file if self.failure else '?'} failed"


def headline(row: dict[str, Any]) -> str:
    """What a prediction row says first: the class, else the first target's score."""
    if "pred" in row:
        return str(row["pred"])
    for k, v in row.items():
        if k not in ("slide_id",):
            return f"{k} {v}"
    return ""


def slide_done(out: Path, sid: str, spec: InferenceSpec | None = None) -> bool:
    """Whether the slide's result is already written under ``out`` (with every extra
    file ``spec`` asks for: heatmap, GeoJSON, top patches)."""
    if not PredictionsDir(out).slide_json(sid).exists():
        return False
    return spec is None or all(p.exists() for p in spec.extra_outputs(out, sid))


def prediction_row(spec: InferenceSpec, sid: str, scores: SlideScores, qc: str,
                   seconds: float) -> dict[str, Any]:
    """The slide's row of ``predictions.csv`` (also its ``.json``)."""
    if scores.targets is not None:  # survival, regression, several targets: each one's cells
        cells = {k: v for c in scores.targets.values() for k, v in c.items()}
        return {"slide_id": sid, **cells, "n_patches": int(len(scores.attention)), "qc": qc,
                "model": spec.model_id(), "seconds": round(seconds, 3)}
    return {"slide_id": sid, "pred": spec.classes[int(scores.probs.argmax())],
            **{f"prob_{c}": float(scores.probs[k]) for k, c in enumerate(spec.classes)},
            "uncertainty": scores.uncertainty, "n_patches": int(len(scores.attention)),
            "qc": qc, "model": spec.model_id(), "seconds": round(seconds, 3)}


def write_slide(spec: InferenceSpec, out: str | os.PathLike[str], path: str | os.PathLike[str],
                row: dict[str, Any], coords: np.ndarray, scores: SlideScores,
                patch_size_level0: float) -> dict[str, Any]:
    """Write one slide's ``.npz`` (coords, attention, per-patch probabilities if computed,
    each fold model's slide vector), heatmap, GeoJSON and top patches as asked, then its
    ``.json`` (last: the json marks the slide done), each atomically."""
    preds = PredictionsDir(out)
    sid = row["slide_id"]
    arrays = {"coords": coords, "attention": scores.attention.astype(np.float32)}
    if scores.patch_probs is not None:
        arrays["probability"] = scores.patch_probs
    if scores.embedding is not None:
        arrays["slide_embedding"] = scores.embedding
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub: **kwds
    with atomic_path(preds.slide_npz(sid)) as tmp:
        tmp.write_bytes(buf.getvalue())
    if spec.heatmaps:
        from gigamil.wsi.preview import save_png

        save_png(preds.heatmap(sid),
                 slide_heatmap(spec, path, coords, scores, patch_size_level0,
                               title=f"{sid}: {headline(row)}"))
    if spec.geojson:
        from gigamil.mil.explain import patch_measurements
        from gigamil.wsi.qupath import write_geojson

        write_geojson(preds.geojson(sid), patch_measurements(
            coords, patch_size_level0, scores.attention,
            scores.patch_probs if spec.single_classification else None, spec.classes))
    if spec.top_patches:
        from gigamil.mil.explain import top_patch_montage
        from gigamil.wsi.preview import save_png

        try:  # a picture that cannot be read is reported; the prediction stands
            save_png(preds.top_patches(sid), top_patch_montage(
                path, coords, patch_size_level0, spec.extract.patch_size, scores.attention,
                spec.top_patches, spec.extract, title=f"{sid}: {headline(row)}"))
        except SlideError as exc:
            log.warning("%s: no top-patch montage (%s)", sid, exc)
    write_json(preds.slide_json(sid), row)
    return row


def slide_heatmap(spec: InferenceSpec, path: str | os.PathLike[str], coords: np.ndarray,
                  scores: SlideScores, patch_size_level0: float, title: str = "") -> np.ndarray:
    """Attention (rank-scaled) or a class's per-patch probability over a thumbnail read at
    ``HEATMAP_MPP`` (bounded memory), with a colour bar."""
    from gigamil.mil.heatmap import HEATMAP_MPP, attention_heatmap
    from gigamil.wsi.reader import open_slide

    with open_slide(path) as slide:
        thumb = slide.read_at_mpp(HEATMAP_MPP)
        scale = slide.mpp / HEATMAP_MPP
    if spec.heatmap_values == "probability" and scores.patch_probs is not None:
        k = spec.heatmap_class_index()
        return attention_heatmap(thumb, scale, coords, patch_size_level0,
                                 scores.patch_probs[:, k], title=title, rank_scale=False,
                                 label=f"P({spec.classes[k]}) per patch")
    return attention_heatmap(thumb, scale, coords, patch_size_level0, scores.attention,
                             title=title)


def write_embeddings(preds: PredictionsDir, ids: Sequence[str], spec: InferenceSpec) -> None:
    """``embeddings.h5``: ``slide_id`` (n,) and ``embedding`` (n, folds, E), every slide's
    attention-pooled vector of each fold model, gathered from the ``.npz`` files (none
    with the ONNX engine, whose graphs return logits and attention only)."""
    ids_kept, vectors = [], []
    for sid in ids:
        if not preds.slide_npz(sid).exists():
            continue
        with np.load(preds.slide_npz(sid)) as z:
            if "slide_embedding" in z.files:
                ids_kept.append(sid)
                vectors.append(z["slide_embedding"])
    if len(vectors) < len(ids):
        log.warning("%d of %d slides have no slide embedding (ONNX engine, or predicted by an "
                    "older version: rerun them with --engine torch into a fresh --out)",
                    len(ids) - len(vectors), len(ids))
    if not vectors or len({v.shape for v in vectors}) != 1:
        preds.embeddings.unlink(missing_ok=True)  # never a stale file of other models
        return
    write_slide_vectors(preds.embeddings, ids_kept, np.stack(vectors), {
        "model_id": spec.model_id(),
        "folds": [Path(m).parent.name if m.endswith(".pt") else Path(m).stem
                  for m in spec.model_files]})


def write_outputs(out: str | os.PathLike[str], spec: InferenceSpec,
                  failures: Sequence[SlideFailure], stats: dict[str, Any] | None = None
                  ) -> tuple[Path, Path]:
    """Aggregate ``slides/*.json`` into ``predictions.csv``; write ``failures.csv`` and
    ``infer_config.json`` (the resolved spec, with names instead of paths, and ``stats``)."""
    from gigamil.versions import gigamil_version, package_versions

    preds = PredictionsDir(out)
    rows = [json.loads(p.read_text()) for p in preds.slide_results()]
    if spec.single_classification:
        fields = (PREDICTION_FIELDS[:2] + [f"prob_{c}" for c in spec.classes]
                  + PREDICTION_FIELDS[2:])
    else:  # every target's cells, in the run's order
        fixed = {"slide_id", *PREDICTION_FIELDS[3:]}
        cells = [k for k in (rows[0] if rows else {}) if k not in fixed]
        fields = ["slide_id", *cells, *PREDICTION_FIELDS[3:]]
    write_csv(preds.predictions, rows, fields)
    write_csv(preds.failures, [f.row() for f in failures], FAILURE_FIELDS)
    write_embeddings(preds, [str(r["slide_id"]) for r in rows], spec)
    config = dataclasses.asdict(spec) | {
        "run": Path(spec.run).name, "model_id": spec.model_id(),
        "model_files": [str(Path(m).relative_to(spec.run)) if Path(m).is_relative_to(spec.run)
                        else Path(m).name for m in spec.model_files],
        "encoder_weights": Path(spec.encoder_weights).name if spec.encoder_weights else None,
        "slide_ids": len(spec.slide_ids)}  # paths → ids: the count only (paths may be PHI)
    write_json(preds.config, {
        "config": config, "pipeline": stats or {},
        "versions": {"gigamil": gigamil_version(), **package_versions(), "torch": torch.__version__}})
    return preds.predictions, preds.failures
