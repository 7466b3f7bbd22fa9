"""Predictions for new slides from a trained run: slide → patches → encoder → MIL models.

    spec = InferenceSpec.from_run("runs/crc1", engine="torch", folds="all")
    predictor = SlidePredictor(spec)                 # holds the encoder and the fold models
    row = predictor.predict_to("slides/a.svs", "preds/")   # writes preds/slides/a.json (+ .npz)
    write_outputs("preds/", spec, failures)          # predictions.csv + failures.csv

Each slide's result is written atomically on its own, so a rerun skips finished
slides and a crash loses at most the slides in flight. A slide goes through stages
(plan → read chunks → encode → MIL → write) that ``SlidePredictor.predict`` runs one
after another here and ``gigamil.cluster.ray`` spreads over Ray: reading in CPU tasks,
the models in actors. This module has no Ray in it; the spec is in
:mod:`gigamil.mil.infer_spec`, the writing (``write_slide``, ``write_outputs``) in
:mod:`gigamil.mil.infer_outputs`.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigamil.errors import NoPatchesError
from gigamil.mil.infer_outputs import prediction_row, write_slide
from gigamil.mil.infer_spec import InferenceSpec
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.grid import PatchGrid

__all__ = ["SlideWork", "PatchChunk", "SlideScores", "SlidePredictor", "plan_inference",
           "read_chunk", "merge_rejected"]


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
    targets: dict[str, dict[str, Any]] | None = None  # several targets: each one's cells
    embedding: np.ndarray | None = None  # (folds, E) attention-pooled slide vectors (torch)


def plan_inference(path: str | os.PathLike[str], extract: ExtractConfig,
                   chunk_patches: int = 512, sid: str | None = None) -> SlideWork:
    """Tissue, grid and stain fit of one slide (``sid``: its id, default the file's stem);
    its reads grouped into as few chunks of at most ~``chunk_patches`` patches as will do,
    of even size (so no chunk is a small tail)."""
    from gigamil.wsi.metadata import slide_id
    from gigamil.wsi.planning import plan_slide, read_runs
    from gigamil.wsi.reader import open_slide_for

    sid = sid or slide_id(Path(path))
    with open_slide_for(path, extract) as slide:
        plan = plan_slide(slide, extract, sid)
        exact = slide.exact_levels
    grid = plan.grids[0]
    n_chunks = max(1, math.ceil(len(grid) / chunk_patches))
    target = math.ceil(len(grid) / n_chunks)  # even chunks: none is a small tail
    chunks: list[list[tuple[int, int]]] = []
    size = target
    for run in read_runs(grid, extract.read_block_px, exact):
        if size >= target:
            chunks.append([])
            size = 0
        chunks[-1].append(run)
        size += run[1] - run[0]
    return SlideWork(str(path), sid, grid, plan.normalizer, chunks)


def read_chunk(work: SlideWork, k: int, extract: ExtractConfig) -> PatchChunk:
    """Read, QC and stain-normalize the patches of chunk ``k``."""
    from gigamil.wsi.planning import process_grid
    from gigamil.wsi.reader import open_slide_for

    patches: list[np.ndarray] = []
    kept: list[int] = []
    rejected: Counter[str] = Counter()
    with open_slide_for(work.path, extract) as slide:
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
    from gigamil.wsi.extract_config import rejection_summary

    return rejection_summary(sum((Counter(c) for c in counts), Counter()))


def _pooled(out: Any) -> np.ndarray | None:
    """The bag's attention-pooled vector from a model's output, if it has one."""
    return None if out.embedding is None else out.embedding[0].float().cpu().numpy()


def _stack(vectors: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """(folds, E) from each fold model's vector; None unless every model gave one of one size."""
    if not vectors or any(v is None for v in vectors) or len({v.shape for v in vectors
                                                                 if v is not None}) != 1:
        return None
    return np.stack([v for v in vectors if v is not None]).astype(np.float32)


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
                from gigamil.mil.predict import load_model

                state = torch.load(path, map_location=self.device, weights_only=True)
                self.models.append(load_model(state, self.device))

    def warm_up(self) -> None:
        """One tiny forward of every model, so the first slide costs what the others do."""
        ps = self.spec.extract.patch_size
        feats = self.encode([np.zeros((2, ps, ps, 3), np.uint8)])
        self.mil(feats)

    def encode(self, chunks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Features of each chunk of patches; batches run across chunk (and slide) borders."""
        from gigamil.mil.embed import forward_patches

        sizes = [len(c) for c in chunks]
        flat = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        bs = self.spec.batch_size
        out = [forward_patches(self.encoder, flat[i:i + bs], self.device, self.dtype)
               for i in range(0, len(flat), bs)]
        feats = np.concatenate(out) if out else np.zeros((0, self.encoder.feature_dim),
                                                         np.float32)
        return np.split(feats, np.cumsum(sizes)[:-1])

    def mil(self, feats: Sequence[np.ndarray]) -> SlideScores:
        """The slide's scores over the fold models (``feats``: its chunks, in order): mean
        probabilities, uncertainty, mean attention, and per-patch probabilities if asked."""
        bag = np.concatenate(feats) if len(feats) > 1 else feats[0]
        if not self.spec.single_classification:
            return self.target_scores(bag)
        probs, attn, unc, emb = [], [], [], []
        for m in self.models:
            if self.spec.engine == "onnx":
                p, a = m(bag)
                probs.append(p)
                attn.append(a)
                continue
            from gigamil.mil.predict import probs_and_uncertainty, temperature_of

            model, meta = m
            with torch.no_grad():
                out = model(torch.from_numpy(bag).to(self.device)[None])
                p, u = probs_and_uncertainty(out.logits.float() / temperature_of(meta),
                                             meta.get("evidential", False))
                a = out.attention if out.attention.dim() == 2 else out.attention.mean(1)
            probs.append(p[0].cpu().numpy())
            attn.append(a[0].float().cpu().numpy())
            unc.append(float(u[0]))
            emb.append(_pooled(out))
        mean = np.mean(probs, 0)
        entropy = float(-(mean * np.log(np.clip(mean, 1e-12, None))).sum() / np.log(len(mean)))
        return SlideScores(mean, float(np.mean(unc)) if unc and len(unc) == 1 else entropy,
                           np.mean(attn, 0),
                           self.patch_probabilities(bag) if self.spec.patch_probs else None,
                           embedding=_stack(emb))

    def target_scores(self, bag: np.ndarray) -> SlideScores:
        """Every target's scores (risk, value, probabilities), each fold model with its own
        bins and scales, averaged over the folds; their prediction cells."""
        from gigamil.mil.targets import layout_targets, target_from_dict

        per_fold: list[list[np.ndarray]] = []
        attn: list[np.ndarray] = []
        emb: list[np.ndarray | None] = []
        targets = []
        for m in self.models:
            if self.spec.engine == "onnx":  # onnxruntime: the heads' logits, no slide vector
                z, a_np = m.run(bag)
                meta, logits = m.meta, z[None].astype(np.float64)
                attn.append(a_np)
                emb.append(None)
            else:
                model, meta = m
                with torch.no_grad():
                    out = model(torch.from_numpy(bag).to(self.device)[None])
                logits = out.logits.float().cpu().numpy()
                a = out.attention if out.attention.dim() == 2 else out.attention.mean(1)
                attn.append(a[0].float().cpu().numpy())
                emb.append(_pooled(out))
            targets = layout_targets([target_from_dict(d) for d in meta["targets"]])
            per_fold.append([t.scores(logits[:, t.outputs])[0] for t in targets])
        cells: dict[str, dict[str, Any]] = {}
        for i, t in enumerate(targets):
            mean = np.mean([f[i] for f in per_fold], 0)
            row = t.score_row(np.full(t.width, np.nan), mean)
            cells[t.name] = {k: v for k, v in row.items()
                             if k not in {t.prefix + n for n in t.label_names}}
        first = next(iter(cells.values()))
        probs = np.array([float(v) for k, v in first.items() if "prob_" in k] or [np.nan])
        return SlideScores(probs, float("nan"), np.mean(attn, 0), None, cells, _stack(emb))

    def patch_probabilities(self, bag: np.ndarray, block: int = 4096) -> np.ndarray:
        """(N, C): every patch scored as a bag of one by each fold model, averaged."""
        per_model = []
        for m in self.models:
            if self.spec.engine == "onnx":
                per_model.append(np.stack([m(bag[i:i + 1])[0] for i in range(len(bag))]))
                continue
            from gigamil.mil.predict import probs_and_uncertainty, temperature_of

            model, meta = m
            rows = []
            with torch.no_grad():
                for i in range(0, len(bag), block):
                    x = torch.from_numpy(bag[i:i + block]).to(self.device)[:, None]
                    p, _ = probs_and_uncertainty(model(x).logits.float() / temperature_of(meta),
                                                 meta.get("evidential", False))
                    rows.append(p.cpu().numpy())
            per_model.append(np.concatenate(rows))
        return np.mean(per_model, 0).astype(np.float32)

    def predict(self, path: str | os.PathLike[str]
                ) -> tuple[dict[str, Any], np.ndarray, SlideScores, SlideWork]:
        """(row, coords, scores, plan) for one slide, every stage in this process."""
        t0 = time.perf_counter()
        extract = self.spec.extract
        work = plan_inference(path, extract, self.spec.chunk_patches, self.spec.slide_id(path))
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
