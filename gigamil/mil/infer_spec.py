"""What inference on new slides needs from a trained run, resolved once.

    spec = InferenceSpec.from_run("runs/crc1", engine="torch", folds="all")

The spec holds plain values only (model file paths, the encoder, the extraction the
run's features were made with), so it is cheap to ship to Ray workers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigamil.errors import UsageError
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.qc import QCConfig

__all__ = ["InferenceSpec"]


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
        from gigamil.mil.evaluate import fold_models, run_config

        run = Path(run)
        config = run_config(run)
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
