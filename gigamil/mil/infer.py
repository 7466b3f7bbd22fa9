"""Predictions for new slides from a trained run: slide → patches → encoder → MIL models.

    spec = InferenceSpec.from_run("runs/crc1", engine="torch", folds="all")
    predictor = SlidePredictor(spec)                 # holds the encoder and the fold models
    row = predictor.predict_to("slides/a.svs", "preds/")   # writes preds/slides/a.json (+ .npz)
    write_outputs("preds/", spec)                    # predictions.csv + failures.csv

Each slide's result is written atomically on its own, so a rerun skips finished
slides and a crash loses at most the slides in flight. ``gigamil.cluster.ray`` runs
predictors as Ray actors; this module has no Ray in it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigamil.errors import UsageError
from gigamil.io import atomic_path, write_csv, write_json
from gigamil.wsi.extract import ExtractConfig
from gigamil.wsi.qc import QCConfig

__all__ = ["InferenceSpec", "SlidePredictor", "write_outputs", "slide_done",
           "PREDICTION_FIELDS"]

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
    threads: int = 1
    heatmaps: bool = False
    model_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run(cls, run: str | os.PathLike[str], engine: str = "torch", folds: str = "all",
                 device: str = "cpu", heatmaps: bool = False, batch_size: int = 64,
                 threads: int = 1) -> InferenceSpec:
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
        if engine == "onnx":
            models = [_ensure_onnx(m, run) for m in models]
        elif engine != "torch":
            raise UsageError(f"--engine {engine!r} is not torch or onnx")
        return cls(run=str(run), classes=config["classes"], model_files=[str(m) for m in models],
                   encoder=embed["encoder"], encoder_weights=embed.get("weights"),
                   extract=_extract_config(features), engine=engine, device=device,
                   batch_size=batch_size, threads=threads, heatmaps=heatmaps,
                   model_name=config["config"]["model"])

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


class SlidePredictor:
    """Holds the encoder and the fold models; predicts one slide at a time."""

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

    def _mil(self, feats: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """Mean probabilities, uncertainty and mean attention over the fold models."""
        probs, attn, unc = [], [], []
        for m in self.models:
            if self.spec.engine == "onnx":
                p, a = m(feats)
                probs.append(p)
                attn.append(a)
                continue
            from gigamil.mil.train import _uncertainty

            model, meta = m
            with torch.no_grad():
                out = model(torch.from_numpy(feats).to(self.device)[None])
                p, u = _uncertainty(out.logits.float(), meta.get("evidential", False))
                a = out.attention if out.attention.dim() == 2 else out.attention.mean(1)
            probs.append(p[0].cpu().numpy())
            attn.append(a[0].float().cpu().numpy())
            unc.append(float(u[0]))
        mean = np.mean(probs, 0)
        entropy = float(-(mean * np.log(np.clip(mean, 1e-12, None))).sum() / np.log(len(mean)))
        return mean, (float(np.mean(unc)) if unc and len(unc) == 1 else entropy), \
            np.mean(attn, 0)

    def predict(self, path: str | os.PathLike[str]) -> tuple[dict[str, Any], np.ndarray,
                                                             np.ndarray, dict[str, Any]]:
        """(row, coords, attention, bag attributes) for one slide."""
        from gigamil.mil.embed import slide_features
        from gigamil.wsi.reader import slide_id

        path = Path(path)
        t0 = time.perf_counter()
        feats, coords, attrs = slide_features(path, self.encoder, self.spec.extract, self.device,
                                              self.dtype, self.spec.batch_size,
                                              self.spec.threads)
        if len(feats) == 0:
            raise UsageError(f"{path.name}: no tissue patches passed QC",
                             "check the slide, or lower --min-tissue when extracting")
        probs, unc, attention = self._mil(feats)
        row = {"slide_id": slide_id(path), "pred": self.spec.classes[int(probs.argmax())],
               **{f"prob_{c}": float(probs[k]) for k, c in enumerate(self.spec.classes)},
               "uncertainty": unc, "n_patches": int(len(feats)),
               "qc": attrs.get("qc_counts", ""), "model": self.spec.model_id(),
               "seconds": round(time.perf_counter() - t0, 3)}
        return row, coords, attention, attrs

    def predict_to(self, path: str | os.PathLike[str], out: str | os.PathLike[str]
                   ) -> dict[str, Any]:
        """Predict and write ``out/slides/<id>.json`` and ``.npz`` (and the heatmap)."""
        out = Path(out)
        row, coords, attention, attrs = self.predict(path)
        sid = row["slide_id"]
        buf = io.BytesIO()
        np.savez_compressed(buf, coords=coords, attention=attention.astype(np.float32))
        with atomic_path(out / "slides" / f"{sid}.npz") as tmp:
            tmp.write_bytes(buf.getvalue())
        if self.spec.heatmaps:
            from gigamil.wsi.preview import save_png

            save_png(out / "heatmaps" / f"{sid}.png",
                     slide_heatmap(path, coords, attention, attrs, title=f"{sid}: {row['pred']}"))
        write_json(out / "slides" / f"{sid}.json", row)  # last: marks the slide as done
        return row


def slide_heatmap(path: str | os.PathLike[str], coords: np.ndarray, values: np.ndarray,
                  attrs: dict[str, Any], title: str = "") -> np.ndarray:
    """Attention over a thumbnail read at ``HEATMAP_MPP`` (bounded memory)."""
    from gigamil.mil.heatmap import HEATMAP_MPP, attention_heatmap
    from gigamil.wsi.reader import open_slide

    with open_slide(path) as slide:
        thumb = slide.read_at_mpp(HEATMAP_MPP)
        scale = slide.mpp / HEATMAP_MPP
    size0 = float(attrs.get("patch_size_level0", attrs.get("patch_size", 256)))
    return attention_heatmap(thumb, scale, coords, size0, values, title=title)


PREDICTION_FIELDS = ["slide_id", "pred", "uncertainty", "n_patches", "qc", "model", "seconds"]


def write_outputs(out: str | os.PathLike[str], classes: list[str],
                  failures: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Aggregate ``slides/*.json`` into ``predictions.csv``; write ``failures.csv``."""
    out = Path(out)
    rows = [json.loads(p.read_text()) for p in sorted((out / "slides").glob("*.json"))]
    fields = PREDICTION_FIELDS[:2] + [f"prob_{c}" for c in classes] + PREDICTION_FIELDS[2:]
    write_csv(out / "predictions.csv", rows, fields)
    write_csv(out / "failures.csv", failures, FAILURE_FIELDS)
    return out / "predictions.csv", out / "failures.csv"
