"""Predictions for new slides from a trained run: slide → patches → encoder → MIL models.

    spec = InferenceSpec.from_run("runs/crc1", engine="torch", folds="all")
    predictor = SlidePredictor(spec)                 # holds the encoder and the fold models
    row = predictor.predict_to("slides/a.svs", "preds/")   # writes preds/slides/a.json (+ .npz)
    write_outputs("preds/", spec, failures)          # predictions.csv + failures.csv

Each slide's result is written atomically on its own, so a rerun skips finished
slides and a crash loses at most the slides in flight. A slide goes through stages
(plan → read chunks → encode → MIL → write) that ``SlidePredictor.predict`` runs one
after another here and ``gigamil.cluster.ray`` spreads over Ray: reading in CPU tasks,
the models in actors. This module has no Ray in it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigamil.errors import UsageError
from gigamil.io import atomic_path, write_csv, write_json
from gigamil.wsi.extract import ExtractConfig
from gigamil.wsi.grid import PatchGrid
from gigamil.wsi.qc import QCConfig

__all__ = ["InferenceSpec", "SlideWork", "PatchChunk", "SlideScores", "SlidePredictor",
           "plan_inference",
           "read_chunk", "write_slide", "write_outputs", "slide_done", "PREDICTION_FIELDS"]

FAILURE_FIELDS = ["slide_id", "file", "error"]


def _extract_config(features_dir: Path) -> ExtractConfig:
    """The extraction the run's features were made with (so new slides are cut the same)."""
    saved = features_dir.parent.parent / "extract_config.json"
    if saved.exists():
        cfg = json.loads(saved.read_text())["config"]
        cfg["qc"] = QCConfig(**cfg["qc"])
        cfg["mpp"] = tuple(cfg["mpp"])
        cfg.update(previews=False, coords_h5=False)
        return ExtractConfig(**{k: v for k, v in cfg.items()
                                if k in {f.name for f in dataclasses.fields(ExtractConfig)}})
    from gigamil.wsi.features import bag_header

    for h5 in sorted(features_dir.glob("*.h5")):
        header = bag_header(h5)
        if header and "mpp" in header[0]:
            attrs = header[0]
            return ExtractConfig(mpp=float(attrs["mpp"]), patch_size=int(attrs["patch_size"]))
    raise UsageError(f"cannot tell how the features in {features_dir} were extracted",
                     "keep extract_config.json beside patches/ and features/")


@dataclass
class InferenceSpec:
    """Everything a worker needs to predict a slide (plain values: cheap to ship to Ray)."""

    run: str
    classes: list[str]
    model_files: list[str]  # best.pt per fold, or .onnx per fold with engine="onnx"
    encoder: str
    encoder_weights: str | None
    extract: ExtractConfig
    engine: str = "torch"
    device: str = "cpu"
    batch_size: int = 64
    chunk_patches: int = 512  # patches per read task (and per object-store chunk)
    threads: int = 1
    heatmaps: bool = False
    heatmap_values: str = "attention"  # or "probability": each patch scored as a bag of one
    heatmap_class: str | None = None  # the class whose probability is mapped [default: last]
    model_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run(cls, run: str | os.PathLike[str], engine: str = "torch", folds: str = "all",
                 device: str = "cpu", heatmaps: bool = False, batch_size: int = 64,
                 threads: int = 1, heatmap_values: str = "attention",
                 heatmap_class: str | None = None) -> InferenceSpec:
        from gigamil.mil.evaluate import _run_config, fold_models

        run = Path(run)
        config = _run_config(run)
        features = Path(config["config"]["features"])
        embed_cfg = features / "embed_config.json"
        if not embed_cfg.exists():
            raise UsageError(f"{embed_cfg} is missing",
                             "inference re-embeds new slides the way the run's features were made")
        embed = json.loads(embed_cfg.read_text())["config"]
        models = fold_models(run)
        if folds == "best":
            scores = []
            for m in models:
                meta = json.loads(m.with_suffix(".json").read_text())
                scores.append(meta.get("metric", 0.0))
            sign = -1 if config["config"].get("monitor", "loss") == "loss" else 1
            models = [models[int(np.argmax([sign * s for s in scores]))]]
        elif folds != "all":
            raise UsageError(f"--fold {folds!r} is not best or all")
        if heatmap_values not in ("attention", "probability"):
            raise UsageError(f"--heatmap-values {heatmap_values!r} is not attention or probability")
        if engine == "onnx":
            models = [_ensure_onnx(m, run) for m in models]
        elif engine != "torch":
            raise UsageError(f"--engine {engine!r} is not torch or onnx")
        spec = cls(run=str(run), classes=config["classes"], model_files=[str(m) for m in models],
                   encoder=embed["encoder"], encoder_weights=embed.get("weights"),
                   extract=_extract_config(features), engine=engine, device=device,
                   batch_size=batch_size, threads=threads, heatmaps=heatmaps,
                   heatmap_values=heatmap_values, heatmap_class=heatmap_class,
                   model_name=config["config"]["model"])
        spec.heatmap_class_index()  # an unknown --heatmap-class fails here, early
        return spec

    @property
    def patch_probs(self) -> bool:
        """Whether per-patch probabilities are computed (and saved in the .npz)."""
        return self.heatmap_values == "probability"

    def heatmap_class_index(self) -> int:
        if self.heatmap_class is None:
            return len(self.classes) - 1
        if self.heatmap_class not in self.classes:
            raise UsageError(f"--heatmap-class {self.heatmap_class!r} is not one of the run's "
                             f"classes {self.classes}", "pick one of them")
        return self.classes.index(self.heatmap_class)

    def model_id(self) -> str:
        folds = ",".join(Path(m).parent.name if m.endswith(".pt") else Path(m).stem
                         for m in self.model_files)
        return f"{Path(self.run).name}:{self.model_name}:{folds}:{self.engine}"


def _ensure_onnx(best: Path, run: Path) -> Path:
    from gigamil.mil.export import export_onnx

    target = run / "onnx" / f"{best.parent.name}.onnx"
    if not target.exists() or target.stat().st_mtime < best.stat().st_mtime:
        export_onnx(torch.load(best, map_location="cpu", weights_only=True), target)
    return target


def slide_done(out: Path, sid: str) -> bool:
    return (out / "slides" / f"{sid}.json").exists()


# ---- the stages of one slide: plan → read chunks → encode → MIL → write --------------
# Each stage is a plain function (or predictor method) over picklable values, so that
# ``gigamil.cluster.ray`` can run the reading as CPU tasks and the models in actors, and
# ``SlidePredictor.predict`` can run the same stages one after another in this process.


@dataclass
class SlideWork:
    """A planned slide: its patch grid, stain normalizer, and the chunks it is read in."""

    path: str
    sid: str
    grid: PatchGrid
    normalizer: Any  # StainNormalizer | None
    chunks: list[list[tuple[int, int]]]  # region reads (grid index ranges) per chunk

    @property
    def patch_size_level0(self) -> float:
        return self.grid.size_level0


@dataclass
class PatchChunk:
    """The patches of one chunk that passed QC, with their level-0 coordinates."""

    patches: np.ndarray  # (n, H, W, 3) uint8
    coords: np.ndarray  # (n, 2) int64
    rejected: dict[str, int]  # QC reason → patches dropped


@dataclass
class SlideScores:
    """What the fold models say about one slide."""

    probs: np.ndarray  # (C,) mean class probabilities
    uncertainty: float
    attention: np.ndarray  # (N,) mean attention
    patch_probs: np.ndarray | None = None  # (N, C) each patch as a bag of one


def plan_inference(path: str | os.PathLike[str], extract: ExtractConfig,
                   chunk_patches: int = 512) -> SlideWork:
    """Tissue, grid and stain fit of one slide; its reads grouped into as few chunks of at
    most ~``chunk_patches`` patches as will do, of even size (so no chunk is a small tail)."""
    from gigamil.wsi.extract import plan_slide, read_runs
    from gigamil.wsi.reader import open_slide, slide_id

    sid = slide_id(Path(path))
    with open_slide(path, extract.backend, extract.mpp_override) as slide:
        plan = plan_slide(slide, extract, sid)
    grid = plan.grids[0]
    n_chunks = max(1, math.ceil(len(grid) / chunk_patches))
    target = math.ceil(len(grid) / n_chunks)  # even chunks: none is a small tail
    chunks: list[list[tuple[int, int]]] = []
    size = target
    for run in read_runs(grid, extract.read_block_px):
        if size >= target:
            chunks.append([])
            size = 0
        chunks[-1].append(run)
        size += run[1] - run[0]
    return SlideWork(str(path), sid, grid, plan.normalizer, chunks)


def read_chunk(work: SlideWork, k: int, extract: ExtractConfig) -> PatchChunk:
    """Read, QC and stain-normalize the patches of chunk ``k``."""
    from gigamil.wsi.extract import process_grid
    from gigamil.wsi.reader import open_slide

    patches: list[np.ndarray] = []
    kept: list[int] = []
    rejected: Counter[str] = Counter()
    with open_slide(work.path, extract.backend, extract.mpp_override) as slide:
        for run in process_grid(slide, work.grid, extract, work.normalizer, encode=False,
                                keep_patches=True, runs=work.chunks[k]):
            kept.extend(run.kept)
            rejected.update(run.rejections())
            patches.extend(run.patches or [])
    ps = work.grid.spec.patch_size
    stack = np.stack(patches) if patches else np.zeros((0, ps, ps, 3), np.uint8)
    return PatchChunk(stack, work.grid.coords[kept], rejected)


def merge_rejected(counts: Sequence[Mapping[str, int]]) -> str:
    """The QC rejections of a slide's chunks, summed, as ``rejection_summary`` writes them."""
    from gigamil.wsi.extract import rejection_summary

    return rejection_summary(sum((Counter(c) for c in counts), Counter()))


class SlidePredictor:
    """Holds the encoder and the fold models: encodes patches, and scores bags."""

    def __init__(self, spec: InferenceSpec) -> None:
        from gigamil.mil.encoders import create_encoder

        self.spec = spec
        self.device = torch.device(spec.device)
        self.encoder = create_encoder(spec.encoder, spec.encoder_weights, self.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.models: list[Any] = []
        for path in spec.model_files:
            if spec.engine == "onnx":
                from gigamil.mil.export import OnnxMIL

                self.models.append(OnnxMIL(path))
            else:
                from gigamil.mil.train import load_model

                state = torch.load(path, map_location=self.device, weights_only=True)
                self.models.append(load_model(state, self.device))

    def warm_up(self) -> None:
        """One tiny forward of every model, so the first slide costs what the others do."""
        ps = self.spec.extract.patch_size
        feats = self.encode([np.zeros((2, ps, ps, 3), np.uint8)])
        self.mil(feats)

    def encode(self, chunks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Features of each chunk of patches; batches run across chunk (and slide) borders."""
        from gigamil.mil.embed import _forward

        sizes = [len(c) for c in chunks]
        flat = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        bs = self.spec.batch_size
        out = [_forward(self.encoder, flat[i:i + bs], self.device, self.dtype)
               for i in range(0, len(flat), bs)]
        feats = np.concatenate(out) if out else np.zeros((0, self.encoder.feature_dim),
                                                         np.float32)
        return np.split(feats, np.cumsum(sizes)[:-1])

    def mil(self, feats: Sequence[np.ndarray]) -> SlideScores:
        """The slide's scores over the fold models (``feats``: its chunks, in order): mean
        probabilities, uncertainty, mean attention, and per-patch probabilities if asked."""
        bag = np.concatenate(feats) if len(feats) > 1 else feats[0]
        probs, attn, unc = [], [], []
        for m in self.models:
            if self.spec.engine == "onnx":
                p, a = m(bag)
                probs.append(p)
                attn.append(a)
                continue
            from gigamil.mil.train import _uncertainty

            model, meta = m
            with torch.no_grad():
                out = model(torch.from_numpy(bag).to(self.device)[None])
                p, u = _uncertainty(out.logits.float(), meta.get("evidential", False))
                a = out.attention if out.attention.dim() == 2 else out.attention.mean(1)
            probs.append(p[0].cpu().numpy())
            attn.append(a[0].float().cpu().numpy())
            unc.append(float(u[0]))
        mean = np.mean(probs, 0)
        entropy = float(-(mean * np.log(np.clip(mean, 1e-12, None))).sum() / np.log(len(mean)))
        return SlideScores(mean, float(np.mean(unc)) if unc and len(unc) == 1 else entropy,
                           np.mean(attn, 0),
                           self.patch_probabilities(bag) if self.spec.patch_probs else None)

    def patch_probabilities(self, bag: np.ndarray, block: int = 4096) -> np.ndarray:
        """(N, C): every patch scored as a bag of one by each fold model, averaged."""
        per_model = []
        for m in self.models:
            if self.spec.engine == "onnx":
                per_model.append(np.stack([m(bag[i:i + 1])[0] for i in range(len(bag))]))
                continue
            from gigamil.mil.train import _uncertainty

            model, meta = m
            rows = []
            with torch.no_grad():
                for i in range(0, len(bag), block):
                    x = torch.from_numpy(bag[i:i + block]).to(self.device)[:, None]
                    p, _ = _uncertainty(model(x).logits.float(), meta.get("evidential", False))
                    rows.append(p.cpu().numpy())
            per_model.append(np.concatenate(rows))
        return np.mean(per_model, 0).astype(np.float32)

    def predict(self, path: str | os.PathLike[str]
                ) -> tuple[dict[str, Any], np.ndarray, SlideScores, SlideWork]:
        """(row, coords, scores, plan) for one slide, every stage in this process."""
        t0 = time.perf_counter()
        extract = self.spec.extract
        work = plan_inference(path, extract, self.spec.chunk_patches)
        chunks = [read_chunk(work, k, extract) for k in range(len(work.chunks))]
        rejected = merge_rejected([c.rejected for c in chunks])
        chunks = [c for c in chunks if len(c.patches)]
        if not chunks:
            raise NoPatchesError(work.sid)
        scores = self.mil(self.encode([c.patches for c in chunks]))
        row = prediction_row(self.spec, work.sid, scores, rejected, time.perf_counter() - t0)
        return row, np.concatenate([c.coords for c in chunks]), scores, work

    def predict_to(self, path: str | os.PathLike[str], out: str | os.PathLike[str]
                   ) -> dict[str, Any]:
        """Predict and write ``out/slides/<id>.json`` and ``.npz`` (and the heatmap)."""
        row, coords, scores, work = self.predict(path)
        return write_slide(self.spec, out, path, row, coords, scores, work.patch_size_level0)


class NoPatchesError(UsageError):
    def __init__(self, sid: str) -> None:
        super().__init__(f"{sid}: no tissue patches passed QC",
                         "check the slide, or lower --min-tissue when extracting")


def prediction_row(spec: InferenceSpec, sid: str, scores: SlideScores, qc: str,
                   seconds: float) -> dict[str, Any]:
    return {"slide_id": sid, "pred": spec.classes[int(scores.probs.argmax())],
            **{f"prob_{c}": float(scores.probs[k]) for k, c in enumerate(spec.classes)},
            "uncertainty": scores.uncertainty, "n_patches": int(len(scores.attention)),
            "qc": qc, "model": spec.model_id(), "seconds": round(seconds, 3)}


def write_slide(spec: InferenceSpec, out: str | os.PathLike[str], path: str | os.PathLike[str],
                row: dict[str, Any], coords: np.ndarray, scores: SlideScores,
                patch_size_level0: float) -> dict[str, Any]:
    """Write one slide's ``.npz`` (coords, attention, per-patch probabilities if computed),
    heatmap, then its ``.json`` (last: the json marks the slide done), each atomically."""
    out = Path(out)
    sid = row["slide_id"]
    arrays = {"coords": coords, "attention": scores.attention.astype(np.float32)}
    if scores.patch_probs is not None:
        arrays["probability"] = scores.patch_probs
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with atomic_path(out / "slides" / f"{sid}.npz") as tmp:
        tmp.write_bytes(buf.getvalue())
    if spec.heatmaps:
        from gigamil.wsi.preview import save_png

        save_png(out / "heatmaps" / f"{sid}.png",
                 slide_heatmap(spec, path, coords, scores, patch_size_level0,
                               title=f"{sid}: {row['pred']}"))
    write_json(out / "slides" / f"{sid}.json", row)
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
    if spec.patch_probs and scores.patch_probs is not None:
        k = spec.heatmap_class_index()
        return attention_heatmap(thumb, scale, coords, patch_size_level0,
                                 scores.patch_probs[:, k], title=title, rank_scale=False,
                                 label=f"P({spec.classes[k]}) per patch")
    return attention_heatmap(thumb, scale, coords, patch_size_level0, scores.attention,
                             title=title)


PREDICTION_FIELDS = ["slide_id", "pred", "uncertainty", "n_patches", "qc", "model", "seconds"]


def write_outputs(out: str | os.PathLike[str], spec: InferenceSpec,
                  failures: list[dict[str, Any]], stats: dict[str, Any] | None = None
                  ) -> tuple[Path, Path]:
    """Aggregate ``slides/*.json`` into ``predictions.csv``; write ``failures.csv`` and
    ``infer_config.json`` (the resolved spec, with names instead of paths, and ``stats``)."""
    from gigamil.versions import gigamil_version, package_versions

    out = Path(out)
    rows = [json.loads(p.read_text()) for p in sorted((out / "slides").glob("*.json"))]
    fields = PREDICTION_FIELDS[:2] + [f"prob_{c}" for c in spec.classes] + PREDICTION_FIELDS[2:]
    write_csv(out / "predictions.csv", rows, fields)
    write_csv(out / "failures.csv", failures, FAILURE_FIELDS)
    config = dataclasses.asdict(spec) | {
        "run": Path(spec.run).name, "model_id": spec.model_id(),
        "model_files": [str(Path(m).relative_to(spec.run)) if Path(m).is_relative_to(spec.run)
                        else Path(m).name for m in spec.model_files],
        "encoder_weights": Path(spec.encoder_weights).name if spec.encoder_weights else None}
    write_json(out / "infer_config.json", {
        "config": config, "pipeline": stats or {},
        "versions": {"gigamil": gigamil_version(), **package_versions(), "torch": torch.__version__}})
    return out / "predictions.csv", out / "failures.csv"
